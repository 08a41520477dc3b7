"""Every manifest snippet in the README and docs/ is read by the real manifest loader, so the docs
cannot drift from the code. A snippet without a model of its own (a fragment such as the task
tables) is read merged into the complete manifest shown before it in the same file, or else into
the README's (its "Your own model" manifest)."""

import copy
import re
import sys
from pathlib import Path

import pytest

from quantgate.manifest import parse_manifest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```toml\n(.*?)^```", re.S | re.M)


def snippets():
    for doc in DOCS:
        for i, match in enumerate(BLOCK.finditer(doc.read_text(encoding="utf-8"))):
            line = doc.read_text(encoding="utf-8")[:match.start()].count("\n") + 1
            yield pytest.param(doc, i, match.group(1), id=f"{doc.relative_to(REPO)}:{line}")


def merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def complete(raw: dict) -> bool:
    return any(isinstance(m, dict) and "path" in m for m in raw.get("models", {}).values())


PYTHON = re.compile(r"^```python\n# (\w+)\.py\b.*?\n(.*?)^```", re.S | re.M)


def plugin_source(doc: Path, name: str) -> str:
    """A ```python block of the doc that begins with "# <name>.py": the plugin module a snippet names."""
    found = [m.group(2) for m in PYTHON.finditer(doc.read_text(encoding="utf-8")) if m.group(1) == name]
    return found[0] if found else ""


def test_the_docs_show_manifest_snippets():
    assert len(list(snippets())) >= 2


@pytest.mark.parametrize("doc, index, text", list(snippets()))
def test_a_manifest_snippet_loads(tmp_path, monkeypatch, doc, index, text):
    from quantgate.tasks import kinds

    kinds.task_kind_names()
    raw = tomllib.loads(text)
    if not complete(raw):
        earlier = [tomllib.loads(m.group(1)) for m in list(BLOCK.finditer(doc.read_text(encoding="utf-8")))[:index]]
        readme = [tomllib.loads(m.group(1)) for m in BLOCK.finditer((REPO / "README.md").read_text(encoding="utf-8"))]
        bases = [r for r in readme + earlier if complete(r)]
        assert bases, f"{doc.name} snippet {index} is a fragment with no complete manifest before it"
        raw = merged(bases[-1], raw)
    for name in raw.get("quantgate", {}).get("plugins", []):  # the module as the doc shows it, else an empty one
        (tmp_path / f"{name}.py").write_text(plugin_source(doc, name))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(kinds, "_REGISTRY", dict(kinds._REGISTRY))
    manifest = parse_manifest(raw, tmp_path / "quantgate.toml")
    assert manifest.models


def test_the_readme_stays_short():
    """Purpose, the two commands, a short demo summary, own model, CI, bisect, links; the rest is in docs/."""
    assert len((REPO / "README.md").read_text(encoding="utf-8")) < 20_000


def test_the_readme_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (REPO / target).exists(), target
