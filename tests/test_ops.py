"""The operations registry: adding a compression operation is an ``Operation`` (what it does) and a ``Planning``
(how it is chosen) in one user module, with no file of the package changed, and the core names no operation."""
import ast
from pathlib import Path

import pytest
import torch

from explorer import perplexity, planners
from explorer.apply import apply_plan
from explorer.cli import build_parser
from explorer.data import TokenBlocks
from explorer.moe import MoEModel
from explorer.ops import OPS, Operation, register
from explorer.planners import PLANNING, Planning, presets, register_planning
from explorer.plan import Plan, PlanError
from explorer.preview import preview_perplexity
from explorer.stats import collect_stats
from explorer.tiny import tiny_model, random_blocks

ROOT = Path(__file__).resolve().parents[1]


def _blocks(n=6, L=24, seed=0):
    return random_blocks(n, L, seed)


class ScaleExperts(Operation):
    """A new operation written as a user would: scale the down projection of chosen experts."""

    name = "scale_experts"
    summary = "multiply chosen experts' outputs by a factor"

    def parse(self, value):
        if not isinstance(value, dict):
            raise PlanError("scale_experts maps MoE layers to a factor")
        return {int(k): float(v) for k, v in value.items()}

    def dump(self, spec):
        return {str(k): v for k, v in sorted(spec.items())}

    def validate(self, spec, plan, view):
        for i, f in spec.items():
            if not 0 < f <= 4:
                raise PlanError(f"scale_experts: factor {f} of MoE layer {i} is not in (0, 4]")

    def describe(self, spec):
        return f"scale experts of {len(spec)} layer(s)"

    def touches(self, spec, lay):
        return lay.index in spec

    def edit(self, spec, ctx):
        for e in ctx.kept:
            gu, dn, gb, db = ctx.per[e]
            ctx.per[e] = (gu, dn * spec[ctx.lay.index], gb, None if db is None else db * spec[ctx.lay.index])

    def expert_bytes(self, spec, lay, kept, params_per_expert):
        return None


class ScalePlanning(Planning):
    """How it is chosen: its planner, its preset and its ``explorer plan`` option."""

    op = "scale_experts"
    preset = "scale"

    def preset_args(self, amount, opts, session):
        return {"factor": float(amount)}

    cli_flag = "scale_experts"

    def add_cli(self, parser, choice):
        choice.add_argument("--scale-experts", type=float, metavar="FACTOR")

    def from_cli(self, args, skip, view):
        return None if args.scale_experts is None else ("scale_experts", {"factor": args.scale_experts})


def scale_plan(stats, factor: float) -> Plan:
    return Plan(scale_experts={i: factor for i in range(len(stats.layers))}, notes=f"scale by {factor}",
                recipe=[{"planner": "scale_experts", "factor": factor}])


ScalePlanning.planners = {"scale_experts": scale_plan}


@pytest.fixture
def scale_op():
    op = register(ScaleExperts())
    planning = register_planning(ScalePlanning())
    try:
        yield op, planning
    finally:
        OPS.pop(op.name)
        PLANNING.pop(op.name)


