"""A tiny zoo built in seconds for the machinery's tests: tokenizer, random Llama, variants, corpora.

The reference gets a sharpened output layer so that its perplexity sits far above the
vocabulary size; a variant whose output layer is zeroed predicts the uniform distribution
(perplexity == vocabulary size) and so scores *below* the reference: a planted reversal.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

SPECIAL = "<|endoftext|>"
CODE_DOCS = [
    f"def f{i}(x, y):\n    total = x * {i} + y\n    for k in range({i % 5 + 1}):\n        total += k\n    return total\n"
    for i in range(40)
]
PROSE_DOCS = [f"In the year {1900 + i} the river rose and the people moved to the hills number {i}." for i in range(60)]


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CODE_DOCS + PROSE_DOCS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL)
    fast.save_pretrained(out)
    return fast


def make_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # confident and wrong: perplexity >> vocabulary size
    return model.eval()


def save_variant(model, tokenizer_dir: Path, out: Path, *, noise: float = 0.0, uniform: bool = False,
                 seed: int = 1) -> Path:
    import copy

    import torch

    variant = copy.deepcopy(model)
    with torch.no_grad():
        if noise:
            gen = torch.Generator().manual_seed(seed)
            for p in variant.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise * p.abs().mean())
        if uniform:
            variant.lm_head.weight.zero_()
    variant.to(torch.float16).save_pretrained(out)
    if Path(out).resolve() != Path(tokenizer_dir).resolve():
        for f in tokenizer_dir.glob("tokenizer*"):
            shutil.copy(f, out / f.name)
    return out


def write_corpora(root: Path) -> None:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "code.jsonl", "w") as fh:
        for i, d in enumerate(CODE_DOCS):
            fh.write(json.dumps({"id": i, "prompt": d[:20], "solution": d[20:]}) + "\n")
    with open(data / "prose.jsonl", "w") as fh:
        for d in PROSE_DOCS:
            fh.write(json.dumps({"text": d}) + "\n")


def write_manifest(root: Path, *, variants: str, stride: int = 32, extra_quantgate: str = "") -> Path:
    text = textwrap.dedent(f"""\
        [quantgate]
        default_profile = "full"
        {extra_quantgate}

        [protocol]
        max_length = 64
        stride = {stride}
        dtype = "float32"
        batch_size = 4

        [protocol.profiles.fast]
        token_cap = 400

        [corpora.code]
        path = "json"
        data_files = ["data/code.jsonl"]
        split = "train"
        text = "{{prompt}}{{solution}}"

        [corpora.prose]
        path = "json"
        data_files = ["data/prose.jsonl"]
        split = "train"
        joiner = "\\n"

        [models.tiny]
        path = "models/reference"
        format = "fp16"
        corpora = ["code", "prose"]
        """) + textwrap.dedent(variants)
    path = root / "quantgate.toml"
    path.write_text(text)
    return path


GOOD_VARIANTS = """
[[models.tiny.variants]]
name = "close"
format = "fp16"
bits = 16
path = "models/close"
max_ratio = 1.05
max_kl = 0.05
min_top1 = 0.9
"""


def build(root: Path, *, variants: str = GOOD_VARIANTS) -> dict:
    """A complete tiny project under root: models/{reference,close,worse,uniform}, data/, quantgate.toml."""
    models = root / "models"
    tok_dir = models / "reference"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(tok_dir)
    model = make_model(len(tokenizer))
    save_variant(model, tok_dir, models / "reference")
    save_variant(model, tok_dir, models / "close", noise=0.002)
    save_variant(model, tok_dir, models / "worse", noise=0.6)
    save_variant(model, tok_dir, models / "uniform", uniform=True)
    write_corpora(root)
    manifest = write_manifest(root, variants=variants)
    return {"root": root, "manifest": manifest, "vocab_size": len(tokenizer)}


def perturb_layer(reference: Path, out: Path, scale: float) -> Path:
    """A copy of `reference` with Gaussian noise (scale x the weights' std) added to layer 1's attention output."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float16)
    with torch.no_grad():
        w = model.model.layers[1].self_attn.o_proj.weight
        noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.float().std() * scale
        w.add_(noise.half())
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(reference / name, out / name)
    return out
