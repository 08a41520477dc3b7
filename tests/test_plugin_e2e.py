"""The plugin end to end (pytester): verdicts, messages, reports, drift, audits, exit codes."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import tinyzoo

from quantgate import cli

REPO = Path(__file__).resolve().parents[1]
BISECT_SKIP = 125


def make_project(pytester, template, variants=tinyzoo.GOOD_VARIANTS, extra=""):
    shutil.copytree(template, pytester.path, dirs_exist_ok=True)
    manifest = tinyzoo.write_manifest(pytester.path, variants=variants, extra_quantgate=extra)
    tests = pytester.path / "quality_tests"
    tests.mkdir(exist_ok=True)
    for f in (REPO / "quality_tests").glob("test_*.py"):
        shutil.copy(f, tests / f.name)
    assert cli.main(["baseline", "--manifest", str(manifest), "--all-profiles", "--no-snapshots"]) == 0
    created = pytester.runpytest("-m", "quality", "--snapshot-update", "-p", "no:cacheprovider")
    assert "snapshots generated" in created.stdout.str()
    return manifest


def run(pytester, *args):
    return pytester.runpytest("-m", "quality", "-p", "no:cacheprovider", *args)


WORSE = tinyzoo.GOOD_VARIANTS + """
[[models.tiny.variants]]
name = "worse"
format = "fp16"
bits = 16
path = "models/worse"
max_ratio = 1.05
"""


def test_green_run_prints_summary_and_writes_reports(pytester, tiny_zoo_template, tmp_path, monkeypatch):
    make_project(pytester, tiny_zoo_template)
    step_summary = tmp_path / "step_summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    result = run(pytester, "--quality-json", str(tmp_path / "q.json"))
    assert result.ret == 0
    result.assert_outcomes(passed=8)  # 2 corpora x 1 variant x 3 metrics + 2 protocol snapshots
    out = result.stdout.str()
    assert "| variant | format | bits | backend | corpus | PPL | FP16 PPL | relative PPL | bound | verdict |" in out
    assert "| tiny/close | fp16 | 16 | transformers | code |" in out
    assert re.search(r"quantgate: tiny/close: 6 of 6 checks in [0-9.]+s \[1/1 variants\]", out)  # progress line
    records = json.loads((tmp_path / "q.json").read_text())["records"]
    assert {(r["variant"], r["corpus"], r["verdict"]) for r in records} == {("close", "code", "pass"),
                                                                           ("close", "prose", "pass")}
    assert sorted(r["metric"] for r in records) == ["kl_divergence"] * 2 + ["relative_perplexity"] * 2 + [
        "top1_agreement"] * 2
    for r in records:
        assert r["format"] == "fp16" and r["bits"] == 16 and r["backend"] == "transformers"
        assert len(r["protocol_fingerprint"]) == 16
        if r["metric"] != "relative_perplexity":  # KL / top-1: the value with its 95% interval and bound
            assert r["interval"][0] <= r["value"] <= r["interval"][1] and r["bound"] in (0.05, 0.9)
            continue
        assert r["value"] > 0 and r["baseline"] > 0 and r["ratio"] == pytest.approx(r["value"] / r["baseline"])
        assert r["bound"] == 1.05
        assert 15.9 < r["bits_per_weight"] < 16.5  # an FP16 copy: size on disk x 8 / reference parameters
        d = r["distribution"]
        assert d["ppl_ratio_interval"][0] <= d["ppl_ratio"] <= d["ppl_ratio_interval"][1]
        assert d["kl_kind"] == "lower bound (top-8 + rest)" and d["tokens"] == r["tokens_scored"]
        # the same scores on the text's scale: bits per byte and word perplexity follow from the token perplexities
        n, (nbytes, words) = r["tokens_scored"], (r["text"]["bytes"], r["text"]["words"])
        assert 0 < words < nbytes
        for side, ppl in (("fp16", r["baseline"]), ("variant", r["value"])):
            assert r["bits_per_byte"][side] == pytest.approx(n * math.log(ppl) / (nbytes * math.log(2)), rel=1e-9)
            assert r["word_perplexity"][side] == pytest.approx(math.exp(n * math.log(ppl) / words), rel=1e-9)
    assert "quantgate summary" in step_summary.read_text()
    summary = (pytester.path / "reports" / "quality-summary.md").read_text()
    assert summary.count("tiny/close") == 6  # the main table, the tokenizer-independent one, the distributions
    assert "| variant | backend | corpus | bytes | words | FP16 bits/byte | bits/byte | FP16 word PPL | word PPL |" in summary
    assert "Power: the smallest relative perplexity change" in summary


def test_variant_beyond_its_bound_exits_1_with_the_full_message(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template, variants=WORSE)
    result = run(pytester)
    assert result.ret == 1
    out = result.stdout.str()
    assert "tiny/worse on code: relative perplexity" in out and "exceeds bound 1.05" in out
    for field in ("value     :", "baseline  :", "ratio     :", "bound     : 1.05 (manifest variant max_ratio)",
                  "table row : FP16", "protocol  :"):
        assert field in out
    result.assert_outcomes(passed=8, failed=6)  # worse fails perplexity, KL and top-1
    # with --quality-bisect a real quality failure stays "bad"
    assert run(pytester, "--quality-bisect").ret == 1


def test_problematic_row_is_xfail_with_numbers_and_reversal_fails(pytester, tiny_zoo_template):
    table = pytester.path / "table.toml"
    pytester.path.mkdir(exist_ok=True)
    table.write_text('[[row]]\nlabel = "Synthetic 2-bit"\nformat = "fp16"\nbits = 2\nexpected = "1.15-1.30+"\n'
                     'low = 1.15\nacceptable = "Problematic"\n\n[[row]]\nlabel = "FP16"\nformat = "fp16"\nbits = 16\n'
                     'expected = "1.00"\nlow = 1.0\nhigh = 1.0\nacceptable = "Yes"\n')
    variants = """
