"""Plans from strangers and careless hands: refused in words, fast, never silently truncated or expanded."""
import time

import pytest

from explorer.moe import MoEModel
from explorer.plan import Plan, PlanError
from explorer.tiny import tiny_model


@pytest.mark.parametrize("text,match", [
    ('{"drop_experts": {"0": [1.9, 2.7]}}', "whole number, got 1.9"),
    ('{"drop_experts": {"0": [true]}}', "whole number, got True"),
    ('{"drop_experts": {"0": [Infinity]}}', "whole number, got inf"),
    ('{"merge": {"0": [[1, 2]]}, "merge_weights": {"0": [[NaN, 1]]}}', "finite numbers, got nan"),
    ('{"merge": {"0": [[1, 2]]}, "merge_weights": {"0": [[Infinity, 1]]}}', "finite numbers, got inf"),
    ("notes: [a, b]\n", "notes must be text"),
    ('{"recipe": ["drop", "merge"]}', "recipe must be a list of planner calls"),
    ('{"merge": {"0": [1, 2]}}', r"merge of layer 0 must be a list of groups"),
])
def test_silently_accepted_values_are_refused(text, match):
    with pytest.raises(PlanError, match=match):
        Plan.loads(text)


def test_yaml_alias_bomb_is_refused_at_once():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    t = time.perf_counter()
    with pytest.raises(PlanError, match="anchors or aliases"):
        Plan.loads(bomb)
    assert time.perf_counter() - t < 5  # 9**9 leaves were accepted (and expanded) before


@pytest.mark.parametrize("text", ["[" * 200_000 + "]" * 200_000, "a:\n" + "".join(" " * i + "- \n" for i in range(1, 3000)),
                                  "[" * 50_000 + "]" * 50_000])
def test_deep_plans_get_a_message_not_a_recursion_error(text):
    with pytest.raises(PlanError):
        Plan.loads(text)


