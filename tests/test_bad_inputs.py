"""Bad inputs, one case each: the exit code and the words of the message (file and key named), never a
traceback, a silent pass or a write outside the project."""

from pathlib import Path

import pytest

from quantgate.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = (REPO / "quantgate.toml").read_text()


def project(tmp_path: Path, text: str) -> Path:
    text = text.replace('baselines = "baselines"', f'baselines = "{tmp_path / "baselines"}"')
    text = text.replace('zoo_dir = "build/zoo"', f'zoo_dir = "{tmp_path / "zoo"}"')
    (tmp_path / "fixtures").symlink_to(REPO / "fixtures")
    path = tmp_path / "quantgate.toml"
    path.write_text(text)
    return path


def swap(old: str, new: str, count: int = 1) -> str:
    assert old in DEMO, old
    return DEMO.replace(old, new, count)


MANIFEST_CASES = {
    "model name that climbs out of baselines/": (
        DEMO.replace("[models.demo]", '[models."../../x"]').replace("[[models.demo.variants]]", '[[models."../../x".variants]]'),
        ["[models.../../x]", "'../../x' is not a safe name", "part of file paths"]),
    "variant name with a slash": (
        swap('name = "bf16"', 'name = "bf16/../../../escape"'),
        ["name]", "'bf16/../../../escape' is not a safe name"]),
    "recipe key typo (quant_typ)": (
        swap('recipe = { builder = "bitsandbytes", quant_type = "nf4" }', 'recipe = { builder = "bitsandbytes", quant_typ = "fp4" }'),
        [".recipe.quant_typ]", "unknown key(s) quant_typ for builder 'bitsandbytes'", "it reads builder, llm_int8_threshold, quant_type"]),
    "recipe llm_int8_threshold below zero": (
        swap("llm_int8_threshold = 0.0 }", "llm_int8_threshold = -1 }"),
        [".recipe.llm_int8_threshold]", "must be a non-negative number", "got -1"]),
    "variant profiles naming no profile of the manifest": (
        swap('profiles = ["full"]', 'profiles = ["ful"]'),
        [".profiles]", "names profile 'ful'", "known: fast, full"]),
    "recipe quant_type not a bitsandbytes type": (
        swap('quant_type = "nf4" }', 'quant_type = "int3" }'),
        [".recipe.quant_type]", "must be one of nf4, fp4; got 'int3'"]),
    "recipe samples not a number": (
        swap("samples = 64,", 'samples = "many",'),
        [".recipe.samples]", "must be a positive integer, got 'many'"]),
    "max_length = 1": (
        swap("max_length = 256", "max_length = 1"),
        ["max_length]", "must be at least 2 (a window of 1 token predicts nothing)"]),
    "max_drop that is not a number": (
        swap('recipe = { builder = "transformers", dtype = "bfloat16" }',
             'recipe = { builder = "transformers", dtype = "bfloat16" }\nmax_drop = { code = "x" }'),
        [".max_drop.code]", "must be a number of score points between 0 and 1, got 'x'"]),
    "tokenizer option that is neither own nor reference": (
        swap('recipe = { builder = "transformers", dtype = "bfloat16" }',
             'recipe = { builder = "transformers", dtype = "bfloat16" }\ntokenizer = "mine"'),
        [".tokenizer]", "'mine'", "own", "reference"]),
    "corpus name with a path separator": (
        DEMO.replace("[corpora.code]", '[corpora."code/../../x"]'),
        ["[corpora.code/../../x]", "is not a safe name"]),
}


