"""How drop layers is chosen: its planner, the app's preset and the command-line option."""
from __future__ import annotations

import numpy as np

from ..errors import PlanError
from ..plan import Plan
from .base import LayerListPlanning, register_planning, stats_meta


def drop_layers(stats, n: int) -> Plan:
    """Drop the ``n`` MoE sub-layers whose output changes the residual stream least (Layer Drop)."""
    imp = stats.layer_importance()
    if not 0 <= n < len(imp) + 1:
        raise PlanError(f"cannot drop {n} of {len(imp)} MoE layers")
    return Plan(drop_layers=sorted(int(i) for i in np.argsort(imp, kind="stable")[:n]), model=stats_meta(stats),
                notes=f"drop {n} MoE sub-layers by 1 - cos(h, h + MoE)", recipe=[{"planner": "drop_layers", "n": n}])


class DropLayersPlanning(LayerListPlanning):
    op = "drop_layers"

    preset = "drop-layers"
    amount_label = "MoE sub-layers to drop (by how little each turns the residual stream)"
    cli_flag = "drop_layers"
    def add_cli(self, parser, choice) -> None:
        choice.add_argument("--drop-layers", type=int, metavar="L", help="drop the L least important MoE "
                            "sub-layers (attention stays)")
    def from_cli(self, args, skip, view):
        return None if args.drop_layers is None else ("drop_layers", dict(n=args.drop_layers))


DropLayersPlanning.planners = {"drop_layers": drop_layers}
register_planning(DropLayersPlanning())
