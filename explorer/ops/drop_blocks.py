"""Block Drop (Unified-MoE-Compression): remove whole decoder layers (attention and MLP), the least important by
1 − cos(X_i, X_{i+1}) or the best run in a row; the layers after them are renumbered (KV-cache indices too).

Plan field: ``drop_blocks: [decoder_layer, ...]`` (decoder-layer numbers, not MoE-layer numbers).
"""
from __future__ import annotations

from ..errors import PlanError
from .base import LayerListOperation, register


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
        from ..surgery import layer_pattern_problem

        problem = layer_pattern_problem(view, plan)  # what apply would refuse, said before any preview
        if problem:
            raise PlanError(problem)

    def describe(self, spec) -> str:
        return "drop blocks " + ",".join(map(str, spec))

    def dropped_blocks(self, spec) -> list[int]:
        return list(spec)

    def apply_model(self, spec, model, view, plan) -> None:
        from ..surgery import check_layer_kinds, remove_blocks

        remove_blocks(model, view, plan)
        check_layer_kinds(model, view, plan)


register(DropBlocks())