def test_a_new_operation_is_one_module(scale_op):
    """Registered once, the operation is read, written, checked, described, combined, planned, previewed, applied,
    accounted for and offered on the command line, with no file of the package changed: nothing in it names the
    operation, its field or its planner."""
    scale_op, planning = scale_op
    package = [*(ROOT / "explorer").rglob("*.py"), ROOT / "app.py"]
    assert not [p for p in package if "scale_experts" in p.read_text() or "ScaleExperts" in p.read_text()]
    model = tiny_model("qwen2_moe", seed=3)
    view = MoEModel(model)
    blocks = _blocks()
    stats = collect_stats(model, view, blocks)
    plan = Plan.from_dict({"scale_experts": {"0": 0.25}, "drop_experts": {"1": [0]}})
    assert plan.scale_experts == {0: 0.25} and plan.ops["scale_experts"] == {0: 0.25}
    assert Plan.from_dict(plan.to_dict()) == plan and plan.to_dict()["scale_experts"] == {"0": 0.25}
    assert "scale experts of 1 layer(s)" in plan.describe() and "drop" in plan.describe()
    with pytest.raises(PlanError, match="factor 9.0 of MoE layer 0"):
        Plan(scale_experts={0: 9}).validate(view)
    both = plan.combine(Plan(scale_experts={1: 0.5}))
    assert both.scale_experts == {1: 0.5} and both.drop_experts == {1: [0]}  # the default: the other plan's wins

    base = perplexity(model, blocks).ppl
    prev = preview_perplexity(model, view, plan, blocks, stats=stats).ppl
    new, new_view, _ = apply_plan(model, view, plan, stats=stats)
    applied = perplexity(new, blocks).ppl
    assert abs(prev - applied) / applied < 1e-4
    assert abs(prev - base) / base > 1e-3  # the edit did something
    assert torch.allclose(new_view[0].down, view[0].down * 0.25, atol=1e-6)
    assert plan.report(view)["experts_after"] == [lay.num_experts - (lay.index == 1) for lay in view]

    made = planners.make("scale_experts", stats, view, factor=0.5)
    assert made.scale_experts == {i: 0.5 for i in range(len(view))}
    assert planners.replay(made.recipe, stats, view) == made
    assert presets()["scale"] is planning
    args = build_parser().parse_args(["plan", "--scale-experts", "0.5", "--stats", "s.json", "--out", "p.json"])
    assert planning.from_cli(args, [], view) == ("scale_experts", {"factor": 0.5})


def test_plan_fields_belong_to_one_operation_each():
    keys = [k for op in OPS.values() for k in op.keys]
    assert len(keys) == len(set(keys))
    with pytest.raises(ValueError, match="already belong"):
        register(type("Clash", (Operation,), {"name": "clash", "keys": ("slim",)})())
    with pytest.raises(TypeError, match="no field 'shrink'"):
        Plan(shrink=0.5)


# what offers particular operations by design, and so may name them: the plan editor's click-to-drop and merge-group
# picking (session/editor, widgets, app), the progressive schedule's stages (distill), the family table's plans,
# the sweep's grid
OFFERS_OPERATIONS = {"explorer/session/editor.py", "explorer/widgets.py", "explorer/distill.py",
                     "explorer/families.py", "explorer/sweep.py"}


def test_the_core_names_no_operation():
    """No attribute access to an operation's plan field and no string equal to one (dispatch by name) in any
    module of the package outside the operations, their planners and the front ends that offer particular
    operations: docstrings and messages may mention operations, code may not pick them out."""
    keys = {k for op in OPS.values() for k in op.keys} | set(OPS)
    core = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "explorer").rglob("*.py")
                  if not {"ops", "planners"} & set(p.relative_to(ROOT).parts) and
                  str(p.relative_to(ROOT)) not in OFFERS_OPERATIONS)
    assert "explorer/plan.py" in core and "explorer/checkpoint.py" in core and len(core) > 30
    found = []
    for rel in core:
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            hit = (isinstance(node, ast.Attribute) and node.attr in keys) or (
                isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in keys)
            if hit:
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "operations named outside explorer/ops:\n" + "\n".join(found)


def test_session_preset_and_cli_take_every_operation_from_the_registry():
    from explorer.session import METHODS, PRESETS

    assert set(PRESETS) == set(presets())
    assert set(METHODS) == {m for p in PLANNING.values() for m in p.methods}
    plan_parser = build_parser()._subparsers._group_actions[0].choices["plan"]
    flags = {a.dest for a in plan_parser._actions}
    assert all(p.cli_flag in flags for p in PLANNING.values())
    assert set(PLANNING) == set(OPS)  # every operation says how it is chosen