@pytest.mark.parametrize("text, words", MANIFEST_CASES.values(), ids=MANIFEST_CASES.keys())
def test_a_bad_manifest_is_a_usage_error_naming_file_and_key(tmp_path, capsys, text, words):
    path = project(tmp_path, text)
    assert main(["protocol", "--manifest", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quantgate: error: {path}: [") and "Traceback" not in err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "baselines").exists()


def test_zoo_build_of_an_unknown_variant_says_so_instead_of_doing_nothing(tmp_path, capsys):
    path = project(tmp_path, DEMO)
    assert main(["zoo", "build", "--manifest", str(path), "--variant", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "--variant nosuch: no recipe variant of that name; recipe variants: awq-w4g128, bf16," in err
    assert not (tmp_path / "zoo").exists()


OPTION_CASES = {
    "profile typo": (["--quality-profile", "fsat"],
                     "--quality-profile 'fsat': the manifest has no such profile (its profiles: fast, full)"),
    "device name": (["--quality-device", "gpu"], "--quality-device 'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
}


@pytest.mark.parametrize("bisect", [False, True], ids=["plain", "bisect"])
@pytest.mark.parametrize("args, words", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_a_bad_option_value_is_a_usage_error_before_anything_runs(args, words, bisect):
    """Not "baseline missing" or a load failure (exit 1: every commit bad under bisect): a usage error
    naming the valid values, and under --quality-bisect exit 255, which makes git abort the bisection."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "quality", str(REPO / "quality_tests"), "-p",
                           "no:cacheprovider", *args, *(["--quality-bisect"] if bisect else [])],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == (255 if bisect else 4), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert "collected" not in proc.stdout  # stopped at configure: nothing collected, built or measured


CORPUS_CASES = {
    "zero-byte corpus file": (b"", "corpus 'tiny': {file} is empty"),
    "corpus that is not UTF-8": (b"def f():\n    return '\xff\xfe'\n", "corpus 'tiny': {file} is not UTF-8 text (byte 0xff at offset 21)"),
    "one-token corpus": (b"x\n", "corpus 'tiny' (text[train] files=.:tiny.txt) gives 1 token(s) with demo's tokenizer: "
                                  "nothing to score (a prediction needs 2 tokens)"),
    "corpus shorter than ten windows": (b"def f(x):\n    return x + 1\n" * 50,
                                        "gives 598 token(s) with demo's tokenizer: 597 scored in 4 window(s) of "
                                        "max_length 256, stride 128. The gate "
                                        "needs at least 10 windows to put a confidence interval on a change"),
}


def tiny_corpus_project(tmp_path: Path, content: bytes) -> Path:
    (tmp_path / "tiny.txt").write_bytes(content)
    text = DEMO.replace("[corpora.code]", '[corpora.tiny]\npath = "text"\ndata_files = ["tiny.txt"]\nsplit = "train"\n\n'
                                          "[corpora.code]")
    return project(tmp_path, text.replace('corpora = ["code", "prose"]', 'corpora = ["code", "prose", "tiny"]'))


@pytest.mark.parametrize("content, words", CORPUS_CASES.values(), ids=CORPUS_CASES.keys())
def test_a_bad_corpus_is_named_with_its_file(tmp_path, capsys, content, words):
    path = tiny_corpus_project(tmp_path, content)
    assert main(["baseline", "--manifest", str(path), "--corpus", "tiny", "--profile", "fast",
                 "--backend", "transformers"]) == 2
    err = capsys.readouterr().err
    assert words.format(file=tmp_path / "tiny.txt") in err and "Traceback" not in err
    assert list((tmp_path / "baselines").rglob("*.json")) == []


def test_baselines_that_cannot_be_written_are_refused_before_measuring(tmp_path, capsys):
    path = tiny_corpus_project(tmp_path, b"def f(x):\n    return x + 1\n" * 50)
    (tmp_path / "baselines").write_text("a file where the baselines directory should be")
    assert main(["baseline", "--manifest", str(path), "--corpus", "tiny", "--profile", "fast"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'baselines'}: baselines cannot be written there" in err and "nothing was measured" in err


DECLARED_CASES = {
    "the FP16 reference declared as GPTQ 4-bit": (
        "fixtures/demo_zoo/reference", 'format = "gptq"\nbits = 4\ngroup_size = 128',
        "declared gptq 4-bit, group size 128 in the manifest, but the checkpoint says no quantization "
        "(REF/config.json (no quantization_config)): its quantization method is none"),
    "AutoGPTQ 4-bit declared as 8-bit": (
        "fixtures/legacy/autogptq-w4g128", 'format = "gptq"\nbits = 8',
        "declared gptq 8-bit in the manifest, but the checkpoint says gptq 4-bit, group size 128 "
        "(quantization_config): its bits are 4"),
    "GPTQ group size 128 declared as 64": (
        "fixtures/legacy/autogptq-w4g128", 'format = "gptq"\nbits = 4\ngroup_size = 64', "its group size is 128"),
    "compressed-tensors declared as AWQ": (
        "fixtures/llmcompressor/w4a16-g128", 'format = "awq"\nbits = 4',
        "but the checkpoint says compressed-tensors 4-bit, group size 128 (quantization_config.config_groups): "
        "its quantization method is 'compressed-tensors'"),
    "a GPTQ checkpoint declared as plain FP16": (
        "fixtures/legacy/autoawq-w4g128", 'format = "fp16"\nbits = 16', "it is quantized (awq)"),
}


@pytest.mark.parametrize("checkpoint, declared, words", DECLARED_CASES.values(), ids=DECLARED_CASES.keys())
def test_a_checkpoint_that_contradicts_its_declared_format_is_refused(tmp_path, checkpoint, declared, words):
    from quantgate.errors import LoadAuditError
    from quantgate.evaluation import Evaluator
    from quantgate.manifest import load_manifest

    head = DEMO[:DEMO.index("[[models.demo.variants]]")]
    path = project(tmp_path, head + f'[[models.demo.variants]]\nname = "v"\n{declared}\npath = "{checkpoint}"\n')
    ev = Evaluator(manifest=load_manifest(path), profile="fast", device="cpu")
    with pytest.raises(LoadAuditError) as refused:
        ev.checkpoint("demo", "v")
    assert str(refused.value).startswith("variant demo/v: declared ")
    assert words.replace("REF", str(tmp_path / "fixtures" / "demo_zoo" / "reference")) in str(refused.value)
