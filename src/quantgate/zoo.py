"""Variants built from recipes, cached by recipe hash.

A variant with a `recipe` and no `path` lives in <zoo_dir>/<model>/<variant>-<hash12>/, where
the hash covers everything that shapes the result: the recipe, the variant's quantization
fields, the reference checkpoint's bytes, the calibration text and the builder's version.
Change any of them and the variant is rebuilt (by `quantgate zoo build`, or on first use).

Each build record carries a digest of the weights it wrote (`weights_digest`). The digests that a
model's committed numbers (baselines, docs/demo.md) were made with are kept in
<baselines>/<model>/builds.json (`quantgate zoo build --record`); `quantgate zoo build` and the run's
summary say when this machine's build differs from them, since its numbers then differ too.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path

from .baselines import checkpoint_sha256, file_sha256
from .checkpoints.gguf_build import QUANT_FTYPES as QUANT_TYPES
from .errors import BackendUnavailable, ManifestError, QuantgateError
from .manifest import Manifest, ReferenceModel, Variant

BUILDERS = {"gptqmodel": "gptqmodel", "llama.cpp": "llama-cpp-python", "bitsandbytes": "bitsandbytes",
            "transformers": "transformers"}  # -> package
BUILDER_EXTRAS = {"gptqmodel": "gptq", "llama.cpp": "llamacpp", "bitsandbytes": "bnb", "transformers": "eval"}
CAST_DTYPES = ("bfloat16", "float16", "float32")
CAST_BUILDERS = ("transformers",)  # builders that copy the reference in another dtype
RECIPE_FILE = "quantgate-recipe.json"
GGUF_WRITER = "quantgate.write_f16_gguf/v1"  # bump when the F16 conversion changes
RECORDED_BUILDS = "builds.json"


_CALIBRATION_CORPORA: dict[tuple, object] = {}  # read once per process: every recipe's identity hashes its text


def _calibration_corpus(manifest: Manifest, recipe: dict):
    from .corpus import load_corpus

    name = recipe.get("calibration")
    if name not in manifest.corpora:
        raise ManifestError(manifest.path, "recipe.calibration", f"names corpus {name!r}, which [corpora] does not define")
    key = (str(manifest.path), repr(manifest.corpora[name]), _files_state(manifest.corpora[name]))
    if key not in _CALIBRATION_CORPORA:
        _CALIBRATION_CORPORA[key] = load_corpus(manifest.corpora[name])
    return _CALIBRATION_CORPORA[key]


_CALIBRATION_IDS: dict[tuple, list[int]] = {}  # (manifest, model, its tokenizer files, corpus) -> token ids, per process


def _files_state(spec) -> tuple:
    """The corpus's local files as they are now (path, size, mtime): a file changed in between is read again."""
    from .corpus import resolve_data_files

    if not spec.data_files:
        return ()
    try:
        files = resolve_data_files(spec)
    except QuantgateError:
        return ()  # load_corpus names the missing file
    return tuple((f, st.st_size, st.st_mtime_ns) for f in files for st in [Path(f).stat()])


def _calibration_ids(manifest: Manifest, ref: ReferenceModel, recipe: dict) -> list[int]:
    """The calibration corpus in the reference's tokens, read and tokenized once per process: the recipes
    of a run that share a calibration corpus share its tokens."""
    corpus = _calibration_corpus(manifest, recipe)
    tokenizer_files = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(ref.path).glob("*token*")))
    key = (str(manifest.path), ref.name, str(ref.path), tokenizer_files, corpus.text_sha256)
    if key not in _CALIBRATION_IDS:
        from .checkpoints.loading import load_tokenizer
        from .corpus import encode_long

        _CALIBRATION_IDS[key] = encode_long(load_tokenizer(ref.path), corpus.text)["input_ids"]
    return _CALIBRATION_IDS[key]


def _calibration_chunks(manifest: Manifest, ref: ReferenceModel, recipe: dict) -> list[list[int]]:
    """Token-id chunks of the calibration corpus, cut with the reference tokenizer."""
    name = recipe.get("calibration")
    ids = _calibration_ids(manifest, ref, recipe)
    samples, seq_len = int(recipe.get("samples", 128)), int(recipe.get("seq_len", 256))
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:samples]
    if len(chunks) < samples:
        raise QuantgateError(f"calibration corpus {name!r} gives {len(chunks)} chunks of {seq_len} tokens, "
                             f"the recipe asks for {samples}")
    return chunks


