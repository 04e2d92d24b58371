"""Expert slimming (SlimMoE): every expert keeps the intermediate neurons of highest activation energy.

Plan fields: ``slim`` (fraction of neurons kept) and ``slim_layers`` (MoE layers to slim; default all).
"""
from __future__ import annotations

from ..errors import PlanError
from .base import EditContext, Operation, read_ids, register

NEEDS_STATS = ("slimming and weight pruning score neurons and weights from router statistics: collect them first "
               "(collect_stats, or `python -m explorer stats`)")


def slim_width(keep: float, intermediate: int) -> int:
    """Neurons an expert of width ``intermediate`` keeps: a multiple of 8 (rows of 16 bytes in bf16, what
    transformers' default grouped_mm kernel needs: 30 of 48 crashed it), at least 8."""
    n = max(1, round(keep * intermediate))
    if intermediate >= 16 and n % 8:
        n = max(8, min(intermediate - intermediate % 8, int(n / 8 + 0.5) * 8))
    return n


def width_problem(view, width: int, config=None) -> str | None:
    """Why a stock config cannot say experts of ``width`` neurons: the config field that sets the experts' width
    also sizes something else (a shared expert, a dense MLP). The one rule the report and the out-of-core apply
    ask; a narrower config is built on the meta device and compared, once per view and width."""
    cache = view.__dict__.setdefault("_explorer_width_problem", {})
    if width not in cache:
        cache[width] = _width_problem(view, width, config if config is not None else view.model.config)
    return cache[width]


def _width_problem(view, width: int, config) -> str | None:
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from ..surgery import intermediate_attr

    attr = intermediate_attr(view.text_config)
    cfg = copy.deepcopy(config)
    setattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, attr, width)
    try:
        with torch.device("meta"):
            narrow = AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 - a family transformers cannot build from its config alone: the field's rule
        if view[0].shared and getattr(view.text_config, "shared_expert_intermediate_size", None) is None:
            return f"the config field {attr} also sizes the shared expert"
        return None
    names = {id(m): n for n, m in view.model.named_modules()}
    experts = tuple(names[id(lay.experts)] + "." for lay in view)
    before = {k: v.shape for k, v in view.model.state_dict().items()}
    other = [k for k, v in narrow.state_dict().items() if before.get(k) != v.shape and not k.startswith(experts)]
    return f"the config field {attr} also sizes {other[0]}" if other else None


class Slim(Operation):
    name = "slim"
    keys = ("slim", "slim_layers")
    defaults = {"slim": None, "slim_layers": None}
    always_written = True
    summary = "keep a fraction of every expert's intermediate neurons, by activation energy (SlimMoE)"

    def read(self, fields: dict):
        layers = fields.get("slim_layers")
        if layers is not None and not isinstance(layers, list):
            raise PlanError(f"slim_layers must be a list of layer numbers, e.g. [1, 3]; got {type(layers).__name__}")
        if fields.get("slim") is None:
            return None
        return {"slim": float(fields["slim"]), "slim_layers": None if layers is None else read_ids(layers, "slim_layers")}

    def write(self, spec) -> dict:
        return dict(spec) if spec is not None else super().write(None)

    def value(self, spec, key: str):
        return spec[key]

    def validate(self, spec, plan, view) -> None:
        keep = spec["slim"]
        if not 0 < keep <= 1:
            raise PlanError(f"slim keeps a fraction of neurons in (0, 1], got {keep}")
        if round(keep * view[0].intermediate_size) < 1:
            raise PlanError(f"slim={keep} keeps no neuron of {view[0].intermediate_size}")
        for i in spec["slim_layers"] or []:
            if not 0 <= i < len(view):
                raise PlanError(f"slim_layers: MoE layer {i} does not exist")

    def describe(self, spec) -> str:
        return f"slim to {spec['slim']:.0%}"

    def _applies(self, spec, lay) -> bool:
        return spec["slim"] < 1 and (spec["slim_layers"] is None or lay.index in spec["slim_layers"])

    def width(self, spec, lay) -> int | None:
        return slim_width(spec["slim"], lay.intermediate_size) if self._applies(spec, lay) else None

    def not_stock(self, spec, view) -> str | None:
        widths = {self.width(spec, lay) for lay in view} - {None}
        return next((p for p in (width_problem(view, w) for w in sorted(widths)) if p), None)

    def needs_stats(self, spec, lay) -> str | None:
        return NEEDS_STATS if self._applies(spec, lay) else None

    def touches(self, spec, lay) -> bool:
        return self._applies(spec, lay)

    def neurons(self, spec, ctx: EditContext) -> dict:
        """The neurons each kept expert keeps (indices into its own, or its merge's aligned, order)."""
        from ..neurons import top_neurons

        n_keep = slim_width(spec["slim"], ctx.lay.intermediate_size)
        return {e: top_neurons(ctx.neuron_energy(e, "neuron_sq"), n_keep) for e in ctx.kept}

    def edit(self, spec, ctx: EditContext) -> None:
        from ..neurons import select_neurons

        for e, idx in self.neurons(spec, ctx).items():
            gu, dn, gb, db = ctx.per[e]
            gu, dn, gb = select_neurons(ctx.lay, gu, dn, gb, idx)
            ctx.per[e] = (gu, dn, gb, db)
            ctx.neurons[e] = idx

    def out_of_core(self, spec, plan, view, stats, config, model) -> str | None:
        if spec["slim"] >= 1:
            return None
        if stats is None:
            raise PlanError("slimming scores neurons from router statistics: pass them (--stats)")
        left = plan.surviving_layers(view)
        if spec["slim_layers"] is not None and set(left) - set(spec["slim_layers"]):
            return ("out-of-core apply needs the same width in every MoE layer: slim all of them (no slim_layers), "
                    "or use the in-memory apply")
        problem = width_problem(view, slim_width(spec["slim"], view[0].intermediate_size), config)
        if problem:
            raise PlanError(f"{problem}, so a stock config cannot describe slimmed experts of this family: use the "
                            "in-memory apply (without --out-of-core)")
        return None


register(Slim())
