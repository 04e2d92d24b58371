"""Planners: write a Plan from statistics and scores. They only choose; ``Plan.validate`` checks.

One module per operation says how it is chosen (``explorer.planners.<operation>``: its planner, the app's preset,
its ``explorer plan`` option, registered by the operation's name in ``base.PLANNING``); this module runs planners
by recipe name and replays recipes.
"""
from __future__ import annotations

import inspect

from ..errors import PlanError
from ..moe import MoEModel
from ..plan import Plan
from ..stats import RouterStats
from .base import (PLANNING, LayerListPlanning, Planning, all_planners, planner_owner, preset_methods,  # noqa: F401
                   presets, register_planning, stats_meta)
# the order of these imports is the registry's (the order of explorer.ops); the planners by their public names
from .drop_experts import drop_experts  # noqa: E402,F401,I001
from .merge import merge_experts  # noqa: F401
from .slim import slim_experts  # noqa: F401
from .prune import prune_weights  # noqa: F401
from .drop_layers import drop_layers  # noqa: F401
from .drop_blocks import drop_blocks  # noqa: F401
from .quantise import quantise_plan  # noqa: F401
from ..ops.merge import MERGE_METHODS  # noqa: F401

# the app's preset names -> the planner each runs
PRESETS = {name: next(iter(p.planners)) for name, p in presets().items()}
AMOUNTS = ("fraction", "sparsity", "keep", "n", "to", "bits", "budget_bytes")  # numbers, never words


def make(name: str, stats: RouterStats, view: MoEModel | None = None, **kw) -> Plan:
    """Run planner ``name`` with arguments as a recipe step stores them (JSON keys are strings: the planners make
    them ints). The one entry point of ``replay``, the app's presets and ``explorer plan``."""
    if view is not None and stats is not None:
        stats.check_fits(view)
    op = planner_owner(name)
    if op is None:
        raise PlanError(f"unknown planner {name!r}: one of {', '.join(all_planners())}")
    fn = op.planners[name]
    if name in op.needs_view and view is None:
        raise PlanError(f"planner {name} needs the model's view")
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kw) - set(params) - {"view"})
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise PlanError(f"planner {name} takes no argument {', '.join(unknown)}; it takes "
                        f"{', '.join(p for p in params if p not in ('stats', 'view'))}")
    for k, v in kw.items():
        if k in AMOUNTS and k != "bits" and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, dict))):
            raise PlanError(f"planner {name}: {k} must be a number, got {v!r}")
    if "view" in params:
        kw["view"] = view
    return fn(stats, **kw)


def takes_scores(name: str) -> bool:
    """Whether planner ``name`` scores experts with a model and data (reconstruction, ablation criteria)."""
    op = planner_owner(name)
    return op is not None and any(p.kind == p.VAR_KEYWORD
                                  for p in inspect.signature(op.planners[name]).parameters.values())


def replay(recipe: list[dict], stats: RouterStats, view: MoEModel | None = None, **score_kw) -> Plan:
    """Run a plan's recipe (the planner calls that wrote it) on another model's statistics.

    This is how a plan prototyped on a small model becomes the plan for the full one: the same criteria and
    amounts, with the expert indices chosen from the full model's own statistics.
    """
    if not recipe:
        raise PlanError("this plan has no recipe (it was written by hand): there is nothing to replay")
    if not isinstance(recipe, list):
        raise PlanError("a recipe is a list of planner calls ({'planner': 'drop_experts', ...})")
    out: Plan | None = None
    for step in recipe:
        if not isinstance(step, dict):
            raise PlanError(f"each recipe step is a planner call ({{'planner': ..., ...}}), got {step!r}")
        kw = dict(step)
        name = kw.pop("planner", None)
        if planner_owner(name) is None:
            raise PlanError(f"unknown planner in recipe: {name!r}")
        p = make(name, stats, view, **kw, **(score_kw if takes_scores(name) else {}))
        out = p if out is None else out.combine(p)
    return out
