"""The manifest, `quantgate.toml`: reference models, their quantized variants, corpora, protocol.

Parsing is strict: an unknown key, a wrong type or a dangling reference is a `ManifestError`
that names the file and the key, because a typo in a gate's configuration must not silently
change what is measured.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .backends import DEFAULT_BACKEND, backend_names, get_backend
from .errors import ManifestError
from .placement import Placement, parse_placement

MANIFEST_NAME = "quantgate.toml"
DTYPES = ("float32", "float16", "bfloat16")
KNOWN_FORMATS = ("fp16", "bf16", "fp32", "gptq", "awq", "gguf", "bnb", "compressed-tensors")


@dataclass(frozen=True)
class ProtocolSettings:
    max_length: int = 1024
    stride: int = 512
    dtype: str = "float32"
    batch_size: int = 8
    add_bos: bool = False
    token_cap: int | None = None
    # Reference log-probs kept per scored token for KL divergence; not part of the protocol
    # (perplexity does not depend on it): the baseline records it and a change is refused there.
    top_k: int = 8
    task_items: int | None = None  # the first N items of each task (a tier's cap); part of each task's protocol
    preset: str = "hf-sliding"  # the scoring rule (presets.py): hf-sliding, lm-eval, gptq-paper or llama.cpp


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    path: str  # a `datasets` builder ("json", "text") or a hub dataset id ("wikitext")
    config: str | None = None
    split: str = "test"
    revision: str | None = None
    data_files: tuple[str, ...] = ()
    package: str | None = None  # resolve data_files inside this installed package
    text: str = "{text}"  # format template over each record's fields
    joiner: str = "\n\n"
    sample_by: str | None = None  # for the "text" builder: "line" | "paragraph" | "document"
    description: str = ""
    base_dir: Path = Path(".")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    schema: str
    capability: str  # what the score stands for (code, prose, knowledge, math ...); its max drop is in the table
    source: CorpusSpec  # where the records come from: the same keys as a corpus
    shots: int = 0
    shots_split: str | None = None  # the split holding the solved examples (MMLU/C-Eval "dev", GSM8K "train")
    scoring: str = "acc"
    max_new_tokens: int = 32
    limit: int | None = None  # the first N items only

    @property
    def kind(self) -> str:
        """The family of its task kind (tasks/kinds.py): multiple_choice, generation, execution or custom."""
        from .tasks.kinds import task_kind

        return task_kind(self.schema).family


@dataclass(frozen=True)
class Variant:
    name: str
    format: str
    bits: int
    group_size: int | None = None
    desc_act: bool | None = None
    scheme: str | None = None  # e.g. W4A16 (weight-only) or W8A8
    outlier_handling: str | None = None
    calibration: str | None = None
    path: Path | None = None
    recipe: dict[str, Any] | None = None
    max_ratio: float | None = None
    reversal_tolerance: float | None = None
    backend: str = DEFAULT_BACKEND
    max_kl: float | None = None  # overrides of the table's KL divergence / top-1 agreement bounds
    min_top1: float | None = None
    max_drop: dict[str, float] = field(default_factory=dict)  # capability -> override of the table's max task drop
    # "own": a checkpoint's own tokenizer must cut the corpora as the reference's does; "reference": score it
    # with the reference's tokenizer (allowed when the vocabularies are identical string for string; recorded)
    tokenizer: str = "own"
    placement: Placement = Placement()  # its own keys; Workspace.placement adds its model's
    # the profiles that measure it (e.g. ["full"]: out of the CI tier); None: every profile
    profiles: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ReferenceModel:
    name: str
    path: Path
    format: str
    corpora: tuple[str, ...]
    variants: tuple[Variant, ...]
    protocol: ProtocolSettings
    profiles: dict[str, ProtocolSettings]
    thresholds: dict[str, float] = field(default_factory=dict)  # "format/bits" -> max ratio
    reversal_tolerance: float = 0.005
    gguf: Path | None = None  # F16 GGUF of the reference for the llama.cpp backend; None: built from `path`
    tasks: tuple[str, ...] = ()
    placement: Placement = Placement()  # device_map / max_memory / offload_folder, n_gpu_layers ...: placement.py

    def backends(self) -> tuple[str, ...]:
        """The backends whose reference baselines this model needs (transformers always)."""
        from .backends import DEFAULT_BACKEND

        return (DEFAULT_BACKEND, *sorted({v.backend for v in self.variants} - {DEFAULT_BACKEND}))


@dataclass(frozen=True)
class Manifest:
    path: Path
    root: Path
    baselines_dir: Path
    zoo_dir: Path
    default_profile: str
    models: dict[str, ReferenceModel]
    corpora: dict[str, CorpusSpec]
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    table: Path | None = None  # acceptability table; None: the one shipped with quantgate
    exceedance: str = "point"  # "point" | "interval": when a metric beyond its bound fails (gate.py)
    cache_dir: Path | None = None  # token ids of corpora and task texts (tokencache.py); None: memory only
    plugins: tuple[str, ...] = ()  # modules imported on load ([quantgate] plugins)
    # the share of an evaluation corpus's n-grams found in a variant's calibration text at and above which a
    # perplexity reversal on that corpus is attributed to calibrating on it (overlap.py)
    calibration_overlap: float = 0.05

    def profile_names(self) -> list[str]:
        names = {self.default_profile}
        for model in self.models.values():
            names.update(model.profiles)
        return sorted(names)

    def for_profile(self, profile: str) -> Manifest:
        """The manifest as a run of `profile` sees it: without the variants whose `profiles` leave it out."""
        models = {name: dataclasses.replace(m, variants=tuple(v for v in m.variants
                                                              if v.profiles is None or profile in v.profiles))
                  for name, m in self.models.items()}
        return dataclasses.replace(self, models=models)


class _Table:
    """A TOML table being consumed key by key, so leftovers can be reported as unknown."""

    def __init__(self, data: Any, file: Path, where: str):
        if not isinstance(data, dict):
            raise ManifestError(file, where, f"must be a table, got {type(data).__name__}")
        self.data, self.file, self.where = dict(data), file, where

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def take(self, name: str, kind: type | tuple, default: Any = ..., *, choices=None) -> Any:
        if name not in self.data:
            if default is ...:
                raise ManifestError(self.file, self.key(name), "is required")
            return default
        value = self.data.pop(name)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            want = " or ".join(k.__name__ for k in kinds)
            raise ManifestError(self.file, self.key(name), f"must be {want}, got {value!r}")
        if choices is not None and value not in choices:
            raise ManifestError(self.file, self.key(name), f"must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value

    def table(self, name: str) -> "_Table":
        return _Table(self.data.pop(name, {}), self.file, self.key(name))

    def done(self) -> None:
        if self.data:
            unknown = ", ".join(sorted(self.data))
            raise ManifestError(self.file, self.where or "top level", f"unknown key(s): {unknown}")


# Names become path components (baselines/<model>/<corpus>.<profile>.json, build/zoo/<model>/<variant>-...):
# letters, digits, '.', '_' and '-', starting with a letter or digit ("..", "/" and the like are refused).
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# What each recipe builder reads; any other key is a typo that would silently build something else.
RECIPE_KEYS = {
    "gptqmodel": {"builder", "calibration", "samples", "seq_len", "seed"},
    "llama.cpp": {"builder", "type"},
    "bitsandbytes": {"builder", "quant_type", "llm_int8_threshold"},
    "transformers": {"builder", "dtype"},
}
BNB_QUANT_TYPES = ("nf4", "fp4")


def _safe_name(file: Path, key: str, name: str) -> str:
    if not _SAFE_NAME.fullmatch(name) or name.endswith("."):
        raise ManifestError(file, key, f"{name!r} is not a safe name: it becomes part of file paths, so use letters, "
                            "digits, '.', '_' and '-' only, starting with a letter or digit")
    return name


def _recipe(file: Path, key: str, recipe: dict | None) -> dict | None:
    if recipe is None:
        return None
    builder = recipe.get("builder")
    if builder not in RECIPE_KEYS:
        raise ManifestError(file, f"{key}.builder", f"must be one of {', '.join(RECIPE_KEYS)}; got {builder!r}")
    unknown = sorted(set(recipe) - RECIPE_KEYS[builder])
    if unknown:
        raise ManifestError(file, f"{key}.{unknown[0]}", f"unknown key(s) {', '.join(unknown)} for builder {builder!r} "
                            f"(it reads {', '.join(sorted(RECIPE_KEYS[builder]))})")
    if builder == "bitsandbytes" and recipe.get("quant_type", "nf4") not in BNB_QUANT_TYPES:
        raise ManifestError(file, f"{key}.quant_type", f"must be one of {', '.join(BNB_QUANT_TYPES)}; "
                            f"got {recipe['quant_type']!r}")
    threshold = recipe.get("llm_int8_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0):
        raise ManifestError(file, f"{key}.llm_int8_threshold", "must be a non-negative number (LLM.int8()'s outlier "
                            f"threshold; 0 keeps no outlier columns in fp16), got {threshold!r}")
    for name in ("samples", "seq_len", "seed"):
        value = recipe.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1)):
            raise ManifestError(file, f"{key}.{name}", f"must be a {'non-negative' if name == 'seed' else 'positive'} "
                                f"integer, got {value!r}")
    return recipe


def _max_drops(t: "_Table") -> dict[str, float]:
    drops = t.take("max_drop", dict, {})
    for capability, value in drops.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ManifestError(t.file, f"{t.key('max_drop')}.{capability}",
                                f"must be a number of score points between 0 and 1, got {value!r}")
    return {k: float(v) for k, v in drops.items()}


def _positive(file: Path, key: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ManifestError(file, key, f"must be positive, got {value}")


_PROTOCOL_KINDS = {"max_length": int, "stride": int, "batch_size": int, "token_cap": int,
                   "add_bos": bool, "dtype": str, "top_k": int, "task_items": int, "preset": str}


def _preset_names() -> tuple[str, ...]:
    from .presets import PRESETS

    return tuple(PRESETS)


_PROTOCOL_CHOICES = {"dtype": lambda: DTYPES, "preset": _preset_names}


def _protocol_overrides(t: _Table) -> dict[str, Any]:
    values = {}
    for name, kind in _PROTOCOL_KINDS.items():
        if name in t.data:
            values[name] = t.take(name, kind, choices=_PROTOCOL_CHOICES[name]() if name in _PROTOCOL_CHOICES else None)
            _positive(t.file, t.key(name), values[name] if kind is int else None)
    return values


def _checked(settings: ProtocolSettings, file: Path, where: str) -> ProtocolSettings:
    if settings.max_length < 2:
        raise ManifestError(file, f"{where}.max_length",
                            f"must be at least 2 (a window of {settings.max_length} token predicts nothing)")
    if settings.stride > settings.max_length:
        raise ManifestError(file, f"{where}.stride",
                            f"stride {settings.stride} exceeds max_length {settings.max_length}: tokens would go unscored")
    return settings


def _protocol_table(t: _Table) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(overrides of the base settings, {profile: overrides}) from a [protocol] table."""
    profiles_t = t.table("profiles")
    base = _protocol_overrides(t)
    profiles = {}
    for pname in list(profiles_t.data):
        _safe_name(profiles_t.file, profiles_t.key(pname), pname)
        pt = profiles_t.table(pname)
        profiles[pname] = _protocol_overrides(pt)
        pt.done()
    t.done()
    return base, profiles


