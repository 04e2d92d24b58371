"""Layer Drop (Unified-MoE-Compression): remove MoE sub-layers whose output changes the residual stream least; the
attention and the norm before the MoE stay.

Plan field: ``drop_layers: [moe_layer, ...]``.
"""
from __future__ import annotations

from .base import LayerListOperation, register


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


register(DropLayers())
