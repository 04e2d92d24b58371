"""Planners: write a Plan from statistics and scores. They only choose; ``Plan.validate`` checks."""
from __future__ import annotations

import numpy as np

from .moe import MoEModel
from .plan import Plan, PlanError
from .saliency import expert_scores, expert_similarity, mean_outputs, super_experts
from .stats import RouterStats


MERGE_METHODS = ("mc-smoe", "hc-smoe")


def _meta(stats: RouterStats) -> dict:
    return {"num_experts": list(stats.num_experts), "top_k": stats.top_k,
            "model_type": stats.info.get("model_type"), "moe_layer_indices": stats.moe_layer_indices}


def _min_keep(stats: RouterStats, view: MoEModel | None, layer: int) -> tuple[int, int]:
    """(least experts a layer may keep, granularity of the kept count)."""
    return view[layer].keep_rule() if view is not None else (stats.top_k, 1)


def drop_experts(stats: RouterStats, fraction: float, criterion: str = "reap", scores: list | None = None,
                 mode: str = "uniform", layer_fractions: dict[int, float] | None = None,
                 skip_layers: tuple | list = (), protect_super: bool = False, view: MoEModel | None = None,
                 seed: int = 0, **score_kw) -> Plan:
    """Drop ``fraction`` of the experts by ``criterion`` (lowest scores go).

    mode 'uniform': int(E·fraction) per layer (REAP's rule); 'global': the same total, chosen across layers by
    score normalised to each layer's mean. ``layer_fractions`` overrides per layer; ``skip_layers`` are left
    untouched; ``protect_super`` never drops REAP's super experts.
    """
    if not 0 <= fraction < 1:
        raise PlanError(f"fraction must be in [0, 1), got {fraction}")
    if scores is None:
        scores = expert_scores(stats, criterion, view=view, seed=seed, **score_kw)
    protected = super_experts(stats) if protect_super else set()
    n = len(stats.layers)
    drops: dict[int, list[int]] = {}
    if mode == "uniform":
        for i in range(n):
            if i in skip_layers:
                continue
            E = stats.num_experts[i]
            f = (layer_fractions or {}).get(i, fraction)
            mk, step = _min_keep(stats, view, i)
            n_drop = int(E * f)
            n_drop = min(n_drop, E - mk)
            n_drop -= (E - n_drop) % step
            order = [e for e in np.argsort(scores[i], kind="stable") if (i, int(e)) not in protected]
            if n_drop > 0:
                drops[i] = sorted(int(e) for e in order[:n_drop])
    elif mode == "global":
        cand = []
        for i in range(n):
            if i in skip_layers:
                continue
            s = np.asarray(scores[i], dtype=float)
            norm = s / max(abs(s.mean()), 1e-12)
            cand += [(norm[e], i, e) for e in range(len(s)) if (i, e) not in protected]
        total = int(sum(stats.num_experts[i] for i in range(n) if i not in skip_layers) * fraction)
        left = {i: stats.num_experts[i] for i in range(n)}
        for _, i, e in sorted(cand):
            if total <= 0:
                break
            mk, _ = _min_keep(stats, view, i)
            if left[i] - 1 < mk:
                continue
            drops.setdefault(i, []).append(int(e))
            left[i] -= 1
            total -= 1
        if view is not None:  # grouped routing: round each layer down to a multiple of n_group
            for i in list(drops):
                _, step = _min_keep(stats, view, i)
                extra = (stats.num_experts[i] - len(drops[i])) % step
                if extra:
                    drops[i] = drops[i][: len(drops[i]) - (step - extra)] if len(drops[i]) >= step - extra else []
        drops = {i: sorted(v) for i, v in drops.items() if v}
    else:
        raise PlanError(f"mode must be 'uniform' or 'global', got {mode!r}")
    return Plan(drop_experts=drops, model=_meta(stats),
                notes=f"drop {fraction:.0%} of experts by {criterion} ({mode})",
                recipe=[{"planner": "drop_experts", "fraction": fraction, "criterion": criterion, "mode": mode,
                         "layer_fractions": {str(k): v for k, v in (layer_fractions or {}).items()},
                         "skip_layers": list(skip_layers), "protect_super": protect_super, "seed": seed}])


