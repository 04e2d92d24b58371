"""How prune is chosen: its planner, the app's preset and the command-line option."""
from __future__ import annotations

from ..ops.prune import PRUNE_METHODS
from ..plan import Plan
from .base import Planning, register_planning, stats_meta


def prune_weights(stats, sparsity: float, method: str = "moe-pruner", nm=None) -> Plan:
    return Plan(prune={"sparsity": sparsity, "method": method, "nm": nm}, model=stats_meta(stats),
                notes=f"{method} unstructured pruning at {sparsity:.0%}" + (f" ({nm[0]}:{nm[1]})" if nm else ""),
                recipe=[{"planner": "prune_weights", "sparsity": sparsity, "method": method, "nm": nm}])


class PrunePlanning(Planning):
    op = "prune"

    preset = "prune"
    methods = PRUNE_METHODS
    amount_label = "share of expert weights to zero (sparsity)"
    uses = ("method",)

    def amount_range(self, view):
        return (0.05, 0.95, 0.05, 0.5)
    def preset_args(self, amount, opts: dict, session) -> dict:
        m = opts["method"]
        return dict(sparsity=float(amount), method=m if m in PRUNE_METHODS else PRUNE_METHODS[0])
    cli_flag = "prune"
    def add_cli(self, parser, choice) -> None:
        choice.add_argument("--prune", type=float, metavar="SPARSITY", help="zero this share of expert weights by "
                            "--method: moe-pruner, wanda, or sparsegpt (chosen from each expert's input Hessian, the "
                            "rest updated to compensate)")
        parser.add_argument("--nm", default=None, help="prune N:M: keep N of every M weights in a row, e.g. 2:4")
    def from_cli(self, args, skip, view):
        if args.prune is None:
            return None
        nm = [int(x) for x in args.nm.split(":")] if args.nm else None
        return "prune_weights", dict(sparsity=args.prune, nm=nm,
                                     method=args.method if args.method in PRUNE_METHODS else PRUNE_METHODS[0])


PrunePlanning.planners = {"prune_weights": prune_weights}
register_planning(PrunePlanning())