def _corpus(name: str, t: _Table, root: Path, *, finish: bool = True) -> CorpusSpec:
    spec = CorpusSpec(
        name=name,
        path=t.take("path", str),
        config=t.take("config", str, None),
        split=t.take("split", str, "test"),
        revision=t.take("revision", str, None),
        data_files=tuple(t.take("data_files", list, [])),
        package=t.take("package", str, None),
        text=t.take("text", str, "{text}"),
        joiner=t.take("joiner", str, "\n\n"),
        sample_by=t.take("sample_by", str, None, choices=("line", "paragraph", "document")),
        description=t.take("description", str, ""),
        base_dir=root,
    )
    if finish:
        t.done()
    if not all(isinstance(f, str) for f in spec.data_files):
        raise ManifestError(t.file, t.key("data_files"), "must be a list of strings")
    return spec


def _task(name: str, t: _Table, root: Path) -> TaskSpec:
    from .tasks.kinds import task_kind, task_kind_names

    schema = t.take("schema", str, choices=task_kind_names())
    kind = task_kind(schema)
    task = TaskSpec(
        name=name, schema=schema, capability=t.take("capability", str),
        shots=t.take("shots", int, 0), shots_split=t.take("shots_split", str, None),
        scoring=t.take("scoring", str, kind.scorings[0], choices=kind.scorings),
        max_new_tokens=t.take("max_new_tokens", int, 32), limit=t.take("limit", int, None),
        source=_corpus(name, t, root, finish=False),
    )
    t.done()
    if task.shots < 0:
        raise ManifestError(t.file, t.key("shots"), f"must be >= 0, got {task.shots}")
    if task.shots and not kind.takes_shots:
        raise ManifestError(t.file, t.key("shots"), f"schema {schema!r} takes no shots (the prompt is the problem)")
    if task.shots and not task.shots_split:
        raise ManifestError(t.file, t.key("shots_split"), f"{task.shots} shots need a split to take them from")
    _positive(t.file, t.key("limit"), task.limit)
    _positive(t.file, t.key("max_new_tokens"), task.max_new_tokens)
    return task


