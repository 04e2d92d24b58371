"""Layer Drop (Unified-MoE-Compression): remove MoE sub-layers whose output changes the residual stream least; the
attention and the norm before the MoE stay.

Plan field: ``drop_layers: [moe_layer, ...]``.
"""
from __future__ import annotations

import numpy as np

from ..plan import Plan, PlanError
from . import LayerListOperation, register, stats_meta


class DropLayers(LayerListOperation):
    name = "drop_layers"
    unit = "MoE layer"
    summary = "remove whole MoE sub-layers, attention kept (Layer Drop)"

    def count_of(self, view) -> tuple[int, str]:
        return len(view), f"{len(view)} MoE layers"

    def describe(self, spec) -> str:
        return "drop MoE layers " + ",".join(map(str, spec))

    def dropped_layers(self, spec) -> list[int]:
        return list(spec)

    def not_stock(self, spec, view) -> str | None:
        return "MoE sub-layers are dropped"

    preset = "drop-layers"

    cli_flag = "drop_layers"

    def add_cli(self, parser, choice) -> None:
        choice.add_argument("--drop-layers", type=int, metavar="L", help="drop the L least important MoE "
                            "sub-layers (attention stays)")

    def from_cli(self, args, skip, view):
        return None if args.drop_layers is None else ("drop_layers", dict(n=args.drop_layers))


def drop_layers(stats, n: int) -> Plan:
    """Drop the ``n`` MoE sub-layers whose output changes the residual stream least (Layer Drop)."""
    imp = stats.layer_importance()
    if not 0 <= n < len(imp) + 1:
        raise PlanError(f"cannot drop {n} of {len(imp)} MoE layers")
    return Plan(drop_layers=sorted(int(i) for i in np.argsort(imp, kind="stable")[:n]), model=stats_meta(stats),
                notes=f"drop {n} MoE sub-layers by 1 - cos(h, h + MoE)", recipe=[{"planner": "drop_layers", "n": n}])


DropLayers.planners = {"drop_layers": drop_layers}
register(DropLayers())