def _builder_version(builder: str) -> str:
    try:
        return metadata.version(BUILDERS[builder])
    except metadata.PackageNotFoundError:
        raise BackendUnavailable(f"recipe builder {builder!r} needs {BUILDERS[builder]}, which is not installed "
                                 f"(pip install 'quantgate[{BUILDER_EXTRAS[builder]}]')") from None


def recipe_identity(manifest: Manifest, ref: ReferenceModel, variant: Variant) -> dict:
    recipe = dict(variant.recipe or {})
    builder = recipe.get("builder")
    if builder not in BUILDERS:
        raise ManifestError(manifest.path, f"models.{ref.name}.variants[{variant.name}].recipe.builder",
                            f"must be one of {', '.join(BUILDERS)}; got {builder!r}")
    reference_sha256 = checkpoint_sha256(ref.path)
    identity = {
        "recipe": recipe,
        "format": variant.format, "bits": variant.bits, "group_size": variant.group_size,
        "desc_act": variant.desc_act,
        "reference_sha256": reference_sha256,
        "builder_version": _builder_version(builder),
    }
    _IDENTITY[builder](manifest, ref, variant, recipe, identity)
    return identity


def _where(ref: ReferenceModel, variant: Variant) -> str:
    return f"models.{ref.name}.variants[{variant.name}].recipe"


def _gptq_identity(manifest, ref, variant, recipe, identity) -> None:
    from .checkpoints.gptq_build import build_numerics

    identity["calibration_text_sha256"] = _calibration_corpus(manifest, recipe).text_sha256
    identity["numerics"] = build_numerics(variant.format)


def _bnb_identity(manifest, ref, variant, recipe, identity) -> None:
    if variant.format != "bnb" or variant.bits not in (4, 8):
        raise ManifestError(manifest.path, _where(ref, variant), "builder bitsandbytes makes bnb variants of 8 or 4 bits")
    if variant.bits != 8 and recipe.get("llm_int8_threshold") is not None:
        raise ManifestError(manifest.path, _where(ref, variant) + ".llm_int8_threshold",
                            "is LLM.int8()'s outlier threshold: 8-bit variants only")
    identity["storage_dtype"] = "float16"  # see bnb_build.build_bnb


def _cast_identity(manifest, ref, variant, recipe, identity) -> None:
    """A dtype copy of the reference (the noise floor)."""
    if recipe.get("dtype") not in CAST_DTYPES or variant.format not in ("bf16", "fp16", "fp32"):
        raise ManifestError(manifest.path, _where(ref, variant),
                            f"builder transformers casts the reference to dtype one of {', '.join(CAST_DTYPES)} "
                            "(format bf16, fp16 or fp32)")


def _gguf_identity(manifest, ref, variant, recipe, identity) -> None:
    """llama.cpp quantizes the F16 GGUF that gguf-py writes from the reference."""
    if variant.format != "gguf" or recipe.get("type") not in QUANT_TYPES:
        raise ManifestError(manifest.path, _where(ref, variant),
                            f"builder llama.cpp makes gguf variants with type one of {', '.join(QUANT_TYPES)}")
    identity["f16_gguf"] = _f16_identity(identity["reference_sha256"])


# recipe builder -> what its identity adds (and checks) beyond the recipe itself
_IDENTITY = {"gptqmodel": _gptq_identity, "bitsandbytes": _bnb_identity, "transformers": _cast_identity,
             "llama.cpp": _gguf_identity}


def _f16_identity(reference_sha256: str) -> dict:
    return {"reference_sha256": reference_sha256, "writer": GGUF_WRITER,
            "gguf": metadata.version("gguf")}


