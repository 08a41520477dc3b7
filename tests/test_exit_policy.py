"""The exit-status policy as a pure function: what CI and `git bisect run` see, without running pytest."""

import pytest

from quantgate.session import BISECT_SKIP, QualitySession, exit_status

OK, FAILED, INTERRUPTED, USAGE, NO_TESTS = 0, 1, 2, 4, 5


@pytest.mark.parametrize("pytest_status, bad, untestable, skipped, bisect, strict, expected", [
    (OK, 0, 0, 0, False, False, OK),                  # all passed
    (FAILED, 1, 0, 0, False, False, FAILED),          # a threshold failed
    (OK, 0, 0, 1, False, False, OK),                  # a skip is not a failure...
    (OK, 0, 0, 1, False, True, FAILED),               # ...unless --quality-strict: a gate never goes green by skipping
    (FAILED, 0, 1, 0, False, False, FAILED),          # cannot test (plain run): pytest's failure stands
    (FAILED, 0, 1, 0, True, False, BISECT_SKIP),      # under bisect: skip the commit
    (OK, 0, 0, 1, True, False, BISECT_SKIP),          # a skipped check under bisect: cannot test here
    (FAILED, 1, 1, 0, True, False, FAILED),           # a real failure beats an untestable one
    (FAILED, 1, 0, 1, True, True, FAILED),
    (NO_TESTS, 0, 0, 0, True, False, BISECT_SKIP),    # nothing collected at this commit
    (USAGE, 0, 0, 0, True, False, BISECT_SKIP),       # a usage error inside the session
    (INTERRUPTED, 0, 0, 0, True, False, BISECT_SKIP),  # collection error
    (NO_TESTS, 0, 0, 0, False, False, NO_TESTS),      # outside bisect pytest's code is kept
])
def test_exit_status(pytest_status, bad, untestable, skipped, bisect, strict, expected):
    assert exit_status(pytest_status, bad=bad, untestable=untestable, skipped=skipped, bisect=bisect,
                       strict=strict) == expected


def session(tmp_path, **flags):
    return QualitySession(manifest_option=None, profile_option=None, device_option="cpu", json_path=None,
                          summary_path=None, rootdir=tmp_path, **{"bisect": False, "strict": False, **flags})


def test_the_ledger_classifies_outcomes_and_finish_applies_the_policy(tmp_path):
    s = session(tmp_path, bisect=True)
    s.record("a", skipped=False, failed=True, untestable=True)
    s.record("b", skipped=True, failed=False, untestable=False)
    s.record("c", skipped=False, failed=False, untestable=False)
    assert (s.untestable, s.skipped, s.bad) == (["a"], ["b"], [])
    assert s.finish(FAILED) == BISECT_SKIP
    assert s.closing_lines() == [("quantgate bisect: cannot test here, exit 125: a, b", False)]
    s.record("d", skipped=False, failed=True, untestable=False)
    assert s.finish(FAILED) == FAILED and s.closing_lines()[0][0] == "quantgate bisect: bad (quality failure)"


def test_the_header_is_printed_only_where_quantgate_is_in_use(tmp_path):
    assert not session(tmp_path).in_use()
    (tmp_path / "quantgate.toml").write_text("")
    assert session(tmp_path).in_use()


def test_progress_says_when_each_variant_is_done_and_how_far_the_run_is():
    from quantgate.session import Progress

    p = Progress(total={("m", "a"): 3, ("m", "b"): 2})
    assert p.finished(("m", "a")) is None  # never started: nothing to say
    for _ in range(3):
        p.started(("m", "a"))
    line = p.finished(("m", "a"))
    assert line.startswith("quantgate: m/a: 3 of 3 checks in ") and line.endswith("s [1/2 variants]")
    p.started(("m", "b"))
    line = p.finished(("m", "b"))
    assert "m/b: 1 of 2 checks" in line and line.endswith("[2/2 variants]")
    assert [x.split(":")[1] for x in p.take_lines()] == [" m/a", " m/b"] and p.take_lines() == []
