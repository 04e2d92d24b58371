"""Task accuracy with lm-evaluation-harness: the CLI on the demo's offline tasks, a preview scored like its export,
a task folder, the missing extra and unknown tasks in words, generation side by side, and the shipped tasks' data."""
import json
import sys

import pytest
import torch

from explorer.cli import main
from explorer.assets import ASSETS

pytest.importorskip("lm_eval")

LIMIT = 40


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_prints_each_demo_task_with_its_standard_error(capsys):
    code, out, err = _cli(capsys, "eval", "demo", "--tasks", "demo", "--limit", LIMIT, "--no-perplexity")
    assert code == 0, err
    names = sorted(p.stem for p in (ASSETS / "tasks").glob("*.yaml"))
    assert len(names) == 5
    for name in names:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        assert "±" in line and f"n={LIMIT}" in line


def test_a_preview_scores_as_its_export(demo, tmp_path):
    """The harness run inside ``previewing`` gives the exported model's numbers; the original is untouched."""
    from explorer import collect_stats, load_data, load_model, planners
    from explorer.apply import apply_plan, export
    from explorer.preview import previewing
    from explorer.tasks import evaluate_tasks

    model, tok, view = demo
    stats = collect_stats(model, view, load_data(tok, "demo", max_tokens=1024).calib)
    plan = planners.drop_experts(stats, 0.5, "frequency")
    tasks = "demo_next_line_code,demo_next_word"
    before = evaluate_tasks(model, tok, tasks, limit=LIMIT)
    with previewing(model, view, plan):
        prev = evaluate_tasks(model, tok, tasks, limit=LIMIT)
    again = evaluate_tasks(model, tok, tasks, limit=LIMIT)
    new, _, layout = apply_plan(model, view, plan)
    out = export(new, tok, plan, tmp_path / "cut", layout=layout)
    cut, tok2, _ = load_model(out, device="cpu")
    exported = evaluate_tasks(cut, tok2, tasks, limit=LIMIT)
    for t in prev["tasks"]:
        assert exported["tasks"][t]["value"] == pytest.approx(prev["tasks"][t]["value"], abs=1e-9), t
        assert again["tasks"][t]["value"] == before["tasks"][t]["value"]
    assert any(prev["tasks"][t]["value"] != before["tasks"][t]["value"] for t in prev["tasks"])  # the cut shows


def test_a_folder_of_task_yamls_runs_from_anywhere(demo, tmp_path, monkeypatch, capsys):
    """A user's own task: YAML + jsonl in a folder, its data file relative to the YAML, run from another folder."""
    folder = tmp_path / "mytasks"
    folder.mkdir()
    items = [{"q": "In the beginning God created the", "choices": [" heaven", " keyboard"], "label": 0},
             {"q": "def main():\n    return", "choices": [" None", " thee"], "label": 0}] * 5
    (folder / "mine.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (folder / "mine.yaml").write_text(
        "task: my_two_way\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: mine.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = _cli(capsys, "eval", "demo", "--tasks", folder, "--no-perplexity")
    assert code == 0, err
    assert "my_two_way" in out and "(n=10)" in out


def test_missing_extra_and_unknown_tasks_are_said_before_the_model_loads(tmp_path, monkeypatch, capsys):
    missing_model = tmp_path / "no-such-model"
    code, out, err = _cli(capsys, "eval", missing_model, "--tasks", "no_such_task_anywhere")
    assert code != 0 and "unknown lm-eval task" in err and "no_such_task_anywhere" in err
    code, out, err = _cli(capsys, "eval", missing_model, "--tasks", tmp_path)
    assert code != 0 and "holds no task YAML" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the eval extra were not installed
    code, out, err = _cli(capsys, "preview", missing_model, tmp_path / "p.json", "--tasks", "demo")
    assert code != 0
    code, out, err = _cli(capsys, "eval", missing_model, "--tasks", "demo")
    assert code != 0 and '.[eval]' in err and "not found" not in err


def test_generation_side_by_side(demo, capsys, tmp_path):
    from explorer.plan import Plan
    from explorer.tasks import generate, side_by_side

    model, tok, view = demo
    plan = Plan(drop_layers=list(range(len(view) - 1)))  # all MoE sub-layers but one gone: the text changes
    before = generate(model, tok, ["def fibonacci(n):\n"], 16)
    rows = side_by_side(model, view, plan, tok, ["def fibonacci(n):\n"], max_new_tokens=16)
    assert rows[0]["original"] == before[0] and rows[0]["preview"] != rows[0]["original"]
    assert generate(model, tok, ["def fibonacci(n):\n"], 16) == before  # the model is as it was
    plan.to_json(tmp_path / "p.json")
    code, out, err = _cli(capsys, "preview", "demo", tmp_path / "p.json", "--max-tokens", "512",
                          "--generate", "def fib(", "--max-new-tokens", "8")
    assert code == 0, err
    assert "prompt: 'def fib('" in out and "original:" in out and "preview:" in out


def test_the_shipped_tasks_come_from_the_held_out_split_only():
    """Plans are made on the calibration split; tasks on it would reward overfitting to it."""
    calib = {d.name: (d / "calib.txt").read_text("utf-8") for d in (ASSETS / "corpus").iterdir() if d.is_dir()}
    held = {d.name: (d / "eval.txt").read_text("utf-8") for d in (ASSETS / "corpus").iterdir() if d.is_dir()}
    n = 0
    for f in sorted((ASSETS / "tasks").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            item = json.loads(line)
            dom = item.get("domain") or f.stem.rsplit("_", 1)[-1]
            ctx = item["context"][-120:]
            assert ctx in held[dom] and ctx not in calib[dom], (f.name, ctx)
            n += 1
    assert n >= 500 * 2
    for f in sorted((ASSETS / "tasks").glob("demo_next_line_*.jsonl")):
        items = [json.loads(x) for x in f.read_text().splitlines()]
        assert len(items) >= 500
        assert all(len(x["choices"]) == 4 and x["choices"][x["label"]] for x in items)
        labels = torch.tensor([x["label"] for x in items])
        assert torch.bincount(labels, minlength=4).min() > len(items) / 8  # the answer is not always in one place


def test_a_hub_dataset_that_cannot_be_reached_is_said_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """A task whose data lives on the hub, offline and not cached: words, before any model loads."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    (tmp_path / "hub.yaml").write_text(
        "task: needs_the_hub\ndataset_path: explorer-test/no-such-dataset\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n")
    code, out, err = _cli(capsys, "eval", tmp_path / "no-such-model", "--tasks", tmp_path / "hub.yaml")
    assert code != 0 and "cannot be read" in err and "work offline" in err and "not found" not in err
