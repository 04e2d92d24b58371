"""Layer Drop (Unified-MoE-Compression): remove MoE sub-layers whose output changes the residual stream least; the
attention and the norm before the MoE stay.

Plan field: ``drop_layers: [moe_layer, ...]``.
"""
from __future__ import annotations

import numpy as np

from ..plan import Plan, PlanError, _ids
from . import Operation, register, stats_meta


class DropLayers(Operation):
    name = "drop_layers"
    defaults = {"drop_layers": []}
    always_written = True
    summary = "remove whole MoE sub-layers, attention kept (Layer Drop)"

    def read(self, fields: dict):
        v = fields.get(self.name)
        if v is not None and not isinstance(v, list):
            raise PlanError(f"drop_layers must be a list of layer numbers, e.g. [1, 3]; got {type(v).__name__}")
        return _ids(v, "drop_layers") or None if v else None

    def write(self, spec) -> dict:
        return {self.name: list(spec or [])}

    def validate(self, spec, plan, view) -> None:
        for i in spec:
            if not 0 <= i < len(view):
                raise PlanError(f"drop_layers: MoE layer {i} does not exist (the model has {len(view)} MoE layers)")
        if len(set(spec)) != len(spec):
            raise PlanError("drop_layers names a layer twice")

    def describe(self, spec) -> str:
        return "drop MoE layers " + ",".join(map(str, spec))

    def combine(self, mine, other):
        return sorted(set(mine) | set(other))

    def dropped_layers(self, spec) -> list[int]:
        return list(spec)

    def not_stock(self, spec, view) -> str | None:
        return "MoE sub-layers are dropped"

    def out_of_core(self, spec, plan, view, stats, config, model) -> str | None:
        return None

    preset = "drop-layers"

    def preset_args(self, amount, opts: dict, session) -> dict:
        return dict(n=int(amount))

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
