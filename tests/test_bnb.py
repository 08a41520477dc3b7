"""bitsandbytes variants on the tiny zoo: built from a recipe, gated, and the save-after-forward trap caught."""

import json

import pytest
from test_plugin_e2e import make_project, run

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'quantgate[bnb]')")

from quantgate.checkpoints.bnb_build import WEIGHTS_DIGEST_FILE, bnb_config, build_bnb  # noqa: E402
from quantgate.checkpoints.loading import load_checkpoint  # noqa: E402
from quantgate.errors import LoadAuditError  # noqa: E402

BNB_VARIANTS = """
[[models.tiny.variants]]
name = "int8"
format = "bnb"
bits = 8
recipe = { builder = "bitsandbytes" }
"""


def test_bnb_recipes_are_built_and_gated_with_their_format_and_bits(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template, variants=BNB_VARIANTS)
    result = run(pytester, "--quality-json", "reports/q.json", "-k", "relative_perplexity")
    assert result.ret == 0, result.stdout.str()[-3000:]
    records = {(r["variant"], r["corpus"]): r for r in json.loads((pytester.path / "reports" / "q.json").read_text())["records"]
               if r["metric"] == "relative_perplexity"}
    int8 = records[("int8", "code")]
    assert (int8["format"], int8["bits"], int8["backend"], int8["verdict"]) == ("bnb", 8, "transformers", "pass")
    assert "Linear8bitLt" in int8["kernels"]
    assert int8["ratio"] == pytest.approx(1.0, abs=0.05)
    built = list((pytester.path / "build" / "zoo" / "tiny").glob("int8-*/" + WEIGHTS_DIGEST_FILE))
    assert len(built) == 1


NO_OUTLIERS = BNB_VARIANTS + """
[[models.tiny.variants]]
name = "int8-no-outliers"
format = "bnb"
bits = 8
outlier_handling = "none (llm_int8_threshold = 0)"
recipe = { builder = "bitsandbytes", llm_int8_threshold = 0 }
profiles = ["full"]
"""


def test_an_outlier_threshold_is_built_in_and_a_full_only_variant_stays_out_of_the_fast_tier(pytester,
                                                                                            tiny_zoo_template):
    make_project(pytester, tiny_zoo_template, variants=NO_OUTLIERS)
    fast = run(pytester, "--quality-profile", "fast", "--collect-only", "-q")
    assert "tiny/int8/code" in fast.stdout.str() and "int8-no-outliers" not in fast.stdout.str()
    full = run(pytester, "--collect-only", "-q")
    assert "tiny/int8-no-outliers/code" in full.stdout.str()
    built = next((pytester.path / "build" / "zoo" / "tiny").glob("int8-no-outliers-*"))
    assert json.loads((built / "config.json").read_text())["quantization_config"]["llm_int8_threshold"] == 0.0
    loaded = load_checkpoint(built, fmt="bnb", dtype="float32", device="cpu", what="tiny/int8-no-outliers",
                               tokenizer_path=pytester.path / "models" / "reference")
    thresholds = {m.state.threshold for m in loaded.model.modules() if type(m).__name__ == "Linear8bitLt"}
    assert thresholds == {0.0}


@pytest.fixture
def nf4_sized_reference(tmp_path):
    """bitsandbytes' CPU NF4 kernel packs rows in blocks: the tiny zoo's 32-wide layers are too narrow."""
    import tinyzoo
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = tmp_path / "reference"
    tokenizer = tinyzoo.make_tokenizer(ref)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(ref)
    return ref


def _load_nf4(path, reference):
    return load_checkpoint(path, fmt="bnb", dtype="float32", device="cpu", what="tiny/nf4", tokenizer_path=reference)


def _nf4_model(reference):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(reference), quantization_config=bnb_config(4),
                                                dtype=torch.float16, device_map="cpu")


