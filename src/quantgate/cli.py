"""`quantgate` command line: baselines, the demo zoo, protocols.

  quantgate baseline [--model M] [--corpus C] [--profile P | --all-profiles] [--force]
  quantgate zoo build [--model M] [--variant V] [--force]
  quantgate protocol [--model M] [--corpus C] [--profile P]
  quantgate report QUALITY.json [--readme docs/demo.md]
  quantgate compare OLD.json NEW.json [--json OUT.json] [--markdown OUT.md]
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
    from . import baselines as bl
    from .errors import BaselineFormatError, BaselineMissing
    from .evaluation import REFERENCE, Evaluator, resolve_device

    manifest = _manifest(args)
    _require_writable(manifest.baselines_dir)  # before anything is measured, not after
    device = resolve_device(args.device)
    profiles = manifest.profile_names() if args.all_profiles else [args.profile or manifest.default_profile]
    ev = Evaluator(manifest=manifest, profile=profiles[0], device=device)
    refused = 0
    command = "quantgate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for model in _models(manifest, args):
        # --corpus alone: corpora only; --task alone: tasks only; neither: everything the model declares
        corpora = args.corpus or ([] if args.task else list(manifest.models[model].corpora))
        reference_sha = ev.reference_sha256(model)
        backends = args.backend or manifest.models[model].backends()
        for backend, profile, corpus in ((b, p, c) for b in backends for p in profiles for c in corpora):
            ev.profile = profile
            if corpus not in manifest.models[model].corpora:
                raise QuantgateError(f"model {model!r} is not evaluated on corpus {corpus!r}")
            path = ev.baseline_path(model, corpus, backend)
            protocol = ev.protocol(model, corpus, backend=backend)
            try:
                old = bl.read_baseline(path)
                same = (old.protocol.matches(protocol) and old.provenance.get("reference_sha256") == reference_sha
                        and old.top_k == ev.settings(model).top_k)
                if same and not args.force:
                    print(f"{path}: up to date (protocol {protocol.fingerprint}); --force re-measures")
                    continue
                if not same and not args.force:
                    diff = "; ".join(protocol.differences(old.protocol)) or (
                        "reference checkpoint changed" if old.provenance.get("reference_sha256") != reference_sha
                        else f"top_k {old.top_k} -> {ev.settings(model).top_k}")
                    print(f"{path}: REFUSED, the stored baseline was measured differently ({diff}); "
                          f"pass --force to replace it", file=sys.stderr)
                    refused += 1
                    continue
            except BaselineMissing:
                pass
            except BaselineFormatError as exc:
                if not args.force:
                    print(f"REFUSED: {exc}; pass --force to replace it", file=sys.stderr)
                    refused += 1
                    continue
            started = time.perf_counter()
            m = ev.measure(model, REFERENCE, corpus, backend=backend, top_k=ev.settings(model).top_k)
            # llama.cpp scores on the CPU whatever the device: deterministic, nothing to re-measure
            on_cpu = device == "cpu" or backend == "llama.cpp"
            reruns = args.noise_reruns if args.noise_reruns is not None else (0 if on_cpu else 1)
            noise = ev.noise_floor(model, corpus, backend, m, reruns)
            scored = {}
            if backend != "transformers":
                from .zoo import reference_gguf

                gguf = reference_gguf(manifest, manifest.models[model], reference_sha)
                scored = {"scored_file": os.path.relpath(gguf, manifest.root), "scored_sha256": bl.file_sha256(gguf)}
            baseline = bl.Baseline(
                model=model, corpus=corpus, profile=profile, protocol=protocol,
                perplexity=m.perplexity, mean_nll=m.scores.mean_nll, environment=ev.environment(),
                provenance={**bl.git_state(manifest.root), "created": bl.now_iso(), "command": command,
                            "reference_path": os.path.relpath(manifest.models[model].path, manifest.root),
                            "reference_sha256": reference_sha, "backend": m.description.get("backend"),
                            **scored, "eval_seconds": round(m.seconds, 2)},
                logprobs=m.scores.logprobs, doc_starts=m.doc_starts,
                topk_ids=m.scores.topk_ids, topk_logprobs=m.scores.topk_logprobs, noise=noise)
            bl.write_baseline(baseline, path)
            print(f"{path}: perplexity {m.perplexity:.4f} over {m.scores.n:,} tokens "
                  f"(protocol {protocol.fingerprint}, {time.perf_counter() - started:.1f}s)")
        tasks = args.task or ([] if args.corpus else list(manifest.models[model].tasks))
        for backend, profile, task in ((b, p, t) for b in backends for p in profiles for t in tasks):
            ev.profile = profile
            refused += _task_baseline(ev, model, task, backend, args, command, reference_sha)
    ev.release()
    return 1 if refused else 0


def _task_baseline(ev, model: str, task: str, backend: str, args, command: str, reference_sha: str) -> int:
    """Measure and write one task baseline; 1 when an existing one was refused (never overwritten silently)."""
    from . import baselines as bl
    from .errors import BaselineFormatError, BaselineMissing
    from .evaluation import REFERENCE
    from .tasks.baseline import TaskBaseline, read_task_baseline, write_task_baseline

    if task not in ev.model(model).tasks:
        raise QuantgateError(f"model {model!r} is not evaluated on task {task!r}")
    path = ev.task_baseline_path(model, task, backend)
    protocol = ev.task_protocol(model, task, backend=backend)
    try:
        old = read_task_baseline(path)
        same = old.protocol == protocol and old.provenance.get("reference_sha256") == reference_sha
        if same and not args.force:
            print(f"{path}: up to date (task protocol {old.fingerprint}); --force re-measures")
            return 0
        if not args.force:
            diff = [k for k in sorted(set(protocol) | set(old.protocol)) if protocol.get(k) != old.protocol.get(k)]
            print(f"{path}: REFUSED, the stored task baseline was measured differently "
                  f"({', '.join(diff) or 'reference checkpoint changed'}); pass --force to replace it", file=sys.stderr)
            return 1
    except BaselineMissing:
        pass
    except BaselineFormatError as exc:
        if not args.force:
            print(f"REFUSED: {exc}; pass --force to replace it", file=sys.stderr)
            return 1
    result = ev.run_task(model, REFERENCE, task, backend=backend)
    baseline = TaskBaseline(
        model=model, task=task, profile=ev.profile, capability=result.capability, protocol=protocol,
        ids=result.ids, correct=result.correct, answers=result.answers, environment=ev.environment(),
        provenance={**bl.git_state(ev.manifest.root), "created": bl.now_iso(), "command": command,
                    "reference_path": os.path.relpath(ev.model(model).path, ev.manifest.root),
                    "reference_sha256": reference_sha, "backend": backend, "eval_seconds": round(result.seconds, 2)})
    write_task_baseline(baseline, path)
    print(f"{path}: {result.capability} score {baseline.score:.4f} over {len(result.ids)} items "
          f"(task protocol {baseline.fingerprint}, {result.seconds:.1f}s)")
    return 0


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
    from .evaluation import Evaluator, resolve_device

    manifest = _manifest(args)
    ev = Evaluator(manifest=manifest, profile=args.profile or manifest.default_profile,
                   device=resolve_device(args.device))
    out = {}
    for model in _models(manifest, args):
        for corpus in args.corpus or manifest.models[model].corpora:
            for backend in manifest.models[model].backends():
                p = ev.protocol(model, corpus, backend=backend)
                key = f"{model}/{corpus}" + ("" if backend == "transformers" else f" ({backend})")
                out[key] = {"fingerprint": p.fingerprint, **p.as_dict()}
    print(json.dumps(out, indent=2))
    return 0


def cmd_report(args) -> int:
    from .report import RunReport, replace_marked_section

    report = RunReport.from_json(Path(args.json).read_text())
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


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--noise-reruns", type=int, default=None, metavar="N",
                   help="score the reference N more times and store how far the reruns move (the noise floor the "
                        "gate adds to its bounds); default: 1 on CUDA, 0 on CPU, where scoring is deterministic")
    p.add_argument("--backend", action="append", default=None, choices=("transformers", "llama.cpp"),
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
    rp = sub.add_parser("report", help="render the Markdown summary of a --quality-json file")
    rp.add_argument("json", help="a file written by pytest --quality-json")
    rp.add_argument("--readme", default=None, help="write it into this file between <!-- MARKER:start/end -->")
    rp.add_argument("--marker", default="demo-summary",
                    help="demo-summary (the run's summary), acceptability (the table's rows beside measured ratios) "
                         "or demo-excerpt (verdict counts per model and metric)")
    rp.add_argument("--command-line", default=None, help="the command that produced the JSON, quoted under the table")
    rp.set_defaults(func=cmd_report)
    cp = sub.add_parser("compare", help="what changed between two --quality-json runs (exit 1 when a passing check "
                        "now fails)")
    cp.add_argument("old", help="the earlier run's --quality-json file")
    cp.add_argument("new", help="the later run's --quality-json file")
    cp.add_argument("--json", dest="json_out", default=None, metavar="PATH", help="write the comparison as JSON")
    cp.add_argument("--markdown", default=None, metavar="PATH", help="write the Markdown shown here to a file")
    cp.set_defaults(func=cmd_compare)
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