def merge_experts(stats: RouterStats, to: int | dict[int, int], method: str = "mc-smoe", align: bool = False,
                  skip_layers: tuple | list = ()) -> Plan:
    """Merge each layer down to ``to`` experts.

    mc-smoe: the ``to`` most used experts are dominant; every other expert joins the dominant one whose router-logit
    column is most similar ((cos+1)/2). hc-smoe: average-linkage agglomerative clustering of the experts' mean
    outputs (Euclidean) into ``to`` clusters. Groups list their most used member first (its router row stays);
    members are averaged weighted by how often they were routed.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

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
    return Plan(merge=groups, merge_weights=weights, merge_align=align, model=_meta(stats),
                notes=f"merge to {to} experts per layer by {method}" + (" with neuron alignment" if align else ""),
                recipe=[{"planner": "merge_experts", "to": to if isinstance(to, int) else {str(k): v for k, v in to.items()},
                         "method": method, "align": align, "skip_layers": list(skip_layers)}])


def drop_layers(stats: RouterStats, n: int) -> Plan:
    """Drop the ``n`` MoE sub-layers whose output changes the residual stream least (Layer Drop)."""
    imp = stats.layer_importance()
    if not 0 <= n < len(imp) + 1:
        raise PlanError(f"cannot drop {n} of {len(imp)} MoE layers")
    return Plan(drop_layers=sorted(int(i) for i in np.argsort(imp, kind="stable")[:n]), model=_meta(stats),
                notes=f"drop {n} MoE sub-layers by 1 - cos(h, h + MoE)", recipe=[{"planner": "drop_layers", "n": n}])


def drop_blocks(stats: RouterStats, n: int, consecutive: bool = False) -> Plan:
    """Drop ``n`` decoder blocks: the least important by 1 − cos(X_i, X_{i+1}), or the best run of n in a row."""
    imp = stats.block_importance()
    if not 0 <= n < len(imp):
        raise PlanError(f"cannot drop {n} of {len(imp)} decoder layers (at least one must stay)")
    if consecutive and n:
        costs = [imp[s:s + n].sum() for s in range(len(imp) - n + 1)]
        s = int(np.argmin(costs))
        chosen = list(range(s, s + n))
    else:
        chosen = sorted(int(i) for i in np.argsort(imp, kind="stable")[:n])
    return Plan(drop_blocks=chosen, model=_meta(stats), notes=f"drop {n} decoder blocks by 1 - cos(X_i, X_i+1)",
                recipe=[{"planner": "drop_blocks", "n": n, "consecutive": consecutive}])


def slim_experts(stats: RouterStats, keep: float, layers: list[int] | None = None) -> Plan:
    """Keep ``keep`` of every expert's intermediate neurons (by activation energy, as SlimMoE)."""
    return Plan(slim=keep, slim_layers=layers, model=_meta(stats), notes=f"slim experts to {keep:.0%} of neurons",
                recipe=[{"planner": "slim_experts", "keep": keep, "layers": layers}])


def prune_weights(stats: RouterStats, sparsity: float, method: str = "moe-pruner", nm=None) -> Plan:
    return Plan(prune={"sparsity": sparsity, "method": method, "nm": nm}, model=_meta(stats),
                notes=f"{method} unstructured pruning at {sparsity:.0%}" + (f" ({nm[0]}:{nm[1]})" if nm else ""),
                recipe=[{"planner": "prune_weights", "sparsity": sparsity, "method": method, "nm": nm}])


PLANNERS = {f.__name__: f for f in (drop_experts, merge_experts, drop_layers, drop_blocks, slim_experts,
                                    prune_weights)}
# the app's and widgets' preset names for the planners (their "amount" is each planner's first argument)
PRESETS = {"drop-experts": "drop_experts", "merge": "merge_experts", "slim": "slim_experts",
           "drop-layers": "drop_layers", "drop-blocks": "drop_blocks", "prune": "prune_weights"}


def make(name: str, stats: RouterStats, view: MoEModel | None = None, **kw) -> Plan:
    """Run planner ``name`` with arguments as a recipe step stores them (JSON keys are strings: made ints here).
    The one entry point of ``replay``, the app's presets and ``explorer plan``."""
    from .ops import OPS

    if view is not None and stats is not None:
        stats.check_fits(view)
    if name in OPS:  # an operation module's own planner
        if view is None:
            raise PlanError(f"planner {name} needs the model's view")
        return OPS[name].planner(stats, view, **kw)
    if name not in PLANNERS:
        raise PlanError(f"unknown planner {name!r}: one of {', '.join(list(PLANNERS) + list(OPS))}")
    import inspect

    fn = drop_experts if name == "drop_experts" else PLANNERS[name]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kw) - set(params) - {"view"})
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise PlanError(f"planner {name} takes no argument {', '.join(unknown)}; it takes "
                        f"{', '.join(p for p in params if p not in ('stats', 'view'))}")
    for k, v in kw.items():  # amounts are numbers, never words
        if k in ("fraction", "sparsity", "keep", "n", "to") and not isinstance(v, (int, float, dict)) \
                or isinstance(v, bool) and k in ("fraction", "sparsity", "keep", "n", "to"):
            raise PlanError(f"planner {name}: {k} must be a number, got {v!r}")
    if name == "drop_experts":
        kw["layer_fractions"] = {int(k): v for k, v in (kw.get("layer_fractions") or {}).items()}
        return drop_experts(stats, view=view, **kw)
    if name == "merge_experts" and isinstance(kw.get("to"), dict):
        kw["to"] = {int(k): v for k, v in kw["to"].items()}
    return PLANNERS[name](stats, **kw)


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
        from .ops import OPS

        if name not in PLANNERS and name not in OPS:
            raise PlanError(f"unknown planner in recipe: {name!r}")
        p = make(name, stats, view, **kw, **(score_kw if name == "drop_experts" else {}))
        out = p if out is None else out.combine(p)
    return out