TOKENIZER_CHOICES = ("own", "reference")


def _variant(t: _Table, root: Path) -> Variant:
    path = t.take("path", str, None)
    variant = Variant(
        name=_safe_name(t.file, t.key("name"), t.take("name", str)),
        format=t.take("format", str, choices=KNOWN_FORMATS),
        bits=t.take("bits", int),
        group_size=t.take("group_size", int, None),
        desc_act=t.take("desc_act", bool, None),
        scheme=t.take("scheme", str, None),
        outlier_handling=t.take("outlier_handling", str, None),
        calibration=t.take("calibration", str, None),
        path=(root / path) if path else None,
        recipe=_recipe(t.file, t.key("recipe"), t.take("recipe", dict, None)),
        max_ratio=t.take("max_ratio", (int, float), None),
        reversal_tolerance=t.take("reversal_tolerance", (int, float), None),
        backend=t.take("backend", str, DEFAULT_BACKEND, choices=backend_names()),
        max_kl=t.take("max_kl", (int, float), None),
        min_top1=t.take("min_top1", (int, float), None),
        max_drop=_max_drops(t),
        tokenizer=t.take("tokenizer", str, "own", choices=TOKENIZER_CHOICES),
        placement=parse_placement(t, root),
        profiles=_profiles(t),
    )
    t.done()
    engine = get_backend(variant.backend)
    if not engine.scores(variant.format):
        raise ManifestError(t.file, t.key("backend"), f"{engine.name} scores {', '.join(engine.formats).upper()} files only; "
                            f"variant {variant.name!r} is {variant.format!r}")
    _check_placement(t, variant, variant.placement.keys(), own=True)
    if variant.path is None and variant.recipe is None:
        raise ManifestError(t.file, t.where, f"variant {variant.name!r} needs a path or a recipe")
    return variant