def reference_gguf(manifest: Manifest, ref: ReferenceModel, reference_sha256: str | None = None) -> Path:
    """The F16 GGUF the llama.cpp backend scores as the reference: the manifest's `gguf`, or one
    written from the reference checkpoint by gguf-py, cached by the reference's hash (pass it
    when known: hashing a real checkpoint reads gigabytes)."""
    if ref.gguf is not None:
        return ref.gguf
    try:
        identity = _f16_identity(reference_sha256 or checkpoint_sha256(ref.path))
    except metadata.PackageNotFoundError:
        raise BackendUnavailable("writing the F16 GGUF reference needs gguf (pip install 'quantgate[gguf]')") from None
    out = manifest.zoo_dir / ref.name / f"gguf-F16-{recipe_hash(identity)[:12]}"
    target = out / "model-F16.gguf"
    if (out / RECIPE_FILE).is_file():
        return target
    from filelock import FileLock

    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / RECIPE_FILE).is_file():
            from .checkpoints.gguf_build import write_f16_gguf

            print(f"quantgate: writing the F16 GGUF of {ref.name} -> {target}", file=sys.stderr, flush=True)
            record = write_f16_gguf(ref.path, target)
            record.update(identity=identity)
            (out / RECIPE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return target


def recipe_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _entry_name(variant: Variant, identity: dict) -> str:
    # GGUF variants that differ only in the scoring backend share one file.
    label = f"gguf-{variant.recipe['type']}" if variant.format == "gguf" else variant.name
    return f"{label}-{recipe_hash(identity)[:12]}"


def built_dir(manifest: Manifest, ref: ReferenceModel, variant: Variant) -> Path:
    return manifest.zoo_dir / ref.name / _entry_name(variant, recipe_identity(manifest, ref, variant))


class BuildBusy(Exception):
    """Another process holds the entry's lock: it is building that variant now (build_variant(wait=False))."""


def build_variant(manifest: Manifest, ref: ReferenceModel, variant: Variant, *, force: bool = False,
                  wait: bool = True) -> tuple[Path, dict | None]:
    """Build one recipe variant unless its cache entry exists; returns (dir, build record or None). With
    wait=False, raises BuildBusy instead of waiting while another process builds it."""
    identity = recipe_identity(manifest, ref, variant)
    out = manifest.zoo_dir / ref.name / _entry_name(variant, identity)
    if (out / RECIPE_FILE).is_file() and not force:
        return out, None
    from filelock import FileLock, Timeout

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out) + ".lock")  # two runs (a gate and `zoo build`) must not build the same entry
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        raise BuildBusy(str(out)) from None
    try:
        if (out / RECIPE_FILE).is_file() and not force:
            return out, None
        return out, _build(manifest, ref, variant, out, identity)
    except (QuantgateError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the builder's own failure: not a verdict on the variant
        from .errors import BuildFailed

        raise BuildFailed(f"{ref.name}/{variant.name}: its recipe build failed ({type(exc).__name__}: {exc}); this "
                          f"says nothing about its quality. See the builder's output with `quantgate zoo build "
                          f"--model {ref.name} --variant {variant.name} --force`") from exc
    finally:
        lock.release()


def _build(manifest: Manifest, ref: ReferenceModel, variant: Variant, out: Path, identity: dict) -> dict:
    if out.exists():  # an interrupted or forced build: start clean
        import shutil

        shutil.rmtree(out)
    record = _run_builder(manifest, ref, variant, out, identity)
    record.update(identity=identity, weights_digest=weights_digest(out))
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def _run_builder(manifest: Manifest, ref: ReferenceModel, variant: Variant, out: Path, identity: dict) -> dict:
    print(f"quantgate: building {ref.name}/{variant.name} ({variant.format} {variant.bits}-bit) -> {out}",
          file=sys.stderr, flush=True)
    if variant.format == "gguf":
        from .checkpoints.gguf_build import quantize_gguf

        qtype = variant.recipe["type"]
        f16 = reference_gguf(manifest, ref, identity["reference_sha256"])
        out.mkdir(parents=True)
        record = quantize_gguf(f16, out / f"model-{qtype}.gguf", qtype)
        record.update(f16_gguf=str(f16))
        return record
    if variant.recipe.get("builder") in CAST_BUILDERS:
        from .checkpoints.cast_build import build_cast

        return build_cast(ref.path, out, dtype=variant.recipe["dtype"])
    if variant.format == "bnb":
        from .checkpoints.bnb_build import build_bnb

        return build_bnb(ref.path, out, bits=variant.bits, quant_type=variant.recipe.get("quant_type", "nf4"),
                         llm_int8_threshold=variant.recipe.get("llm_int8_threshold"))
    chunks = _calibration_chunks(manifest, ref, variant.recipe)
    from .checkpoints import gptq_build

    builders = {"gptq": gptq_build.build_gptq, "awq": gptq_build.build_awq}
    if variant.format not in builders:
        raise ManifestError(manifest.path, f"models.{ref.name}.variants[{variant.name}].recipe",
                            f"builder gptqmodel makes {'/'.join(builders)} variants, not {variant.format!r}")
    return builders[variant.format](ref.path, out, bits=variant.bits, group_size=variant.group_size or 128,
                                    desc_act=bool(variant.desc_act), calibration_texts=chunks,
                                    seed=int(variant.recipe.get("seed", 0)))


def variant_path(manifest: Manifest, ref: ReferenceModel, variant: Variant) -> Path:
    """Where the variant's checkpoint is; recipe variants are built on first use."""
    if variant.path is not None:
        return variant.path
    path, _ = build_variant(manifest, ref, variant)
    return path


# -- what a build wrote, against what the committed numbers were made with -------------------------
def weights_digest(path: Path) -> str:
    """sha256 over the weight files of a build: each safetensors file's tensors (its header without the
    free-form __metadata__, then the data), each GGUF or .bin file whole. Config files are left out
    (they carry paths and library versions, not weights)."""
    import hashlib

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.is_file() and p.suffix in {".safetensors", ".gguf", ".bin"})
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        if p.suffix != ".safetensors":
            digest.update(file_sha256(p).encode())
            continue
        with open(p, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
            header.pop("__metadata__", None)
            digest.update(json.dumps(header, sort_keys=True).encode())
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def recorded_builds_path(manifest: Manifest, model: str) -> Path:
    return manifest.baselines_dir / model / RECORDED_BUILDS


def read_recorded_builds(manifest: Manifest, model: str) -> dict:
    path = recorded_builds_path(manifest, model)
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
        return dict(doc["variants"])
    except (ValueError, KeyError, TypeError) as exc:
        raise QuantgateError(f"{path}: not a record of builds ({exc}); rewrite it with "
                             f"quantgate zoo build --model {model} --record") from None


def build_record(path: Path) -> dict | None:
    record_file = Path(path) / RECIPE_FILE
    return json.loads(record_file.read_text()) if record_file.is_file() else None


def compare_with_recorded(manifest: Manifest, ref: ReferenceModel, variant: Variant, path: Path) -> tuple[str, str]:
    """(status, words) for the build at `path` against <baselines>/<model>/builds.json: status is
    "same", "differs", "recipe changed", "not recorded" or "no digest"."""
    record = build_record(path) or {}
    digest = record.get("weights_digest")
    if digest is None:
        return "no digest", "built before builds recorded a weights digest; rebuild with quantgate zoo build --force"
    recorded = read_recorded_builds(manifest, ref.name).get(variant.name)
    if recorded is None:
        return "not recorded", f"weights {digest[:12]}; no recorded build to compare with"
    where = recorded.get("machine", "another machine")
    identity = record.get("identity", {})
    if recorded.get("recipe_hash") != recipe_hash(identity):
        was = recorded.get("identity", {})
        changed = sorted(k for k in set(was) | set(identity) if was.get(k) != identity.get(k)) or ["recipe"]
        return "recipe changed", (f"weights {digest[:12]}; built from other inputs than the recorded build "
                                  f"({recorded['weights_digest'][:12]}, {where}): {', '.join(changed)} differ, so "
                                  "its numbers differ from those made with it")
    if recorded["weights_digest"] != digest:
        return "differs", (f"weights {digest[:12]} differ from the recorded build's {recorded['weights_digest'][:12]} "
                           f"({where}): the same recipe built differently on this machine, so its numbers differ "
                           "from those made with the recorded build (docs/demo.md \"Builds across machines\")")
    return "same", f"weights {digest[:12]}, the recorded build's"


def record_builds(manifest: Manifest, ref: ReferenceModel, built: dict[str, Path]) -> Path:
    """Write the digests of `built` (variant name -> build dir) into <baselines>/<model>/builds.json,
    keeping the entries of variants not named."""
    import platform

    from .baselines import _atomic_write, now_iso

    entries = read_recorded_builds(manifest, ref.name)
    machine = _cpu_name() or platform.machine()
    for name, path in built.items():
        record = build_record(path)
        if record is None or "weights_digest" not in record:
            raise QuantgateError(f"{path}: no build record with a weights digest; rebuild it with quantgate zoo build "
                                 f"--model {ref.name} --variant {name} --force")
        entries[name] = {"weights_digest": record["weights_digest"], "recipe_hash": recipe_hash(record["identity"]),
                         "machine": machine, "recorded": now_iso(), "identity": record["identity"]}
    path = recorded_builds_path(manifest, ref.name)
    doc = {"what": "weights digests of the recipe builds that this model's baselines and documented numbers were "
                   "made with (quantgate zoo build --record)",
           "variants": dict(sorted(entries.items()))}
    _atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
