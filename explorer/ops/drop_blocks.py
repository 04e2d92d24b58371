"""Block Drop (Unified-MoE-Compression): remove whole decoder layers (attention and MLP), the least important by
1 − cos(X_i, X_{i+1}) or the best run in a row; the layers after them are renumbered (KV-cache indices too).

Plan field: ``drop_blocks: [decoder_layer, ...]`` (decoder-layer numbers, not MoE-layer numbers).
"""
from __future__ import annotations

import numpy as np

from ..plan import Plan, PlanError
from . import LayerListOperation, register, stats_meta


class DropBlocks(LayerListOperation):
    name = "drop_blocks"
    unit = "decoder layer"
    summary = "remove whole decoder layers, renumbering the rest (Block Drop)"

    def count_of(self, view) -> tuple[int, str]:
        return len(view.decoder_layers), str(len(view.decoder_layers))

    def validate(self, spec, plan, view) -> None:
        super().validate(spec, plan, view)
        if len(set(spec)) >= len(view.decoder_layers):
            raise PlanError("drop_blocks removes every decoder layer")
        from ..apply import layer_pattern_problem

        problem = layer_pattern_problem(view, plan)  # what apply would refuse, said before any preview
        if problem:
            raise PlanError(problem)

    def describe(self, spec) -> str:
        return "drop blocks " + ",".join(map(str, spec))

    def dropped_blocks(self, spec) -> list[int]:
        return list(spec)

    def apply_model(self, spec, model, view, plan) -> None:
        from ..apply import _check_layer_kinds, _drop_blocks

        _drop_blocks(model, view, plan)
        _check_layer_kinds(model, view, plan)

    preset = "drop-blocks"

    cli_flag = "drop_blocks"

    def add_cli(self, parser, choice) -> None:
        choice.add_argument("--drop-blocks", type=int, metavar="L", help="drop the L least important decoder "
                            "layers")
        parser.add_argument("--consecutive", action="store_true", help="drop-blocks: the best run of L blocks in a row")

    def from_cli(self, args, skip, view):
        if args.drop_blocks is None:
            return None
        return "drop_blocks", dict(n=args.drop_blocks, consecutive=args.consecutive)


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


DropBlocks.planners = {"drop_blocks": drop_blocks}
register(DropBlocks())
