"""How slim is chosen: its planner, the app's preset and the command-line option."""
from __future__ import annotations

from ..plan import Plan
from .base import Planning, register_planning, stats_meta


def slim_experts(stats, keep: float, layers: list[int] | None = None) -> Plan:
    """Keep ``keep`` of every expert's intermediate neurons (by activation energy, as SlimMoE)."""
    return Plan(slim=keep, slim_layers=layers, model=stats_meta(stats), notes=f"slim experts to {keep:.0%} of neurons",
                recipe=[{"planner": "slim_experts", "keep": keep, "layers": layers}])


class SlimPlanning(Planning):
    op = "slim"

    preset = "slim"
    amount_label = "share of every expert's neurons to keep"

    def amount_range(self, view):
        return (0.05, 0.95, 0.05, 0.5)
    def preset_args(self, amount, opts: dict, session) -> dict:
        return dict(keep=float(amount))
    cli_flag = "slim"
    def add_cli(self, parser, choice) -> None:
        choice.add_argument("--slim", type=float, metavar="FRACTION", help="fraction of neurons kept")
    def from_cli(self, args, skip, view):
        return None if args.slim is None else ("slim_experts", dict(keep=args.slim))


SlimPlanning.planners = {"slim_experts": slim_experts}
register_planning(SlimPlanning())
