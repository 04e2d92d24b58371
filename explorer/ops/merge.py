"""Expert merging (MC-SMoE, HC-SMoE): each group of experts becomes one, the frequency-weighted average of its
members, optionally after aligning their neurons by permutation; the router keeps the row of the group's FIRST
member (planners put the dominant, most used, expert first).

Plan fields: ``merge: {moe_layer: [[expert, ...], ...]}``, ``merge_weights: {moe_layer: [[w, ...], ...]}`` (stored
so that a replay is exact; from statistics when absent, and refused in words without either) and
``merge_align: bool``.
"""
from __future__ import annotations

from ..errors import PlanError
from .base import FEWER_EXPERTS_SPEED, EditContext, Operation, int_keys, read_ids, read_weight, register

MERGE_METHODS = ("mc-smoe", "hc-smoe")


class Merge(Operation):
    name = "merge"
    keys = ("merge", "merge_weights", "merge_align")
    defaults = {"merge": {}, "merge_weights": {}, "merge_align": False}
    always_written = True
    summary = "merge groups of experts into one (MC-SMoE, HC-SMoE), weighted by use, neurons optionally aligned"

    def read(self, fields: dict):
        for k, ex in (("merge", '{"0": [[1, 2]]}'), ("merge_weights", '{"0": [[3.0, 1.0]]}')):
            v = fields.get(k)
            if v is not None and not isinstance(v, dict):
                raise PlanError(f"{k} must map MoE layers to lists, e.g. {ex}; got {type(v).__name__}")
            for i, g in (v or {}).items():
                if not isinstance(g, list) or not all(isinstance(x, list) for x in g):
                    raise PlanError(f"{k} of layer {i} must be a list of groups, e.g. [[1, 2]]; got {g!r}")
        groups = {k: [read_ids(g, "merge group ids") for g in v] for k, v in int_keys(fields.get("merge")).items()}
        groups = {k: v for k, v in groups.items() if v}
        if not groups:
            return None
        return {"merge": groups,
                "merge_weights": {k: [[read_weight(w) for w in g] for g in v]
                                  for k, v in int_keys(fields.get("merge_weights")).items()},
                "merge_align": bool(fields.get("merge_align", False))}

    def write(self, spec) -> dict:
        if spec is None:
            return super().write(None)
        return {"merge": {str(i): v for i, v in sorted(spec["merge"].items())},
                "merge_weights": {str(i): v for i, v in sorted(spec["merge_weights"].items())},
                "merge_align": spec["merge_align"]}

    def value(self, spec, key: str):
        return spec[key]

    def validate(self, spec, plan, view) -> None:
        for i, ws in spec["merge_weights"].items():
            groups = spec["merge"].get(i, [])
            if len(ws) != len(groups) or any(len(w) != len(g) for w, g in zip(ws, groups)):
                raise PlanError(f"MoE layer {i}: merge_weights do not match the merge groups")
            if any(x < 0 for w in ws for x in w) or any(sum(w) <= 0 for w in ws):
                raise PlanError(f"MoE layer {i}: merge_weights must be non-negative with a positive sum")
        for i, groups in spec["merge"].items():
            for g in groups:
                if len(g) < 2:
                    raise PlanError(f"MoE layer {i}: merge group {g} needs at least two experts")

    def describe(self, spec) -> str:
        m = spec["merge"]
        return f"merge {sum(len(g) for v in m.values() for g in v)} experts into {sum(len(v) for v in m.values())}"

    def combine(self, mine, other):
        out = {k: {i: list(v) for i, v in mine[k].items()} for k in ("merge", "merge_weights")}
        for k in ("merge", "merge_weights"):
            for i, v in other[k].items():
                out[k][i] = out[k].get(i, []) + list(v)
        out["merge_align"] = mine["merge_align"] or other["merge_align"]
        return out

    def removed_experts(self, spec, layer: int) -> list[int]:
        return [e for g in spec["merge"].get(layer, []) for e in g[1:]]

    def named_experts(self, spec) -> dict[int, list[int]]:
        return {i: [e for g in v for e in g] for i, v in spec["merge"].items()}

    def sources(self, spec, layer: int, stats) -> dict:
        groups = spec["merge"].get(layer, [])
        return {g[0]: (g, w) for g, w in zip(groups, group_weights(spec, layer, stats))}

    def touches(self, spec, lay) -> bool:
        return bool(spec["merge"].get(lay.index))

    def edit(self, spec, ctx: EditContext) -> None:
        from ..neurons import merge_group

        for first, (g, wts) in self.sources(spec, ctx.lay.index, ctx.stats).items():
            tensors, perms = merge_group(ctx.lay, g, wts, spec["merge_align"])
            ctx.per[first] = tensors
            ctx.members[first] = (g, perms)

    def out_of_core(self, spec, plan, view, stats, config, model) -> str | None:
        if spec["merge_align"]:
            return ("merge_align (neuron alignment) is done in memory only: use the in-memory apply (without "
                    "--out-of-core)")
        return None

    def speed_limit(self, spec) -> str | None:
        return FEWER_EXPERTS_SPEED


def group_weights(spec, layer: int, stats) -> list[list[float]]:
    """Frequency weights for each merge group: stored in the plan, else from statistics. Never a silent plain
    average: the same plan previewed with statistics and applied without them gave logits 0.6 apart."""
    groups = spec["merge"].get(layer, [])
    if not groups:
        return []
    if layer in spec["merge_weights"]:
        return spec["merge_weights"][layer]
    if stats is not None:
        c = stats.layers[layer]["count"]
        return [[float(c[e]) + 1e-6 for e in g] for g in groups]
    raise PlanError(f"MoE layer {layer}: the merge groups {groups} have no merge_weights and no statistics were "
                    "given to weigh them by use; give the statistics (--stats) or write merge_weights into the plan "
                    f"(e.g. {[[1.0] * len(g) for g in groups]} for a plain average)")


def with_weights(spec, stats) -> dict:
    """``spec`` with every group's weights written in (from ``stats`` where absent): a self-contained plan, the
    same model whether it is replayed with the statistics or without."""
    if stats is None or all(i in spec["merge_weights"] for i in spec["merge"]):
        return spec
    return {**spec, "merge_weights": {i: group_weights(spec, i, stats) for i in spec["merge"]}}


register(Merge())
