"""Block Drop (Unified-MoE-Compression): remove whole decoder layers (attention and MLP), the least important by
1 − cos(X_i, X_{i+1}) or the best run in a row; the layers after them are renumbered (KV-cache indices too).

Plan field: ``drop_blocks: [decoder_layer, ...]`` (decoder-layer numbers, not MoE-layer numbers).
"""
from __future__ import annotations

import numpy as np

from ..plan import Plan, PlanError, _ids
from . import Operation, register, stats_meta


class DropBlocks(Operation):
    name = "drop_blocks"
    defaults = {"drop_blocks": []}
    always_written = True
    summary = "remove whole decoder layers, renumbering the rest (Block Drop)"

    def read(self, fields: dict):
        v = fields.get(self.name)
        if v is not None and not isinstance(v, list):
            raise PlanError(f"drop_blocks must be a list of layer numbers, e.g. [1, 3]; got {type(v).__name__}")
        return _ids(v, "drop_blocks") or None if v else None

    def write(self, spec) -> dict:
        return {self.name: list(spec or [])}

    def validate(self, spec, plan, view) -> None:
        n_dec = len(view.decoder_layers)
        for i in spec:
            if not 0 <= i < n_dec:
                raise PlanError(f"drop_blocks: decoder layer {i} does not exist (the model has {n_dec})")
        if len(set(spec)) != len(spec):
            raise PlanError("drop_blocks names a layer twice")
        if len(set(spec)) >= n_dec:
            raise PlanError("drop_blocks removes every decoder layer")

    def describe(self, spec) -> str:
        return "drop blocks " + ",".join(map(str, spec))

    def combine(self, mine, other):
        return sorted(set(mine) | set(other))

    def dropped_blocks(self, spec) -> list[int]:
        return list(spec)

    def apply_model(self, spec, model, view, plan) -> None:
        from ..apply import _check_layer_kinds, _drop_blocks

        _drop_blocks(model, view, plan)
        _check_layer_kinds(model, view, plan)

    def out_of_core(self, spec, plan, view, stats, config, model) -> str | None:
        return None

    preset = "drop-blocks"

    def preset_args(self, amount, opts: dict, session) -> dict:
        return dict(n=int(amount))

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
