"""Expert merging (MC-SMoE, HC-SMoE): each group of experts becomes one, the frequency-weighted average of its
members, optionally after aligning their neurons by permutation; the router keeps the row of the group's FIRST
member (planners put the dominant, most used, expert first).

Plan fields: ``merge: {moe_layer: [[expert, ...], ...]}``, ``merge_weights: {moe_layer: [[w, ...], ...]}`` (stored
so that a replay is exact; from statistics when absent, and refused in words without either) and
``merge_align: bool``.
"""
from __future__ import annotations

import numpy as np

from ..plan import Plan, PlanError, _ids, _intkeys, _weight
from . import EditContext, Operation, register, stats_meta

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
        groups = {k: [_ids(g, "merge group ids") for g in v] for k, v in _intkeys(fields.get("merge")).items()}
        groups = {k: v for k, v in groups.items() if v}
        if not groups:
            return None
        return {"merge": groups,
                "merge_weights": {k: [[_weight(w) for w in g] for g in v]
                                  for k, v in _intkeys(fields.get("merge_weights")).items()},
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
        from ..transform import merge_group

        for first, (g, wts) in self.sources(spec, ctx.lay.index, ctx.stats).items():
            tensors, perms = merge_group(ctx.lay, g, wts, spec["merge_align"])
            ctx.per[first] = tensors
            ctx.members[first] = (g, perms)

    def out_of_core(self, spec, plan, view, stats, config, model) -> str | None:
        if spec["merge_align"]:
            return ("merge_align (neuron alignment) is done in memory only: use the in-memory apply (without "
                    "--out-of-core)")
        return None

    # ---- planner ----------------------------------------------------------------------------------------
    preset = "merge"
    methods = MERGE_METHODS

    def preset_args(self, amount, opts: dict, session) -> dict:
        st = session.stats
        if int(amount) >= min(st.num_experts):
            raise PlanError(f"merging down to {int(amount)} experts per layer changes nothing: the layers have "
                            f"{min(st.num_experts)}; choose fewer (the amount is the experts each layer keeps)")
        if opts["method"] not in MERGE_METHODS:
            raise PlanError(f"merge with {' or '.join(MERGE_METHODS)}, not {opts['method']!r}")
        return dict(to=int(amount), method=opts["method"])

    cli_flag = "merge_to"

    def add_cli(self, parser, choice) -> None:
        choice.add_argument("--merge-to", type=int, metavar="M", help="merge each layer down to M experts by "
                            "--method (mc-smoe, hc-smoe)")
        parser.add_argument("--align", action="store_true", help="merge: align neurons by permutation first")

    def from_cli(self, args, skip, view):
        if args.merge_to is None:
            return None
        return "merge_experts", dict(to=args.merge_to, method=args.method, align=args.align, skip_layers=skip)


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


def merge_experts(stats, to: int | dict[int, int], method: str = "mc-smoe", align: bool = False,
                  skip_layers: tuple | list = ()) -> Plan:
    """Merge each layer down to ``to`` experts.

    mc-smoe: the ``to`` most used experts are dominant; every other expert joins the dominant one whose router-logit
    column is most similar ((cos+1)/2). hc-smoe: average-linkage agglomerative clustering of the experts' mean
    outputs (Euclidean) into ``to`` clusters. Groups list their most used member first (its router row stays);
    members are averaged weighted by how often they were routed.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    from ..saliency import expert_similarity, mean_outputs

    if isinstance(to, dict):
        to = {int(k): v for k, v in to.items()}
    groups, weights = {}, {}
    if isinstance(to, int) and not isinstance(to, bool) and all(to >= E for E in stats.num_experts):
        raise PlanError(f"merging to {to} experts changes nothing: the layers have {max(stats.num_experts)} experts "
                        "at most; give fewer")
    for i in range(len(stats.layers)):
        if i in skip_layers:
            continue
        E = stats.num_experts[i]
        m = to.get(i, E) if isinstance(to, dict) else to
        if m >= E:
            continue
        if m < stats.top_k:
            raise PlanError(f"MoE layer {i}: merging to {m} experts keeps fewer than top-k = {stats.top_k}")
        count = np.asarray(stats.layers[i]["count"], dtype=float)
        if method == "mc-smoe":
            dom = list(np.argsort(-count, kind="stable")[:m])
            sim = (expert_similarity(stats, i, "router-logits") + 1) / 2
            members = {int(d): [int(d)] for d in dom}
            for e in range(E):
                if e not in members:
                    members[int(dom[int(np.argmax(sim[e, dom]))])].append(e)
            clusters = list(members.values())
        elif method == "hc-smoe":
            z = linkage(mean_outputs(stats, i), method="average", metric="euclidean")
            lab = fcluster(z, t=m, criterion="maxclust")
            clusters = [[int(e) for e in np.flatnonzero(lab == c)] for c in np.unique(lab)]
        else:
            raise PlanError(f"unknown merge method {method!r}; choose 'mc-smoe' or 'hc-smoe'")
        gs = [sorted(c, key=lambda e: (-count[e], e)) for c in clusters if len(c) > 1]
        if gs:
            groups[i] = gs
            weights[i] = [[float(count[e]) + 1e-6 for e in g] for g in gs]
    return Plan(merge=groups, merge_weights=weights, merge_align=align, model=stats_meta(stats),
                notes=f"merge to {to} experts per layer by {method}" + (" with neuron alignment" if align else ""),
                recipe=[{"planner": "merge_experts", "to": to if isinstance(to, int) else {str(k): v for k, v in to.items()},
                         "method": method, "align": align, "skip_layers": list(skip_layers)}])


Merge.planners = {"merge_experts": merge_experts}
register(Merge())
