"""How drop experts is chosen: its planner, the app's preset and the command-line option."""
from __future__ import annotations

import numpy as np

from ..errors import PlanError
from ..ops.base import min_keep
from ..plan import Plan
from .base import Planning, register_planning, stats_meta


def drop_experts(stats, fraction: float, criterion: str = "reap", scores: list | None = None,
                 mode: str = "uniform", layer_fractions: dict[int, float] | None = None,
                 skip_layers: tuple | list = (), protect_super: bool = False, view=None,
                 seed: int = 0, **score_kw) -> Plan:
    """Drop ``fraction`` of the experts by ``criterion`` (lowest scores go).

    mode 'uniform': int(E·fraction) per layer (REAP's rule); 'global': the same total, chosen across layers by
    score normalised to each layer's mean. ``layer_fractions`` overrides per layer; ``skip_layers`` are left
    untouched; ``protect_super`` never drops REAP's super experts.
    """
    from ..saliency import expert_scores, super_experts

    if not 0 <= fraction < 1:
        raise PlanError(f"fraction must be in [0, 1), got {fraction}")
    layer_fractions = {int(k): v for k, v in (layer_fractions or {}).items()}
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
            f = layer_fractions.get(i, fraction)
            mk, step = min_keep(stats, view, i)
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
            mk, _ = min_keep(stats, view, i)
            if left[i] - 1 < mk:
                continue
            drops.setdefault(i, []).append(int(e))
            left[i] -= 1
            total -= 1
        if view is not None:  # grouped routing: round each layer down to a multiple of n_group
            for i in list(drops):
                _, step = min_keep(stats, view, i)
                extra = (stats.num_experts[i] - len(drops[i])) % step
                if extra:
                    drops[i] = drops[i][: len(drops[i]) - (step - extra)] if len(drops[i]) >= step - extra else []
        drops = {i: sorted(v) for i, v in drops.items() if v}
    else:
        raise PlanError(f"mode must be 'uniform' or 'global', got {mode!r}")
    return Plan(drop_experts=drops, model=stats_meta(stats),
                notes=f"drop {fraction:.0%} of experts by {criterion} ({mode})",
                recipe=[{"planner": "drop_experts", "fraction": fraction, "criterion": criterion, "mode": mode,
                         "layer_fractions": {str(k): v for k, v in layer_fractions.items()},
                         "skip_layers": list(skip_layers), "protect_super": protect_super, "seed": seed}])


class DropExpertsPlanning(Planning):
    op = "drop_experts"

    needs_view = ()
    preset = "drop-experts"
    amount_label = "share of experts to drop"
    uses = ("criterion", "mode", "protect_super")
    def preset_args(self, amount, opts: dict, session) -> dict:
        from ..saliency import CHEAP

        kw = dict(fraction=float(amount), criterion=opts["criterion"], mode=opts["mode"],
                  protect_super=opts["protect_super"])
        if opts["criterion"] not in CHEAP:
            kw["scores"] = session.scores(opts["criterion"])
        return kw
    cli_flag = "drop_experts"
    def add_cli(self, parser, choice) -> None:
        choice.add_argument("--drop-experts", type=float, metavar="FRACTION", help="drop this share of experts by "
                            "--criterion (REAP, frequency, ...)")
    def from_cli(self, args, skip, view):
        if args.drop_experts is None:
            return None
        return "drop_experts", dict(fraction=args.drop_experts, criterion=args.criterion, mode=args.mode,
                                    skip_layers=skip, protect_super=args.protect_super)


DropExpertsPlanning.planners = {"drop_experts": drop_experts}
register_planning(DropExpertsPlanning())