def test_nf4_weights_changed_after_the_build_are_refused(nf4_sized_reference, tmp_path):
    """The condition the digest guards against, produced the same way on every CPU: a user's script
    quantizes, its packed NF4 weights change in memory (here: one layer's 4-bit halves swapped, as a
    repack would), and it saves over the verified build."""
    import torch

    out = tmp_path / "nf4"
    record = build_bnb(nf4_sized_reference, out, bits=4)
    assert _load_nf4(out, nf4_sized_reference).description["weights_digest"] == "verified against the build record"
    assert record["weights_sha256"] == json.loads((out / WEIGHTS_DIGEST_FILE).read_text())["sha256"]

    model = _nf4_model(nf4_sized_reference)
    packed = model.model.layers[0].self_attn.q_proj.weight
    assert packed.dtype == torch.uint8  # two 4-bit codes per byte
    with torch.no_grad():
        packed.data.copy_((packed.data >> 4) | (packed.data << 4))
    model.save_pretrained(str(out))  # over the verified build; its digest file stays
    with pytest.raises(LoadAuditError, match="quantized weights differ from those recorded when it was built"):
        _load_nf4(out, nf4_sized_reference)


def test_nf4_weights_saved_after_a_cpu_forward_pass_are_refused(nf4_sized_reference, tmp_path):
    """The silent failure as it happens: on some CPUs bitsandbytes repacks NF4 weights in place on the
    first forward pass (not on every CPU: where it does not, there is nothing to catch)."""
    import torch

    from quantgate.checkpoints.bnb_build import quantized_weights_digest

    out = tmp_path / "nf4"
    build_bnb(nf4_sized_reference, out, bits=4)
    model = _nf4_model(nf4_sized_reference)  # a user's script that "checks it works" before saving
    before = quantized_weights_digest(model)
    with torch.inference_mode():
        model(torch.arange(1, 20)[None])
    if quantized_weights_digest(model) == before:
        pytest.skip("bitsandbytes did not repack the NF4 weights on this CPU's forward pass")
    model.save_pretrained(str(out))
    with pytest.raises(LoadAuditError, match="quantized weights differ from those recorded when it was built"):
        _load_nf4(out, nf4_sized_reference)


def test_a_bnb_checkpoint_without_a_build_record_loads_and_says_so(tiny_project):
    out = tiny_project / "models" / "int8"
    build_bnb(tiny_project / "models" / "reference", out, bits=8)
    (out / WEIGHTS_DIGEST_FILE).unlink()  # e.g. a checkpoint made by someone else's script
    loaded = load_checkpoint(out, fmt="bnb", dtype="float32", device="cpu", what="tiny/int8",
                             tokenizer_path=tiny_project / "models" / "reference")
    assert loaded.description["weights_digest"] == "no build record"


def test_an_int8_gpt2_with_layernorm_biases_loads_and_scores(tmp_path):
    """transformers leaves a bitsandbytes checkpoint's LayerNorm weights in fp16 and casts their biases to the
    requested float32: GPT-2's first LayerNorm then failed ("expected scalar type Half but found Float"). The loader
    casts each such bias to its weight's dtype and says how many."""
    import tinyzoo
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel

    ref, int8 = tmp_path / "gpt2", tmp_path / "gpt2-int8"
    tokenizer = tinyzoo.make_tokenizer(ref)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=128, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).to(torch.float16).save_pretrained(ref)
    AutoModelForCausalLM.from_pretrained(ref, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                         dtype=torch.float16, device_map="cpu").save_pretrained(int8)
    loaded = load_checkpoint(int8, fmt="bnb", dtype="float32", device="cpu", what="gpt2/int8", tokenizer_path=ref)
    scores = loaded.backend.loglikelihood_rolling(list(range(1, 60)), max_length=32, stride=16, batch_size=2)
    assert scores.n == 58
    assert loaded.description["aligned_biases"] == 3  # ln_1, ln_2, ln_f
