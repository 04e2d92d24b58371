"""How merge is chosen: its planner, the app's preset and the command-line option."""
from __future__ import annotations

import numpy as np

from ..errors import PlanError
from ..ops.merge import MERGE_METHODS
from ..plan import Plan
from .base import Planning, register_planning, stats_meta


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


class MergePlanning(Planning):
    op = "merge"

    preset = "merge"
    methods = MERGE_METHODS
    amount_label = "experts each layer keeps after merging"
    uses = ("method",)

    def amount_range(self, view):
        lay = min(view, key=lambda x: x.num_experts)
        least, step = lay.keep_rule()
        top = lay.num_experts - step
        return (least, max(least, top), step, max(least, (lay.num_experts // 2) // step * step))
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


MergePlanning.planners = {"merge_experts": merge_experts}
register_planning(MergePlanning())
