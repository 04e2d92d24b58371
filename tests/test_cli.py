"""`python -m explorer`: the commands a user replays on a cluster, run for real on the demo model and a tiny one."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, ok=True):
    r = subprocess.run([sys.executable, "-m", "explorer", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    if ok and r.returncode != 0:
        raise AssertionError(r.stdout + r.stderr)
    return r


SMALL = ["--max-tokens", "512", "--block-len", "128"]


def test_stats_eval_plan_preview_apply(demo, tmp_path):
    r = run("stats", "--out", tmp_path / "stats.json", *SMALL)
    assert "calibration tokens" in r.stdout
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["num_experts"] == [8, 8, 8, 8]
    r = run("eval", *SMALL)
    assert "perplexity" in r.stdout and "bits/byte" in r.stdout and "shakespeare" in r.stdout
    r = run("plan", "--stats", tmp_path / "stats.json", "--drop-experts", "0.25", "--criterion", "reap",
            "--out", tmp_path / "plan.json")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert all(len(v) == 2 for v in plan["drop_experts"].values())
    assert "ranking reap: ranks agree across the two calibration halves with Spearman" in r.stdout
    run("plan", "--stats", tmp_path / "stats.json", "--recipe", tmp_path / "plan.json", "--out", tmp_path / "re.json")
    assert json.loads((tmp_path / "re.json").read_text())["drop_experts"] == plan["drop_experts"]
    for extra in (["--merge-to", "6", "--method", "hc-smoe"], ["--drop-layers", "1"], ["--drop-blocks", "1"],
                  ["--slim", "0.5"], ["--prune", "0.5", "--nm", "2:4"]):
        run("plan", "--stats", tmp_path / "stats.json", *extra, "--out", tmp_path / "p2.yaml", "--overwrite")
        assert (tmp_path / "p2.yaml").read_text().startswith("version: 1")
    r = run("preview", tmp_path / "plan.json", *SMALL)
    assert "plan:" in r.stdout and "before:" in r.stdout
    r = run("apply", tmp_path / "plan.json", "--out", tmp_path / "small", *SMALL)
    assert "written to" in r.stdout
    summary = json.loads((tmp_path / "small" / "summary.json").read_text())
    assert summary["report"]["experts_after"] == [6, 6, 6, 6]
    r = run("eval", tmp_path / "small", *SMALL)  # a folder written by apply is a MODEL too
    assert "perplexity" in r.stdout


def test_distill_cli(demo, tmp_path):
    (tmp_path / "plan.json").write_text('{"drop_experts": {"0": [0, 1], "1": [2, 3], "2": [4, 5], "3": [6, 7]}}')
    r = run("distill", tmp_path / "plan.json", "--steps", "4", "--eval-every", "2", "--out", tmp_path / "d", *SMALL)
    assert "perplexity" in r.stdout and "written to" in r.stdout
    assert (tmp_path / "d" / "plan.json").exists()
    r = run("distill", tmp_path / "plan.json", "--lr", "5", "--out", tmp_path / "bad", ok=False)
    assert r.returncode == 2 and "learning rate" in r.stderr and not (tmp_path / "bad").exists()


def test_errors_are_one_line_messages(tmp_path):
    r = run("eval", tmp_path / "missing", ok=False)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = run("preview", "demo", tmp_path / "nope.json", ok=False)
    assert r.returncode == 2 and "plan file not found" in r.stderr


def test_apply_never_overwrites_the_input_model(tmp_path):
    from explorer.tiny import tiny_model

    src = tmp_path / "m"
    tiny_model("olmoe").save_pretrained(src)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(ROOT / "assets" / "demo-moe").save_pretrained(src)
    (tmp_path / "plan.json").write_text('{"drop_experts": {"0": [1]}}')
    before = sorted(p.name for p in src.iterdir())
    r = run("apply", src, tmp_path / "plan.json", "--out", src, "--no-eval", ok=False)
    assert r.returncode == 2 and "input model" in r.stderr
    assert sorted(p.name for p in src.iterdir()) == before


def test_hf_dataset_without_network_is_a_clear_error():
    from explorer import DataError, load_data
    from explorer.loading import DEMO_MODEL
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    with pytest.raises(DataError, match="datasets|hub"):
        load_data(tok, "hf:wikitext:wikitext-2-raw-v1")


def test_the_cli_takes_its_defaults_and_choices_from_the_library():
    from explorer.cli import build_parser
    from explorer.distill import KL_KINDS, TRAINABLE, DistillConfig

    args = build_parser().parse_args(["distill", "demo", "p.json", "--out", "x"])
    cfg = DistillConfig()
    for name in ("steps", "lr", "warmup", "temperature", "kl", "hidden_mse", "expert_kd", "train", "eval_every", "seed"):
        assert getattr(args, name) == getattr(cfg, name), name
    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["distill"]._actions}
    assert list(actions["kl"].choices) == list(KL_KINDS) and list(actions["train"].choices) == list(TRAINABLE)


def test_every_refusal_shares_one_base():
    """The app and the CLI catch one class for every problem the explorer says in words."""
    from explorer.data import DataError
    from explorer.distill import DistillError
    from explorer.errors import ExplorerError
    from explorer.loading import ModelLoadError
    from explorer.layout import NoMoELayersError, UnsupportedModelError
    from explorer.outputs import OutputError
    from explorer.plan import PlanError
    from explorer.session import SessionError
    from explorer.stats import StatsFileError
    from explorer.tasks import TaskError
    from explorer.weightformats import WeightFormatError

    for cls in (DataError, DistillError, ModelLoadError, NoMoELayersError, UnsupportedModelError, OutputError,
                PlanError, SessionError, StatsFileError, TaskError, WeightFormatError):
        assert issubclass(cls, ExplorerError) and issubclass(cls, ValueError), cls
    import app

    assert ExplorerError in app.USER_ERRORS
