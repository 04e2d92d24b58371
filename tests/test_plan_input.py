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
