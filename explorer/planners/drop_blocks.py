"""How drop blocks is chosen: its planner, the app's preset and the command-line option."""
from __future__ import annotations

import numpy as np

from ..errors import PlanError
from ..plan import Plan
from .base import LayerListPlanning, register_planning, stats_meta


def drop_blocks(stats, n: int, consecutive: bool = False) -> Plan:
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
    return Plan(drop_blocks=chosen, model=stats_meta(stats), notes=f"drop {n} decoder blocks by 1 - cos(X_i, X_i+1)",
                recipe=[{"planner": "drop_blocks", "n": n, "consecutive": consecutive}])


class DropBlocksPlanning(LayerListPlanning):
    op = "drop_blocks"

    preset = "drop-blocks"
    amount_label = "decoder blocks to drop (by 1 - cos of input and output)"

    def count_of(self, view) -> int:
        return len(view.decoder_layers)
    cli_flag = "drop_blocks"
    def add_cli(self, parser, choice) -> None:
        choice.add_argument("--drop-blocks", type=int, metavar="L", help="drop the L least important decoder "
                            "layers")
        parser.add_argument("--consecutive", action="store_true", help="drop-blocks: the best run of L blocks in a row")
    def from_cli(self, args, skip, view):
        if args.drop_blocks is None:
            return None
        return "drop_blocks", dict(n=args.drop_blocks, consecutive=args.consecutive)


DropBlocksPlanning.planners = {"drop_blocks": drop_blocks}
register_planning(DropBlocksPlanning())
