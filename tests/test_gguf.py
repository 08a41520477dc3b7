"""GGUF: our HF -> F16 converter, llama.cpp's quantizer and the llama.cpp scoring backend, on a tiny Llama.

The model has hidden size 256 and FFN 768 because llama.cpp's k-quants work on 256-value blocks
along each row; one layer and a 320-token vocabulary keep every file under 3 MB.
"""

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="gguf-py is not installed (pip install gguf)")

from quantgate.backends.hf import TransformersBackend  # noqa: E402
from quantgate.checkpoints.gguf_build import gguf_tensor_types, quantize_gguf, write_f16_gguf  # noqa: E402

TEXT = "def f(x, y):\n    total = x * 3 + y\n    return total\nIn the year 1907 the river rose.<|endoftext|>  ok"


def needs_llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """An HF fp16 Llama directory and its F16 GGUF, side by side."""
    import tinyzoo
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    hf_dir = root / "hf"
    tokenizer = tinyzoo.make_tokenizer(hf_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # peaked distributions, so logprob differences mean something
        for layer in model.model.layers:  # and attention that is far from uniform, so Q/K layout matters
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.to(torch.float16).save_pretrained(hf_dir)
    f16 = root / "gguf" / "model-F16.gguf"  # its own folder: transformers' gguf_file= is relative to one
    f16.parent.mkdir()
    info = write_f16_gguf(hf_dir, f16)
    return {"hf": hf_dir, "f16": f16, "info": info,
            "ids": np.asarray(tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"], dtype=np.int64)}


def _hf(path, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()


def test_f16_gguf_is_the_hf_model_for_transformers(tiny_gguf):
    import torch
    from transformers import AutoTokenizer

    f16 = tiny_gguf["f16"]
    assert tiny_gguf["info"]["tensor_types"] == ["F16", "F32"]
    assert gguf_tensor_types(f16) == {"F16": 9, "F32": 3}  # 2-D weights F16, norms F32
    assert not list(f16.parent.glob("*.tmp"))
    reference = _hf(tiny_gguf["hf"])
    loaded = _hf(f16.parent, gguf_file=f16.name)
    assert not loaded.config.tie_word_embeddings and loaded.config.num_key_value_heads == 2
    ids = torch.as_tensor(tiny_gguf["ids"][None, :64])
    with torch.inference_mode():
        # both hold the same fp16 values, so after the Q/K permutation round trip the logits agree exactly
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    ours = AutoTokenizer.from_pretrained(str(tiny_gguf["hf"]))
    theirs = AutoTokenizer.from_pretrained(str(f16.parent), gguf_file=f16.name)
    assert theirs(TEXT)["input_ids"] == ours(TEXT)["input_ids"]
    assert theirs.eos_token == ours.eos_token == "<|endoftext|>"


def test_unsupported_checkpoint_writes_nothing(tiny_gguf, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((tiny_gguf["hf"] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
    with pytest.raises(ValueError, match="only model_type 'llama'"):
        write_f16_gguf(bad, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("out.gguf*"))


def test_llama_cpp_scores_the_f16_file_like_transformers(tiny_gguf):
    needs_llama_cpp()
    from quantgate.backends.llamacpp import LlamaCppBackend

    ids = tiny_gguf["ids"]
    kwargs = dict(max_length=48, stride=24, batch_size=4, top_k=3)
    theirs = TransformersBackend(_hf(tiny_gguf["hf"]), "cpu").loglikelihood_rolling(ids, **kwargs)
    backend = LlamaCppBackend(tiny_gguf["f16"], n_threads=2)
    ours = backend.loglikelihood_rolling(ids, **kwargs)
    backend.close()
    np.testing.assert_array_equal(ours.positions, theirs.positions)
    # llama.cpp rounds activations to fp16 for F16 matmuls: close, not identical
    np.testing.assert_allclose(ours.logprobs, theirs.logprobs, atol=2e-2)
    assert ours.perplexity == pytest.approx(theirs.perplexity, rel=2e-3)
    assert (ours.topk_ids[:, 0] == theirs.topk_ids[:, 0]).mean() > 0.95
    np.testing.assert_allclose(ours.topk_logprobs[:, 0], theirs.topk_logprobs[:, 0], atol=2e-2)


def test_llama_cpp_answers_loglikelihood_and_generation_requests_like_transformers(tiny_gguf):
    needs_llama_cpp()
    from quantgate.backends.llamacpp import LlamaCppBackend

    ids = [int(i) for i in tiny_gguf["ids"]]
    requests = [(ids[:30], ids[30:34]), (ids[5:20], ids[20:21])]
    theirs = TransformersBackend(_hf(tiny_gguf["hf"]), "cpu")
    backend = LlamaCppBackend(tiny_gguf["f16"], n_threads=2)
    try:
        ours = backend.loglikelihood(requests, max_length=48, batch_size=2)
        expected = theirs.loglikelihood(requests, max_length=48, batch_size=2)
        np.testing.assert_allclose([x for x, _ in ours], [x for x, _ in expected], atol=5e-2)
        generated = backend.generate_until(ids[:30], max_new_tokens=3, max_length=48)
        assert len(generated) == 3 and generated[0] == theirs.generate_until(ids[:30], max_new_tokens=1, max_length=48)[0]
        # the KV-cache decoding gives what re-scoring the whole window at every step gives
        from quantgate.backends.base import ScoringBackend

        rescored = ScoringBackend.generate_until(backend, ids[:30], max_new_tokens=6, max_length=48)
        assert backend.generate_until(ids[:30], max_new_tokens=6, max_length=48) == rescored
        assert backend.generate_until(ids[:30], max_new_tokens=6, max_length=48, stop=[rescored[2]]) == rescored[:2]
    finally:
        backend.close()


def test_quantized_files_are_smaller_and_load(tiny_gguf):
    needs_llama_cpp()
    from quantgate.backends.llamacpp import LlamaCppBackend

    f16 = tiny_gguf["f16"]
    kwargs = dict(max_length=48, stride=24, batch_size=4)
    reference = LlamaCppBackend(f16, n_threads=2).loglikelihood_rolling(tiny_gguf["ids"], **kwargs).perplexity
    for qtype, main_type, max_size in (("Q8_0", "Q8_0", 0.6), ("Q4_K_M", "Q4_K", 0.4)):
        out = f16.with_name(f"model-{qtype}.gguf")
        info = quantize_gguf(f16, out, qtype, n_threads=2)
        assert info["size_bytes"] < max_size * f16.stat().st_size
        assert main_type in info["tensor_types"] and "F16" not in info["tensor_types"]
        ppl = LlamaCppBackend(out, n_threads=2).loglikelihood_rolling(tiny_gguf["ids"], **kwargs).perplexity
        assert ppl == pytest.approx(reference, rel=0.05), qtype
    loaded = _hf(f16.parent, gguf_file="model-Q8_0.gguf")  # transformers dequantizes it
    assert loaded.lm_head.weight.dtype.is_floating_point
    with pytest.raises(ValueError, match="unsupported GGUF type"):
        quantize_gguf(f16, f16.with_name("x.gguf"), "IQ1_S")


def test_llama_cpp_kernel_choices_are_pinned_and_in_the_protocol(tiny_gguf, monkeypatch):
    """Flash attention is set on, not left to llama.cpp's per-device "auto"; the protocol says so."""
    needs_llama_cpp()
    import llama_cpp

    from quantgate.backends import llamacpp
    from quantgate.backends.llamacpp import LlamaCppBackend

    assert LlamaCppBackend.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert llamacpp.NUMERICS["flash_attn"] == "on"
    ids = tiny_gguf["ids"][:40]

    def logits(flash_attn_type):
        monkeypatch.setattr(LlamaCppBackend, "flash_attn_type", flash_attn_type)
        backend = LlamaCppBackend(tiny_gguf["f16"], n_threads=2)
        try:
            return backend._window_logits(ids, 0)
        finally:
            backend.close()

    pinned = logits(llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED)
    assert np.array_equal(pinned, logits(llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO))  # what "auto" means on a CPU
    assert not np.array_equal(pinned, logits(llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED))  # the choice matters

    from quantgate.evaluation import Evaluator
    from quantgate.manifest import load_manifest

    repo = Path(__file__).resolve().parents[1]
    ev = Evaluator(manifest=load_manifest(repo / "quantgate.toml"), profile="fast", device="cpu")
    assert ev.protocol("demo", "code", backend="llama.cpp").as_dict()["kernels"] == \
        "flash_attn=on, kv_cache=f16, weight_repack=off"
    assert "kernels" not in ev.protocol("demo", "code").as_dict()  # transformers fingerprints unchanged


def test_a_gguf_whose_file_type_contradicts_the_declared_bits_is_refused(tiny_gguf, tmp_path):
    needs_llama_cpp()
    from quantgate.checkpoints.declared import audit_declared
    from quantgate.errors import LoadAuditError

    q8 = tmp_path / "model-Q8_0.gguf"
    quantize_gguf(tiny_gguf["f16"], q8, "Q8_0")
    assert audit_declared(q8, fmt="gguf", bits=8, group_size=None, desc_act=None, what="tiny/q8")["bits"] == 8
    with pytest.raises(LoadAuditError, match=r"tiny/q8: declared gguf 4-bit in the manifest, but the checkpoint says "
                                             r"gguf 8-bit \(model-Q8_0.gguf: general.file_type 7\): its file type is 8-bit"):
        audit_declared(q8, fmt="gguf", bits=4, group_size=None, desc_act=None, what="tiny/q8")