[[models.tiny.variants]]
name = "two-bit"
format = "fp16"
bits = 2
path = "models/worse"

[[models.tiny.variants]]
name = "uniform"
format = "fp16"
bits = 16
path = "models/uniform"
max_ratio = 1.05
"""
    make_project(pytester, tiny_zoo_template, variants=variants, extra='table = "table.toml"')
    result = run(pytester, "-rxX")
    result.assert_outcomes(passed=6, xfailed=6, failed=2)  # uniform: KL / top-1 reported (no bound in this table)
    out = result.stdout.str()
    assert "open-ended (1.15-1.30+)" in out and "xfail (problematic)" in out
    assert "tiny/uniform on code: PERPLEXITY REVERSAL" in out and "REVERSAL" in out
    assert result.ret == 1


def test_protocol_drift_fails_snapshot_and_refuses_comparison(pytester, tiny_zoo_template):
    manifest = make_project(pytester, tiny_zoo_template)
    original = manifest.read_text()
    manifest.write_text(original.replace("stride = 32", "stride = 16"))
    result = run(pytester)
    assert result.ret == 1
    out = result.stdout.str()
    assert "test_protocol_snapshot" in out and "'stride': 16" in out  # syrupy's readable diff
    assert "refusing to compare tiny/code: the protocol differs from the baseline's in stride" in out
    assert "stride: 16 != 32" in out
    assert run(pytester, "--quality-bisect").ret == BISECT_SKIP
    manifest.write_text(original)
    assert run(pytester).ret == 0


@pytest.mark.parametrize("preset", ["lm-eval"])  # every preset's rule: tests/test_presets.py
def test_a_protocol_preset_is_its_own_protocol(pytester, tiny_zoo_template, preset, tmp_path):
    """Choosing a preset moves the protocol (its scoring rule and token stream): the stored baselines are refused,
    a forced re-baseline under the preset passes the gate, and the JSON records the rule."""
    from quantgate.presets import get_preset

    manifest = make_project(pytester, tiny_zoo_template)
    # the tiny corpora are short: windows of 32 give the bootstrap its 10 blocks under either rule
    manifest.write_text(manifest.read_text().replace("max_length = 64\n", "max_length = 32\n")
                        .replace("stride = 32", f'stride = 16\npreset = "{preset}"'))
    out = run(pytester, "-k", "perplexity").stdout.str()
    assert "the protocol differs from the baseline's in" in out and "scoring_rule" in out
    assert cli.main(["baseline", "--manifest", str(manifest), "--all-profiles", "--no-snapshots", "--force"]) == 0
    pytester.runpytest("-m", "quality", "--snapshot-update", "-p", "no:cacheprovider")
    result = run(pytester, "--quality-json", str(tmp_path / "r.json"))
    assert result.ret == 0, result.stdout.str()
    baseline = json.loads((pytester.path / "baselines" / "tiny" / "code.full.json").read_text())
    assert baseline["protocol"]["scoring_rule"] == get_preset(preset).rule


def test_k_subset_does_not_fail_on_unselected_snapshots(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template)
    result = run(pytester, "-k", "prose")
    assert result.ret == 0
    result.assert_outcomes(passed=4)  # 3 metrics + the prose protocol snapshot
    assert "unused" not in result.stdout.str()


def test_missing_weight_fails_naming_it(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template)
    from safetensors.torch import load_file, save_file

    weights = pytester.path / "models" / "close" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    result = run(pytester, "--quality-bisect")
    assert result.ret == 1  # a broken checkpoint is bad, not untestable
    assert "did not load whole: missing weights: model.layers.1.mlp.down_proj.weight" in result.stdout.str()


def test_missing_checkpoint_is_untestable_under_bisect(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template)
    shutil.rmtree(pytester.path / "models" / "close")
    result = run(pytester)
    assert result.ret == 1 and "checkpoint not found" in result.stdout.str()
    assert run(pytester, "--quality-bisect").ret == BISECT_SKIP


def test_variant_with_another_tokenizer_is_bad(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template)
    close = pytester.path / "models" / "close"
    tok = json.loads((close / "tokenizer.json").read_text())
    merges = tok["model"]["merges"]
    tok["model"]["merges"] = merges[: len(merges) // 2]  # same vocabulary, different segmentation
    (close / "tokenizer.json").write_text(json.dumps(tok))
    result = run(pytester, "--quality-bisect")
    assert result.ret == 1
    assert "turns corpus 'code' into different token ids" in result.stdout.str()


def test_missing_baseline_names_the_command(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template)
    for f in (pytester.path / "baselines" / "tiny").glob("code.full.*"):
        f.unlink()
    result = run(pytester, "-k", "code")
    assert result.ret == 1
    assert "create it with: quantgate baseline --model tiny --corpus code" in result.stdout.str()


def test_strict_fails_a_run_that_skipped_a_check(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template)
    pytester.makeconftest("""
        import pytest
        def pytest_collection_modifyitems(items):
            for item in items:
                if "prose" in item.nodeid and "perplexity" in item.nodeid:
                    item.add_marker(pytest.mark.skip(reason="e.g. needs CUDA"))
    """)
    assert run(pytester).ret == 0
    strict = run(pytester, "--quality-strict")
    assert strict.ret == 1 and "--quality-strict: 3 quality check(s) skipped" in strict.stdout.str()
    assert run(pytester, "--quality-bisect").ret == BISECT_SKIP


@pytest.mark.parametrize("args", [("-k", "no_such_variant"), ("no/such/path.py",)])
def test_pytest_level_untestable_outcomes_exit_125_under_bisect(pytester, tiny_zoo_template, args):
    make_project(pytester, tiny_zoo_template)
    assert run(pytester, *args).ret in (4, 5)
    assert run(pytester, "--quality-bisect", *args).ret == BISECT_SKIP


def test_collection_error_exits_125_under_bisect(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template)
    (pytester.path / "quality_tests" / "test_broken.py").write_text("import no_such_module\n")
    assert run(pytester, "--quality-bisect").ret == BISECT_SKIP


def test_baseline_cli_never_overwrites_silently(pytester, tiny_zoo_template, capsys):
    manifest = make_project(pytester, tiny_zoo_template)
    path = pytester.path / "baselines" / "tiny" / "code.full.json"
    before = path.read_bytes()
    assert cli.main(["baseline", "--manifest", str(manifest), "--corpus", "code"]) == 0
    assert "up to date" in capsys.readouterr().out
    manifest.write_text(manifest.read_text().replace("stride = 32", "stride = 16"))
    assert cli.main(["baseline", "--manifest", str(manifest), "--corpus", "code"]) == 1
    assert "REFUSED" in capsys.readouterr().err and path.read_bytes() == before
    assert cli.main(["baseline", "--manifest", str(manifest), "--corpus", "code", "--force"]) == 0
    assert json.loads(path.read_text())["protocol"]["stride"] == 16


def test_environment_changes_are_reported_not_gated(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template)
    path = pytester.path / "baselines" / "tiny" / "code.full.json"
    doc = json.loads(path.read_text())
    doc["environment"]["torch"] = "1.0.0"
    path.write_text(json.dumps(doc))
    result = run(pytester)
    assert result.ret == 0
    out = result.stdout.str()
    assert "Environment differs from the baselines' (reported, not gated):" in out
    assert "torch: 1.0.0 -> " in out


def test_each_variant_is_loaded_once_and_freed_after_its_group(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template, variants=WORSE)
    (pytester.path / "quality_tests" / "test_again.py").write_text(
        "import pytest\n\n@pytest.mark.quality\ndef test_again(quality_case, quality_gate):\n"
        "    quality_gate.relative_perplexity(quality_case)\n")
    pytester.makeconftest("""
        import quantgate.residency as ev
        events = []
        _load, _release = ev.load_checkpoint, ev.release
        def load(*args, **kwargs):
            events.append("load " + kwargs["what"])
            return _load(*args, **kwargs)
        def release(loaded):
            events.append("free")
            return _release(loaded)
        ev.load_checkpoint, ev.release = load, release
        def pytest_sessionfinish(session):
            print("EVENTS", events)
    """)
    result = run(pytester, "-s", "-k", "perplexity or again")
    assert result.ret == 1  # 'worse' fails its bound, as intended
    events = next(line for line in result.stdout.lines if "EVENTS" in line)
    assert events.endswith("EVENTS ['load variant tiny/close', 'free', 'load variant tiny/worse', 'free']"), events


def test_a_format_that_needs_cuda_is_skipped_with_its_reason(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template)
    pytester.makeconftest("""
        import quantgate.residency as ev
        from quantgate.errors import DeviceUnavailable
        _load = ev.load_checkpoint
        def load(*args, **kwargs):
            raise DeviceUnavailable("variant tiny/close: this format needs CUDA; none here")
        ev.load_checkpoint = load
        def pytest_unconfigure(config):  # pytester runs in this process: later tests need the real loader
            ev.load_checkpoint = _load
    """)
    assert_skipped_as_untestable(pytester, "this format needs CUDA; none here")


def assert_skipped_as_untestable(pytester, reason):
    """Both perplexity checks skip with `reason`; --quality-strict fails that; bisect exits 125."""
    result = run(pytester, "-rs", "-k", "perplexity")
    assert result.ret == 0
    result.assert_outcomes(skipped=6)  # 2 corpora x 3 metrics
    assert reason in result.stdout.str()
    assert run(pytester, "-k", "perplexity", "--quality-strict").ret == 1
    assert run(pytester, "-k", "perplexity", "--quality-bisect").ret == BISECT_SKIP


def test_a_metric_registered_from_a_conftest_is_gated_and_reported(pytester, tiny_zoo_template, tmp_path, monkeypatch):
    """One register_metric call outside the package: the gate parametrizes it over every case, judges it
    against its bound and reports it (JSON and summary)."""
    from quantgate import metrics

    monkeypatch.setattr(metrics, "_REGISTRY", dict(metrics._REGISTRY))  # pytester runs in this process
    make_project(pytester, tiny_zoo_template)
    (pytester.path / "quality_tests" / "conftest.py").write_text(
        "from quantgate.metrics import Metric, register_metric\n"
        "register_metric(Metric(name='kl_p99', higher_is_better=False, bound_key='max_kl_p99',\n"
        "                       compute=lambda st: (st.kl_p99, None), default_bound=1e-12))\n")
    result = run(pytester, "--quality-json", str(tmp_path / "q.json"), "-k", "registered_metric")
    assert result.ret == 1
    result.assert_outcomes(failed=2)  # one per corpus of the one variant
    out = result.stdout.str()
    assert "test_registered_metric[tiny/close/code/kl_p99]" in out
    assert "tiny/close on code: kl p99" in out and "exceeds the bound 1e-12" in out
    assert "| tiny/close | code | kl_p99 |" in out and "| <= 1e-12 | FAIL |" in out
    records = json.loads((tmp_path / "q.json").read_text())["records"]
    assert {(r["metric"], r["verdict"], r["bound_source"]) for r in records} == {("kl_p99", "FAIL", "metric 'kl_p99' default")}


CAST_BLOCK = """
[[models.tiny.variants]]
name = "cast"
format = "bf16"
bits = 16
recipe = { builder = "transformers", dtype = "bfloat16" }
max_ratio = 1.05
max_kl = 0.05
min_top1 = 0.9
"""
CAST = tinyzoo.GOOD_VARIANTS + CAST_BLOCK


def test_recipe_variants_are_built_in_a_step_of_their_own(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template, variants=CAST)
    result = run(pytester, "-k", "cast", "-s")
    assert result.ret == 0
    out = result.stdout.str()
    assert "quantgate: build tiny/cast: built in" in out or "quantgate: build tiny/cast: cached" in out
    assert out.index("quantgate: build tiny/cast") < out.index("test_relative_perplexity")
    assert re.search(r"quantgate: prepared tiny \(2 corpora\): reference tokenizers and token ids in [\d.]+s", out)
    assert out.index("quantgate: build tiny/cast") < out.index("quantgate: prepared") < out.index("test_relative_perplexity")


HOLD_LOCK = """
import sys, time
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_build_step_moves_past_a_variant_another_process_is_building(pytester, tiny_zoo_template):
    """A variant whose build lock another process holds (another xdist worker building it): the build step goes
    on to the next, and the variant's first check waits for that build instead of building it twice."""
    import subprocess
    import sys

    from quantgate.manifest import load_manifest
    from quantgate.zoo import built_dir

    make_project(pytester, tiny_zoo_template, variants=CAST)
    manifest = load_manifest(pytester.path / "quantgate.toml")
    ref = manifest.models["tiny"]
    entry = built_dir(manifest, ref, next(v for v in ref.variants if v.name == "cast"))
    shutil.rmtree(entry, ignore_errors=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, f"{entry}.lock", "4"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    result = run(pytester, "-k", "cast", "-s")
    holder.wait()
    out = result.stdout.str()
    assert "quantgate: build tiny/cast: another process is building it; its checks wait for that build" in out
    assert result.ret == 0, out[-3000:]  # after the lock was let go, the first check built it and all passed
    assert (entry / "quantgate-recipe.json").is_file()


@pytest.mark.parametrize("bisect", [False, True], ids=["plain", "bisect"])
def test_a_failed_build_is_cannot_test_not_a_quality_failure(pytester, tiny_zoo_template, bisect):
    make_project(pytester, tiny_zoo_template)  # built and baselined without the recipe variant, then added
    (pytester.path / "quantgate.toml").write_text((pytester.path / "quantgate.toml").read_text() + CAST_BLOCK)
    (pytester.path / "quality_tests" / "conftest.py").write_text(  # a builder that fails, inside the run
        "import quantgate.zoo\n"
        "real = quantgate.zoo._run_builder\n"
        "def broken_builder(*args, **kwargs):\n"
        "    raise RuntimeError('the quantizer ran out of memory')\n"
        "quantgate.zoo._run_builder = broken_builder\n"
        "def pytest_unconfigure(config):  # the module outlives this in-process run: later tests build for real\n"
        "    quantgate.zoo._run_builder = real\n")
    result = run(pytester, "--quality-profile", "fast", *(["--quality-bisect"] if bisect else []))
    out = result.stdout.str()
    assert ("quantgate: build tiny/cast: FAILED: tiny/cast: its recipe build failed (RuntimeError: the quantizer ran "
            "out of memory); this says nothing about its quality") in out
    assert result.ret == (BISECT_SKIP if bisect else 1)
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 6  # the other variant's checks and the snapshots ran
    assert "BuildFailed: tiny/cast" in out


@pytest.mark.parametrize("table, problem", [
    ("[[row]]\nlabel = 'Q4'\n", "table.toml: row 0 lacks 'format'"),
    ("[[row]\n", "table.toml: the acceptability table cannot be read"),
])
def test_a_broken_acceptability_table_is_a_usage_error_before_collection(pytester, tiny_zoo_template, table, problem):
    """The manifest and its table are read at configure time: one usage error naming the file, not an error per check."""
    shutil.copytree(tiny_zoo_template, pytester.path, dirs_exist_ok=True)
    tinyzoo.write_manifest(pytester.path, variants=tinyzoo.GOOD_VARIANTS, extra_quantgate='table = "table.toml"')
    (pytester.path / "table.toml").write_text(table)
    (pytester.path / "quality_tests").mkdir(exist_ok=True)
    for f in (REPO / "quality_tests").glob("test_*.py"):
        shutil.copy(f, pytester.path / "quality_tests" / f.name)
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert problem in result.stderr.str() and "collected" not in result.stdout.str()
    assert run(pytester, "--quality-bisect").ret == BISECT_SKIP


def test_progress_lines_reach_the_terminal_of_a_real_run(pytester, tiny_zoo_template):
    """A line per variant as its checks finish, written outside pytest's output capture (a subprocess run, as a
    user's or CI's: the inline runs above capture differently), counting only the selected checks."""
    make_project(pytester, tiny_zoo_template)
    result = pytester.runpytest_subprocess("-m", "quality", "-p", "no:cacheprovider", "-k", "perplexity")
    assert result.ret == 0
    assert re.search(r"^quantgate: tiny/close: 6 of 6 checks in [0-9.]+s \[1/1 variants\]$", result.stdout.str(), re.M)