def test_plan_paths_that_are_not_files(tmp_path):
    with pytest.raises(PlanError, match="is not a plan file"):
        Plan.load(tmp_path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(PlanError, match="not text"):
        Plan.load(tmp_path / "bin.json")


def test_a_plan_leaving_no_moe_layer_is_refused():
    view = MoEModel(tiny_model("deepseek_v3", seed=0))  # decoder layer 0 is dense, 1 and 2 are MoE
    with pytest.raises(PlanError, match="removes every MoE layer"):
        Plan(drop_layers=[1], drop_blocks=[1]).validate(view)
    Plan(drop_layers=[1]).validate(view)  # one MoE layer is left: fine


def test_checkpoints_whose_index_leaves_the_folder_or_is_damaged(tmp_path):
    import json

    from explorer.checkpoint import apply_checkpoint
    from explorer.loading import ModelLoadError, load_model

    model = tiny_model("mixtral", seed=0)
    src = tmp_path / "m"
    model.save_pretrained(src, max_shard_size="100KB")
    idx = src / "model.safetensors.index.json"
    good = json.loads(idx.read_text())
    plan = Plan(drop_experts={i: [1] for i in range(3)})
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(set(good["weight_map"].values()))[0]
    (outside / "stolen.safetensors").write_bytes((src / first).read_bytes())
    bad = {**good, "weight_map": {k: ("../outside/stolen.safetensors" if v == first else v)
                                  for k, v in good["weight_map"].items()}}
    idx.write_text(json.dumps(bad))
    with pytest.raises(PlanError, match="lies outside the model folder"):
        apply_checkpoint(src, plan, tmp_path / "o1")
    with pytest.raises(ModelLoadError, match="lies outside the model folder"):
        load_model(src, with_tokenizer=False)
    idx.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(PlanError, match="no readable weight_map"):
        apply_checkpoint(src, plan, tmp_path / "o2")
    idx.write_text(json.dumps(good))
    data = (src / first).read_bytes()
    (src / first).write_bytes(data[: len(data) // 2])  # a truncated shard
    with pytest.raises(PlanError, match="damaged or incomplete"):
        apply_checkpoint(src, plan, tmp_path / "o3")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_cli_inputs_that_were_tracebacks_or_silent(tmp_path, capsys):
    import os

    from explorer.cli import main

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("Café crème, naïve façade. " * 400).encode("latin-1"))
    for data, words in (("/dev/null", "not a regular file"), (str(fifo), "not a regular file"),
                        (str(tmp_path / "latin.txt" / "x"), "not found")):
        assert main(["eval", "--data", data, "--max-tokens", "256"]) == 2
        assert words in capsys.readouterr().err, data
    assert main(["eval", "--data", str(latin), "--max-tokens", "256", "--block-len", "64"]) == 0  # text in Latin-1
    plan = tmp_path / "p.json"
    assert main(["stats", "--max-tokens", "256", "--out", str(tmp_path / "s.json")]) == 0
    assert main(["plan", "--stats", str(tmp_path / "s.json"), "--merge-to", "99", "--out", str(plan)]) == 2
    assert "changes nothing" in capsys.readouterr().err and not plan.exists()
    assert main(["plan", "--stats", str(tmp_path / "missing.json"), "--drop-experts", "0.25",
                 "--out", str(plan)]) == 2
    assert "not found" in capsys.readouterr().err and not plan.exists()
    Plan(drop_experts={0: [1]}).to_json(plan)
    assert main(["distill", str(plan), "--steps", "2", "--hidden-mse", "nan", "--out", str(tmp_path / "d")]) == 2
    assert "finite" in capsys.readouterr().err
    assert main(["apply", str(plan), "--out", str(tmp_path)]) == 2  # a plan path that is a folder, below
    capsys.readouterr()
    assert main(["apply", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a plan file" in capsys.readouterr().err


def test_offload_folder_inside_the_input_model_is_refused(tmp_path):
    from explorer.loading import ModelLoadError, load_model

    model = tiny_model("mixtral", seed=0)
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="lies inside the model folder"):
        load_model(tmp_path / "m", with_tokenizer=False, device_map="auto", max_memory="cpu=1MB",
                   offload_folder=tmp_path / "m" / "off")
    assert not (tmp_path / "m" / "off").exists()


def test_recipes_with_unknown_arguments_words_or_strings_are_refused_in_words():
    from explorer import planners
    from explorer.families import _blocks
    from explorer.stats import collect_stats

    model = tiny_model("mixtral", seed=0)
    view = MoEModel(model)
    stats = collect_stats(model, view, _blocks(256))
    for recipe, match in (([{"planner": "merge_experts", "to": 4, "colour": "red"}], "takes no argument colour"),
                          ([{"planner": "slim_experts", "keep": "half"}], "keep must be a number"),
                          (["drop_experts"], "each recipe step is a planner call"),
                          ("drop", "a recipe is a list")):
        with pytest.raises(PlanError, match=match):
            planners.replay(recipe, stats, view)


@pytest.mark.parametrize("slim", [0.3, 0.62, 0.9])
def test_slimmed_models_run_in_transformers_default_kernel(slim):
    """Widths whose bf16 rows are not a multiple of 16 bytes crashed grouped_mm ("strides should be multiple of 16
    bytes"); slim widths are multiples of 8 and the applied model runs in the default kernel."""
    import torch

    from explorer.apply import apply_plan
    from explorer.families import _blocks, _logits
    from explorer.stats import collect_stats

    model = tiny_model("mixtral", seed=0, dtype=torch.bfloat16)
    view = MoEModel(model)
    stats = collect_stats(model, view, _blocks(256))
    new, nv, _ = apply_plan(model, view, Plan(slim=slim), stats)
    assert nv[0].intermediate_size % 8 == 0
    assert torch.isfinite(_logits(new, _blocks(256))).all()
