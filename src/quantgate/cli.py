"""`quantgate` command line: baselines, the demo zoo, protocols.

  quantgate baseline [--model M] [--corpus C] [--profile P | --all-profiles] [--force]
  quantgate zoo build [--model M] [--variant V] [--force]
  quantgate protocol [--model M] [--corpus C] [--profile P]
  quantgate report QUALITY.json [--readme docs/demo.md]
  quantgate compare OLD.json NEW.json [--json OUT.json] [--markdown OUT.md]
  quantgate merge SHARD.json ... [--json OUT.json] [--summary OUT.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from .errors import QuantgateError
from .store import Subject


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, default=None, help="quantgate.toml (default: search upwards)")
    parser.add_argument("--model", action="append", default=None, help="reference model(s) (default: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def _manifest(args):
    from .manifest import find_manifest, load_manifest

    path = args.manifest or find_manifest(Path.cwd())
    if path is None:
        raise QuantgateError("no quantgate.toml here or above; pass --manifest PATH")
    return load_manifest(path)


def _models(manifest, args) -> list[str]:
    names = args.model or list(manifest.models)
    unknown = [n for n in names if n not in manifest.models]
    if unknown:
        raise QuantgateError(f"unknown model(s) {unknown}; the manifest has {list(manifest.models)}")
    return names


def _require_writable(directory: Path) -> None:
    """Baselines can be written under `directory` (made if missing): a probe file, created and removed."""
    import tempfile

    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".quantgate-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise QuantgateError(f"{directory}: baselines cannot be written there ({exc.strerror or exc}); "
                             "nothing was measured") from None


def cmd_baseline(args) -> int:
    from . import progress

    if sys.stderr.isatty():  # a live line while each baseline is measured; a log gets the line per baseline only
        progress.use(sys.stderr)
    try:
        return _baselines(args)
    finally:
        progress.use(None)


def _baselines(args) -> int:
    from .evaluation import Evaluator, resolve_device

    manifest = _manifest(args)
    _require_writable(manifest.baselines_dir)  # before anything is measured, not after
    profiles = manifest.profile_names() if args.all_profiles else [args.profile or manifest.default_profile]
    ev = Evaluator(manifest=manifest, profile=profiles[0], device=resolve_device(args.device))
    command = "quantgate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    refused = 0
    snapshots: list[str] = []  # the protocol snapshot tests of what was baselined
    for model in _models(manifest, args):
        ref = manifest.models[model]
        # --corpus alone: corpora only; --task alone: tasks only; neither: everything the model declares
        corpora = args.corpus or ([] if args.task else list(ref.corpora))
        tasks = args.task or ([] if args.corpus else list(ref.tasks))
        for name in corpora:
            if name not in ref.corpora:
                raise QuantgateError(f"model {model!r} is not evaluated on corpus {name!r}")
        for name in tasks:
            if name not in ref.tasks:
                raise QuantgateError(f"model {model!r} is not evaluated on task {name!r}")
        backends = args.backend or ref.backends()
        snapshots += [f"test_protocol_snapshot[{model}/{n}]" for n in corpora]
        snapshots += [f"test_task_protocol_snapshot[{model}/{n}]" for n in tasks]
        for kind, names in (("corpus", corpora), ("task", tasks)):
            for backend, profile, name in ((b, p, n) for b in backends for p in profiles for n in names):
                ev.profile = profile
                refused += _baseline(ev, Subject(model, name, kind, backend), args, command)
    ev.release()
    if refused:
        return 1
    if args.no_snapshots:
        return 0
    from .scaffold import record_protocol_snapshots

    return record_protocol_snapshots(manifest, snapshots, device=args.device)


def _baseline(ev, subject, args, command: str) -> int:
    """Measure and write one baseline unless the stored one is up to date; 1 when a stored one that differs (or
    cannot be read) was refused: never overwritten without --force."""
    from .store import MISSING, UP_TO_DATE

    model, name = subject.model, subject.name
    protocol = (ev.protocol(model, name, backend=subject.backend) if subject.kind == "corpus"
                else ev.task_protocol(model, name, backend=subject.backend))
    top_k = ev.settings(model).top_k if subject.kind == "corpus" else None
    status = ev.store.status(subject, protocol, ev.reference_sha256(model), top_k=top_k)
    path = ev.store.path(subject)
    if status.state == UP_TO_DATE and not args.force:
        label = "protocol" if subject.kind == "corpus" else "task protocol"
        print(f"{path}: up to date ({label} {protocol.fingerprint}); --force re-measures")
        return 0
    if status.state != MISSING and not args.force:
        if status.error:
            print(f"REFUSED: {status.error}; pass --force to replace it", file=sys.stderr)
        else:
            what = "baseline" if subject.kind == "corpus" else "task baseline"
            print(f"{path}: REFUSED, the stored {what} was measured differently ({'; '.join(status.differences)}); "
                  "pass --force to replace it", file=sys.stderr)
        return 1
    measure = _measure_corpus_baseline if subject.kind == "corpus" else _measure_task_baseline
    baseline, words = measure(ev, subject, protocol, args, _provenance(ev, subject, command))
    ev.store.write(subject, baseline)
    print(f"{path}: {words}")
    return 0


def _provenance(ev, subject, command: str) -> dict:
    from . import baselines as bl
    from .backends import get_backend

    manifest, ref = ev.manifest, ev.model(subject.model)
    sha = ev.reference_sha256(subject.model)
    return {**bl.git_state(manifest.root), "created": bl.now_iso(), "command": command,
            "reference_path": os.path.relpath(ref.path, manifest.root), "reference_sha256": sha,
            "backend": subject.backend, **get_backend(subject.backend).provenance(manifest, ref, sha)}


def _measure_corpus_baseline(ev, subject, protocol, args, provenance: dict):
    from . import baselines as bl
    from .backends import get_backend
    from .evaluation import REFERENCE

    started = time.perf_counter()
    model, corpus, backend = subject.model, subject.name, subject.backend
    m = ev.measure(model, REFERENCE, corpus, backend=backend, top_k=ev.settings(model).top_k)
    # a backend that computes on the CPU whatever the device is deterministic: nothing to re-measure
    on_cpu = get_backend(backend).numerics(ev.settings(model).dtype, ev.device)["device_class"] == "cpu"
    reruns = args.noise_reruns if args.noise_reruns is not None else (0 if on_cpu else 1)
    noise = ev.noise_floor(model, corpus, backend, m, reruns)
    baseline = bl.Baseline(
        model=model, corpus=corpus, profile=ev.profile, protocol=protocol, perplexity=m.perplexity,
        mean_nll=m.scores.mean_nll, environment=ev.environment(),
        provenance={**provenance, "backend": m.description.get("backend"), "eval_seconds": round(m.seconds, 2)},
        logprobs=m.scores.logprobs, doc_starts=m.doc_starts,
        topk_ids=m.scores.topk_ids, topk_logprobs=m.scores.topk_logprobs, noise=noise)
    text = m.text_measures()
    on_text = (f"; {text['bits_per_byte']:.4f} bits per byte, word perplexity {text['word_perplexity']:.3f} over "
               f"{m.text.bytes:,} bytes, {m.text.words:,} words" if m.text is not None and m.text.bytes and m.text.words else "")
    return baseline, (f"perplexity {m.perplexity:.4f} over {m.scores.n:,} tokens{on_text} "
                      f"(protocol {protocol.fingerprint}, {time.perf_counter() - started:.1f}s)")


def _measure_task_baseline(ev, subject, protocol, args, provenance: dict):
    from .evaluation import REFERENCE
    from .tasks.baseline import TaskBaseline

    result = ev.run_task(subject.model, REFERENCE, subject.name, backend=subject.backend)
    baseline = TaskBaseline(
        model=subject.model, task=subject.name, profile=ev.profile, capability=result.capability, protocol=protocol,
        ids=result.ids, correct=result.correct, answers=result.answers, environment=ev.environment(),
        provenance={**provenance, "eval_seconds": round(result.seconds, 2)})
    return baseline, (f"{result.capability} score {baseline.score:.4f} over {len(result.ids)} items "
                      f"(task protocol {baseline.fingerprint}, {result.seconds:.1f}s)")


def cmd_zoo_build(args) -> int:
    from .zoo import build_variant, compare_with_recorded, record_builds

    manifest = _manifest(args)
    differ = []
    if args.variant:
        known = {v.name for m in _models(manifest, args) for v in manifest.models[m].variants if v.recipe is not None}
        unknown = sorted(set(args.variant) - known)
        if unknown:
            raise QuantgateError(f"--variant {', '.join(unknown)}: no recipe variant of that name; recipe variants: "
                                 f"{', '.join(sorted(known)) or 'none'}")
    for model in _models(manifest, args):
        ref = manifest.models[model]
        built = {}
        for variant in ref.variants:
            if variant.recipe is None or (args.variant and variant.name not in args.variant):
                continue
            started = time.perf_counter()
            path, record = build_variant(manifest, ref, variant, force=args.force)
            built[variant.name] = path
            state = "cached" if record is None else f"built in {time.perf_counter() - started:.1f}s"
            status, words = compare_with_recorded(manifest, ref, variant, path)
            if status not in ("same", "not recorded") and not args.record:
                differ.append(f"{model}/{variant.name}")
            print(f"{model}/{variant.name}: {path} ({state}); {words}")
        if args.record and built:
            print(f"{record_builds(manifest, ref, built)}: recorded the weights digests of {len(built)} build(s)")
    if differ:
        print(f"quantgate: {len(differ)} build(s) differ from the recorded ones ({', '.join(differ)}): their numbers "
              "will differ from those documented with the recorded builds; the demo's tolerances cover the spread "
              "measured between builds (docs/demo.md \"Builds across machines\")", file=sys.stderr)
    return 0


def cmd_protocol(args) -> int:
    from .backends import get_backend
    from .evaluation import Evaluator, resolve_device

    manifest = _manifest(args)
    ev = Evaluator(manifest=manifest, profile=args.profile or manifest.default_profile,
                   device=resolve_device(args.device))
    out = {}
    for model in _models(manifest, args):
        for corpus in args.corpus or manifest.models[model].corpora:
            for backend in manifest.models[model].backends():
                p = ev.protocol(model, corpus, backend=backend)
                key = get_backend(backend).label(f"{model}/{corpus}")
                out[key] = {"fingerprint": p.fingerprint, **p.as_dict()}
    print(json.dumps(out, indent=2))
    return 0


def cmd_sweep(args) -> int:
    from .evaluation import Evaluator, resolve_device
    from .presets import PRESETS
    from .sweep import figure, grid, markdown, run_sweep

    manifest = _manifest(args)
    ev = Evaluator(manifest=manifest, profile=args.profile or manifest.default_profile, device=resolve_device(args.device))
    (model,) = args.model or [next(iter(manifest.models))]
    if model not in manifest.models:
        raise QuantgateError(f"no model {model!r} in {manifest.path}; the models are {sorted(manifest.models)}")
    declared = [v.name for v in manifest.models[model].variants]
    unknown = [v for v in args.variant or () if v not in declared]
    if unknown:
        raise QuantgateError(f"model {model!r} has no variant {unknown[0]!r}; its variants are {declared}")
    corpus = args.corpus or manifest.models[model].corpora[0]
    length = ev.settings(model).max_length
    points = grid(args.preset or list(PRESETS), args.max_length or [length // 2, length], args.stride or [0.5, 1.0])
    rows = run_sweep(ev, model, corpus, args.variant or [], points)
    text = markdown(rows, model=model, corpus=corpus)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"sweep-{model}-{corpus}.md").write_text(text)
        for path in figure(rows, out, model=model, corpus=corpus):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _sweep_parser(sub) -> None:
    sp = sub.add_parser("sweep", help="one model's perplexity (FP16 and variants) and ratios under a grid of protocol "
                        "presets, max_length and stride: a table, and a plot with --out")
    _common(sp)
    sp.add_argument("--corpus", default=None, help="default: the model's first corpus")
    sp.add_argument("--variant", action="append", default=None, help="variant(s) beside FP16 (default: none)")
    sp.add_argument("--preset", action="append", default=None, help="default: every preset")
    sp.add_argument("--max-length", action="append", type=int, default=None,
                    help="default: the protocol's max_length and half of it")
    sp.add_argument("--stride", action="append", type=float, default=None,
                    help="hf-sliding's strides as fractions of max_length (default: 0.5 and 1)")
    sp.add_argument("--profile", default=None, help="the profile whose token cap and settings apply")
    sp.add_argument("--out", default=None, metavar="DIR", help="write the table (Markdown) and the plot (PNG, SVG)")
    sp.set_defaults(func=cmd_sweep)


def cmd_report(args) -> int:
    from .report import RunReport, replace_marked_section

    report = RunReport.from_json(Path(args.json).read_text())
    if args.html or args.plots:
        return _pictures(args, report)
    if args.marker == "demo-excerpt":
        table = report.excerpt_markdown()
    elif args.marker == "acceptability":
        from .thresholds import load_capabilities, load_table

        table = report.acceptability_markdown(load_table()) + report.capabilities_markdown(load_capabilities())
    else:
        table = report.markdown()
    if args.command_line:
        table += f"\nMeasured with `{args.command_line}`; regenerate with `quantgate report {args.json} --readme docs/demo.md`.\n"
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(replace_marked_section(readme.read_text(), args.marker, table))
        print(f"{readme}: section {args.marker!r} updated")
    else:
        print(table)
    return 0


def _init_parser(sub) -> None:
    ip = sub.add_parser("init", help="write quantgate.toml, the quality tests, a CI workflow and .gitignore entries "
                        "for a reference and its variants (metadata read from the checkpoints)")
    ip.add_argument("reference", help="the reference: a checkpoint directory, a hub id in the local cache, or an F16 "
                    "GGUF file when only GGUF files exist")
    ip.add_argument("variants", nargs="*", help="variant checkpoints: directories, .gguf files, globs")
    ip.add_argument("--corpus", action="append", default=None, help="an evaluation corpus (repeatable): humaneval, "
                    "genesis, wikitext2 (the default), a local .txt/.jsonl file, or a hub dataset id")
    ip.add_argument("--name", default=None, help="the model's name in the manifest (default: the reference's)")
    ip.add_argument("--dir", default=".", help="the project directory (default: here)")
    ip.add_argument("--force", action="store_true", help="replace files that exist")
    ip.set_defaults(func=cmd_init)


def _report_parser(sub) -> None:
    rp = sub.add_parser("report", help="render the Markdown summary of a --quality-json file")
    rp.add_argument("json", help="a file written by pytest --quality-json")
    rp.add_argument("--readme", default=None, help="write it into this file between <!-- MARKER:start/end -->")
    rp.add_argument("--marker", default="demo-summary",
                    help="demo-summary (the run's summary), acceptability (the table's rows beside measured ratios) "
                         "or demo-excerpt (verdict counts per model and metric)")
    rp.add_argument("--command-line", default=None, help="the command that produced the JSON, quoted under the table")
    _pictures_options(rp)
    rp.set_defaults(func=cmd_report)


def _pictures_options(rp) -> None:
    rp.add_argument("--html", default=None, metavar="PATH", help="write the self-contained HTML report (plots inline)")
    rp.add_argument("--plots", default=None, metavar="DIR", help="write the plots (PNG and SVG) into DIR")
    rp.add_argument("--manifest", type=Path, default=None, help="the run's quantgate.toml, for its acceptability table "
                    "and protocol settings (default: search upwards)")


def _pictures(args, report) -> int:
    """`quantgate report JSON --html PATH / --plots DIR`: the plots and the HTML page of a finished run."""
    from .manifest import find_manifest, load_manifest
    from .thresholds import load_table

    manifest = args.manifest or find_manifest(Path.cwd())
    rows = load_table(load_manifest(manifest).table if manifest else None)
    if args.html:
        from . import htmlreport

        written = htmlreport.write(Path(args.html), report, plots_dir=Path(args.plots or Path(args.html).parent),
                                   rows=rows, manifest_path=manifest)
    else:
        from .plots import write_plots

        written = write_plots(report.records, rows, Path(args.plots))
    for path in written:
        print(path)
    return 0


def cmd_init(args) -> int:
    from .scaffold import init

    written = init(args.reference, args.variants, args.corpus or [], Path(args.dir), model=args.name, force=args.force)
    for path in written:
        print(f"wrote {path}")
    print("\nnext:\n  quantgate baseline          # the reference's baselines (and protocol snapshots), once\n"
          "  pytest -m quality           # the gate\n"
          "  pytest -m quality --quality-html reports/quality.html   # with plots and a page to share")
    return 0


def read_run(path: str):
    """A --quality-json file, or an error naming it."""
    from .report import RunReport

    try:
        return RunReport.from_json(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise QuantgateError(f"{path}: cannot read it ({exc.strerror})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise QuantgateError(f"{path}: not a quantgate --quality-json file ({type(exc).__name__}: {exc})") from None


def cmd_compare(args) -> int:
    from .compare import compare_runs, markdown, to_json

    result = compare_runs(read_run(args.old), read_run(args.new))
    text = markdown(result, args.old, args.new)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json_out:
        Path(args.json_out).write_text(to_json(result))
    return result.exit_status()


def cmd_merge(args) -> int:
    """The shards of one run joined: one summary, one JSON, one exit status (shard.py)."""
    from .ablation import annotate_reversals
    from .report import RunReport
    from .shard import check_shards, merged_status

    runs = [(Path(p), read_run(p)) for p in args.shards]
    check_shards([(path, {"shard": run.shard, "profile": run.profile}) for path, run in runs])
    first = runs[0][1]
    merged = RunReport(profile=first.profile, device=first.device, environment=first.environment,
                       environment_changes={k: v for _, run in runs for k, v in run.environment_changes.items()},
                       builds={k: v for _, run in runs for k, v in run.builds.items()},
                       records=[r for _, run in sorted(runs, key=lambda pr: pr[1].shard["index"]) for r in run.records])
    annotate_reversals(merged.records)  # every shard's records meet here: each reversal's partners, all of them
    merged.write(Path(args.json_out) if args.json_out else None, Path(args.summary) if args.summary else None)
    print(merged.markdown())
    statuses = [run.shard.get("exit_status", 0) for _, run in runs]
    status = merged_status(statuses)
    print(f"quantgate merge: {len(runs)} shards, {len(merged.records)} records, exit status {status} "
          f"(shards: {', '.join(map(str, statuses))})")
    return status


def build_parser() -> argparse.ArgumentParser:
    from .backends import backend_names

    parser = argparse.ArgumentParser(prog="quantgate", description="Quality gate for quantized LLM checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("baseline", help="measure the FP16 references and write baselines/ (explicit request only)")
    _common(p)
    p.add_argument("--corpus", action="append", default=None)
    p.add_argument("--task", action="append", default=None, help="task(s) to baseline (default: all of the model's; "
                   "with --corpus only, none)")
    p.add_argument("--profile", default=None)
    p.add_argument("--all-profiles", action="store_true")
    p.add_argument("--force", action="store_true", help="replace baselines measured under another protocol")
    p.add_argument("--no-snapshots", action="store_true", help="do not record the baselined protocols' syrupy "
                   "snapshots (by default they are, so that the next `pytest -m quality` passes)")
    p.add_argument("--noise-reruns", type=int, default=None, metavar="N",
                   help="score the reference N more times and store how far the reruns move (the noise floor the "
                        "gate adds to its bounds); default: 1 on CUDA, 0 on CPU, where scoring is deterministic")
    p.add_argument("--backend", action="append", default=None, choices=backend_names(),
                   help="whose kernels score the reference (default: every backend the model's variants use)")
    p.set_defaults(func=cmd_baseline)

    z = sub.add_parser("zoo", help="the demo zoo's recipe variants")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="build (or find cached) every recipe variant")
    _common(zb)
    zb.add_argument("--variant", action="append", default=None)
    zb.add_argument("--force", action="store_true")
    zb.add_argument("--record", action="store_true", help="record these builds' weights digests in "
                    "<baselines>/<model>/builds.json, as the builds the committed numbers are made with")
    zb.set_defaults(func=cmd_zoo_build)

    pr = sub.add_parser("protocol", help="print the protocol (and its fingerprint) of each model/corpus")
    _common(pr)
    pr.add_argument("--corpus", action="append", default=None)
    pr.add_argument("--profile", default=None)
    pr.set_defaults(func=cmd_protocol)
    _report_parser(sub)
    _sweep_parser(sub)
    _init_parser(sub)
    cp = sub.add_parser("compare", help="what changed between two --quality-json runs (exit 1 when a passing check "
                        "now fails)")
    cp.add_argument("old", help="the earlier run's --quality-json file")
    cp.add_argument("new", help="the later run's --quality-json file")
    cp.add_argument("--json", dest="json_out", default=None, metavar="PATH", help="write the comparison as JSON")
    cp.add_argument("--markdown", default=None, metavar="PATH", help="write the Markdown shown here to a file")
    cp.set_defaults(func=cmd_compare)
    mp = sub.add_parser("merge", help="join the --quality-json reports of a run's shards (--quality-shard K/N): one "
                        "summary, JSON and exit status; refuses missing, repeated or mismatched shards")
    mp.add_argument("shards", nargs="+", help="every shard's --quality-json file")
    mp.add_argument("--json", dest="json_out", default=None, metavar="PATH", help="write the merged JSON report")
    mp.add_argument("--summary", default="reports/quality-summary.md", metavar="PATH",
                    help="write the merged Markdown summary (default: %(default)s)")
    mp.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QuantgateError as exc:
        print(f"quantgate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
