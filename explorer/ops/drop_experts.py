"""Expert drop: remove experts with their router rows and biases (by frequency, gate mass or REAP saliency).

Plan field: ``drop_experts: {moe_layer: [expert, ...]}``.
"""
from __future__ import annotations

from ..errors import PlanError
from .base import FEWER_EXPERTS_SPEED, Operation, int_keys, read_ids, register


class DropExperts(Operation):
    name = "drop_experts"
    defaults = {"drop_experts": {}}
    always_written = True
    summary = "remove experts and their router rows (REAP, frequency, ...)"

    def read(self, fields: dict):
        v = fields.get(self.name)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise PlanError(f"drop_experts must map MoE layers to lists, e.g. {{\"0\": [1, 2]}}; got {type(v).__name__}")
        d = {k: read_ids(x, "drop_experts ids") for k, x in int_keys(v).items()}
        d = {k: x for k, x in d.items() if x}
        return d or None

    def write(self, spec) -> dict:
        return {self.name: {str(i): list(v) for i, v in sorted((spec or {}).items())}}

    def describe(self, spec) -> str:
        n = sum(len(v) for v in spec.values())
        if n <= 4:
            return "drop " + ", ".join(f"L{i}:" + "/".join(f"e{e}" for e in v) for i, v in sorted(spec.items()))
        return f"drop {n} experts"

    def combine(self, mine, other):
        out = {i: list(v) for i, v in mine.items()}
        for i, v in other.items():
            out[i] = out.get(i, []) + list(v)
        return out

    def removed_experts(self, spec, layer: int) -> list[int]:
        return list(spec.get(layer, []))

    def named_experts(self, spec) -> dict[int, list[int]]:
        return spec

    def out_of_core(self, spec, plan, view, stats, config, model) -> str | None:
        return None

    def speed_limit(self, spec) -> str | None:
        return FEWER_EXPERTS_SPEED


register(DropExperts())
