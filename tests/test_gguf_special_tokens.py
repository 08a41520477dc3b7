"""A GGUF whose tokenizer differs from the reference's only in which tokens are special.

Written with `tokenizer.ggml.unknown_token_id` pointing at an ordinary token ("!"), transformers'
GGUF tokenizer treats "!" as special and splits "!=" differently. Both backends' audits must
refuse it the same way, say which token is special in one and not the other, and point at the
per-variant option that scores with the reference's tokenizer (the vocabularies being identical
string for string), which the record then states.
"""

from pathlib import Path

import pytest

from quantgate.checks import Case, Gate
from quantgate.errors import TokenizerMismatch
from quantgate.evaluation import Evaluator
from quantgate.manifest import load_manifest
from quantgate.report import RunReport
from quantgate.thresholds import load_table

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "fixtures" / "demo_zoo" / "reference"


@pytest.fixture(scope="module")
def gguf_with_unk_on_bang(tmp_path_factory):
    import gguf

    from quantgate.checkpoints.gguf_build import write_f16_gguf

    out = tmp_path_factory.mktemp("unk") / "model-F16.gguf"
    bang = __import__("json").loads((REFERENCE / "tokenizer.json").read_text())["model"]["vocab"]["!"]
    original = gguf.GGUFWriter.add_add_bos_token

    def add_add_bos_token(self, value):
        original(self, value)
        self.add_unk_token_id(bang)  # an ordinary token named the unknown token

    gguf.GGUFWriter.add_add_bos_token = add_add_bos_token
    try:
        write_f16_gguf(REFERENCE, out)
    finally:
        gguf.GGUFWriter.add_add_bos_token = original
    return out, bang


def project(tmp_path, path, **extra):
    text = (REPO / "quantgate.toml").read_text()
    head = text[:text.index("[[models.demo.variants]]")]
    head = head.replace('baselines = "baselines"', f'baselines = "{REPO / "baselines"}"')
    head = head.replace('zoo_dir = "build/zoo"', f'zoo_dir = "{REPO / "build" / "zoo"}"')
    head = head.replace('"fixtures/', f'"{REPO / "fixtures"}/')
    options = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in extra.items())
    blocks = "".join(f'\n[[models.demo.variants]]\nname = "f16{suffix}"\nformat = "gguf"\nbits = 16\npath = "{path}"\n'
                     f'max_ratio = 1.01\n{backend}{options}' for suffix, backend in (("", ""), ("-llamacpp", 'backend = "llama.cpp"\n')))
    (tmp_path / "quantgate.toml").write_text(head + blocks)
    report = RunReport(profile="fast", device="cpu")
    manifest = load_manifest(tmp_path / "quantgate.toml")
    return Gate(Evaluator(manifest=manifest, profile="fast", device="cpu"), load_table(), report), report


@pytest.mark.parametrize("variant", ["f16", "f16-llamacpp"])
def test_both_backends_refuse_it_naming_the_token_and_the_remedy(tmp_path, gguf_with_unk_on_bang, variant):
    path, bang = gguf_with_unk_on_bang
    gate, _ = project(tmp_path, path)
    with pytest.raises(TokenizerMismatch) as refused:
        gate.relative_perplexity(Case("demo", variant, "code"))
    message = str(refused.value)
    assert f"token {bang} '!'" in message
    assert "special in" in message and "tokenizer.ggml.unknown_token_id" in message
    assert "ordinary in the reference tokenizer" in message
    assert 'tokenizer = "reference"' in message


@pytest.mark.parametrize("variant", ["f16", "f16-llamacpp"])
def test_with_the_reference_tokenizer_it_is_scored_and_the_record_says_so(tmp_path, gguf_with_unk_on_bang, variant):
    path, _ = gguf_with_unk_on_bang
    gate, report = project(tmp_path, path, tokenizer="reference")
    gate.relative_perplexity(Case("demo", variant, "code"))
    (record,) = report.records
    assert record.verdict == "pass" and abs(record.ratio - 1.0) < 1e-3
    assert record.tokenizer.startswith("reference") and "'!'" in record.tokenizer


@pytest.fixture(scope="module")
def plain_gguf(tmp_path_factory):
    from quantgate.checkpoints.gguf_build import write_f16_gguf

    out = tmp_path_factory.mktemp("plain") / "model-F16.gguf"
    write_f16_gguf(REFERENCE, out)
    return out


@pytest.mark.parametrize("variant", ["f16", "f16-llamacpp"])
def test_a_resident_checkpoint_is_audited_once_per_corpus_not_once_per_check(tmp_path, plain_gguf, variant,
                                                                               monkeypatch):
    """The vocabulary read from the file once per load, the corpus cut by its own tokenizer once per corpus:
    the perplexity, KL and top-1 checks of a corpus and the model's tasks all come after the same audit."""
    import quantgate.checkpoints.tokenizer_audit as audit_module
    import quantgate.residency as residency_module

    counts = {"vocabulary": 0, "tokenize": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(audit_module, "gguf_vocabulary", counted("vocabulary", audit_module.gguf_vocabulary))
    monkeypatch.setattr(residency_module, "tokenize", counted("tokenize", residency_module.tokenize))
    gate, _ = project(tmp_path, plain_gguf)
    ev = gate.evaluator
    loaded = ev.checkpoint("demo", variant)
    for corpus in ("code", "prose", "code", None, None, "prose"):  # corpus checks, then the tasks' (no corpus)
        ev.residency.check_tokenizer("demo", variant, loaded, corpus)
    assert counts["vocabulary"] == 1
    assert counts["tokenize"] == (0 if loaded.tokenizer is None else 2)  # llama.cpp scores the reference's ids
    assert loaded.description["tokenizer"] == "own"
    ev.release()
    loaded = ev.checkpoint("demo", variant)  # loaded again: audited again
    ev.residency.check_tokenizer("demo", variant, loaded, "code")
    assert counts["vocabulary"] == 2


def test_a_refused_tokenizer_is_refused_by_every_check_of_the_variant(tmp_path, gguf_with_unk_on_bang):
    path, _ = gguf_with_unk_on_bang
    gate, _ = project(tmp_path, path)
    ev = gate.evaluator
    loaded = ev.checkpoint("demo", "f16")
    for corpus in ("code", "code", None):
        with pytest.raises(TokenizerMismatch):
            ev.residency.check_tokenizer("demo", "f16", loaded, corpus)


@pytest.mark.parametrize("variant", ["f16", "f16-llamacpp"])
def test_a_gguf_header_is_parsed_once_for_the_audits_and_the_description(tmp_path, plain_gguf, variant):
    """The declared-format audit, the description's tensor types and the tokenizer audit read one parse of the
    file (a parse walks the whole vocabulary); a file written again under the same name is parsed again."""
    import shutil

    from quantgate.checkpoints import gguf_build

    copy = tmp_path / "model-F16.gguf"
    shutil.copy(plain_gguf, copy)
    gate, _ = project(tmp_path, copy)
    ev = gate.evaluator
    gguf_build._reader.cache_clear()
    loaded = ev.checkpoint("demo", variant)
    ev.residency.check_tokenizer("demo", variant, loaded, "code")
    assert gguf_build._reader.cache_info().misses == 1
    assert loaded.description["tokenizer"] == "own" and loaded.description["gguf_tensor_types"]
    ev.release()
    copy.write_bytes(b"GGUF" + b"\0" * 8)  # rewritten: not the file parsed before
    with pytest.raises(Exception, match="model-F16.gguf"):
        ev.checkpoint("demo", variant)