def _profiles(t: _Table) -> tuple[str, ...] | None:
    names = t.take("profiles", list, None)
    if names is not None and (not names or not all(isinstance(n, str) and n for n in names)):
        raise ManifestError(t.file, t.key("profiles"), f"must be a non-empty list of profile names, got {names!r}")
    return tuple(names) if names is not None else None


def _check_placement(t: _Table, variant: Variant, keys: tuple[str, ...], *, own: bool) -> None:
    """A variant's placement keys (its own, or its model's that its backend takes) must suit its backend and format."""
    engine = get_backend(variant.backend)
    foreign = [k for k in keys if k not in engine.placement_keys]
    if foreign and own:
        takes = ", ".join(engine.placement_keys) or "no placement keys"
        raise ManifestError(t.file, t.key(foreign[0]), f"variant {variant.name!r} is scored by {engine.name}, which "
                            f"takes {takes}")
    placed = [k for k in keys if k in engine.placement_keys]
    if placed and engine.placement_formats is not None and variant.format not in engine.placement_formats:
        where = t.key(placed[0]) if own else f"{t.where}.{placed[0]}"
        raise ManifestError(t.file, where, f"variant {variant.name!r}: quantgate cannot split or offload a "
                            f"{variant.format!r} checkpoint with {engine.name} (it places "
                            f"{', '.join(engine.placement_formats)} checkpoints); load it whole")


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path).resolve()
    if not path.is_file():
        raise ManifestError(path, "file", "does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(path, "syntax", str(exc)) from None
    return parse_manifest(raw, path)


def parse_manifest(raw: dict[str, Any], path: Path) -> Manifest:
    """A manifest from its parsed TOML; `path` names it in errors and anchors its relative paths."""
    path = Path(path)
    root = path.parent
    top = _Table(raw, path, "")

    settings = top.table("quantgate")
    baselines_dir = root / settings.take("baselines", str, "baselines")
    zoo_dir = root / settings.take("zoo_dir", str, "build/zoo")
    cache_dir = root / settings.take("cache_dir", str, "build/cache")
    default_profile = settings.take("default_profile", str, "default")
    reversal_tolerance = settings.take("reversal_tolerance", (int, float), 0.005)
    table = settings.take("table", str, None)
    exceedance = settings.take("exceedance", str, "point", choices=("point", "interval"))
    calibration_overlap = float(settings.take("calibration_overlap", (int, float), 0.05))
    if not 0 < calibration_overlap <= 1:
        raise ManifestError(path, "quantgate.calibration_overlap", f"must be a share in (0, 1]; got {calibration_overlap}")
    plugins = _plugins(settings, root)
    settings.done()

    global_protocol = _protocol_table(top.table("protocol"))

    corpora_t = top.table("corpora")
    corpora = {_safe_name(path, corpora_t.key(name), name): _corpus(name, corpora_t.table(name), root)
               for name in list(corpora_t.data)}

    tasks_t = top.table("tasks")
    tasks = {_safe_name(path, tasks_t.key(name), name): _task(name, tasks_t.table(name), root)
             for name in list(tasks_t.data)}

    models_t = top.table("models")
    models = {_safe_name(path, models_t.key(m), m): _model(m, models_t.table(m), root, corpora, tasks, global_protocol,
                                                           reversal_tolerance)
              for m in list(models_t.data)}
    top.done()
    if not models:
        raise ManifestError(path, "models", "declares no reference model")
    manifest = Manifest(path=path, root=root, exceedance=exceedance, baselines_dir=baselines_dir, zoo_dir=zoo_dir,
                        cache_dir=cache_dir, default_profile=default_profile, models=models, corpora=corpora,
                        tasks=tasks, table=root / table if table else None, plugins=plugins,
                        calibration_overlap=calibration_overlap)
    known = manifest.profile_names()
    for m in models.values():
        for i, v in enumerate(m.variants):
            unknown = [p for p in v.profiles or () if p not in known]
            if unknown:
                raise ManifestError(path, f"models.{m.name}.variants[{i}].profiles", f"names profile {unknown[0]!r}, "
                                    f"which the manifest does not define (known: {', '.join(known)})")
    return manifest


def _plugins(settings: _Table, root: Path) -> tuple[str, ...]:
    """`plugins`: modules imported before the rest is read (with the manifest's directory on sys.path), where a
    team registers its own metrics, task kinds or backends, for the CLI and the pytest plugin alike."""
    import importlib

    names = tuple(settings.take("plugins", list, []))
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            raise ManifestError(settings.file, settings.key("plugins"), f"{name!r} is not a module name")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001  (any failure of a team's module is a manifest error naming it)
            raise ManifestError(settings.file, settings.key("plugins"),
                                f"module {name!r} could not be imported: {type(exc).__name__}: {exc}") from None
    return names


def _model(name: str, mt: _Table, root: Path, corpora: dict, tasks: dict, global_protocol: tuple,
           reversal_tolerance: float) -> "ReferenceModel":
    """One [models.NAME] table: its reference, corpora, tasks, variants, protocol and profiles."""
    path = mt.file
    m_path = mt.take("path", str)
    m_format = mt.take("format", str, "fp16", choices=("fp16", "bf16", "fp32"))
    m_gguf = mt.take("gguf", str, None)
    m_corpora = tuple(mt.take("corpora", list))
    for c in m_corpora:
        if c not in corpora:
            raise ManifestError(path, mt.key("corpora"), f"names corpus {c!r}, which [corpora] does not define")
    m_tasks = tuple(mt.take("tasks", list, []))
    for task_name in m_tasks:
        if task_name not in tasks:
            raise ManifestError(path, mt.key("tasks"), f"names task {task_name!r}, which [tasks] does not define")
    raw_variants = mt.take("variants", list, [])
    variants = tuple(_variant(_Table(v, path, f"{mt.key('variants')}[{i}]"), root) for i, v in enumerate(raw_variants))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ManifestError(path, mt.key("variants"), f"variant names repeat: {names}")
    global_base, global_profiles = global_protocol
    model_base, model_profiles = _protocol_table(mt.table("protocol"))
    protocol = _checked(ProtocolSettings(**{**global_base, **model_base}), path, mt.key("protocol"))
    profiles = {
        pname: _checked(dataclasses.replace(protocol, **{**global_profiles.get(pname, {}), **model_profiles.get(pname, {})}),
                        path, f"{mt.key('protocol')}.profiles.{pname}")
        for pname in {*global_profiles, *model_profiles}
    }
    thresholds_t = mt.table("thresholds")
    thresholds = {k: float(thresholds_t.take(k, (int, float))) for k in list(thresholds_t.data)}
    placement = parse_placement(mt, root)
    for variant in variants:  # the model's keys apply to the variants whose backend takes them
        _check_placement(mt, variant, placement.keys(), own=False)
    model = ReferenceModel(
        name=name, path=root / m_path, format=m_format, corpora=m_corpora, variants=variants,
        protocol=protocol, profiles=profiles, thresholds=thresholds,
        reversal_tolerance=float(mt.take("reversal_tolerance", (int, float), reversal_tolerance)),
        gguf=root / m_gguf if m_gguf else None, tasks=m_tasks, placement=placement,
    )
    mt.done()
    return model


def protocol_settings(model: ReferenceModel, profile: str, default_profile: str) -> ProtocolSettings:
    """The settings a profile gives for one model (the default profile is the base table)."""
    if profile in model.profiles:
        return model.profiles[profile]
    if profile == default_profile:
        return model.protocol
    known = ", ".join(sorted({default_profile, *model.profiles}))
    raise ManifestError("quantgate.toml", "protocol.profiles", f"no profile {profile!r} (known: {known})")


def find_manifest(start: Path) -> Path | None:
    for directory in (start, *start.parents):
        candidate = directory / MANIFEST_NAME
        if candidate.is_file():
            return candidate
    return None
