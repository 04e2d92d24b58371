"""Weight-only quantisation of routed experts: round-to-nearest, group-wise, int2/3/4/8 or FP8 (e4m3), one bit
width for all experts or one per expert; and a planner that spends a byte budget where it matters (MC-MoE).

Plan field (combinable with every other operation; it runs last, on the experts that remain)::

    quantise: {bits: 4, group_size: 128, per_expert: {moe_layer: {expert: bits}}, layers: [moe_layer, ...],
               method: rtn | gptq, damp: 0.01}

``bits`` is 2, 3, 4, 8, "fp8" or 16 (left as it is); ``per_expert`` overrides it expert by expert (ids are the
original ones); ``layers`` limits it to some MoE layers. Group-wise along each weight's input dimension: per row
and group of ``group_size`` inputs, ``scale = max|w| / ((2^b - 1) / 2)`` and ``w_q = clamp(round(w / scale),
-2^(b-1), 2^(b-1) - 1)`` (symmetric, the rule of compressed-tensors, whose packed format an export will use); FP8
stores ``w / scale`` in float8_e4m3fn with ``scale = max|w| / 448``. Preview and apply use the
dequantised ``w_q · scale`` of exactly the same function, so they agree to float rounding. Bytes count the codes
and one 16-bit scale per group.

``method: gptq`` rounds the integer widths by GPTQ instead (``explorer.compensate``): each expert's columns in
order, each rounding error spread over the columns not yet rounded through the inverse of the Hessian of the
inputs routed to that expert (``explorer.hessians``; ``damp`` × its mean diagonal added). The grid, groups and
scales rule are the same, so the export is the same format. Experts routed fewer than ``MIN_TOKENS`` calibration
tokens, FP8 experts, and the attention / shared projections are rounded to nearest.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import PlanError
from .. import packing
from .base import Operation, int_keys, read_id, register

BITS = (2, 3, 4, 8, "fp8", 16)
QUANTISE_METHODS = ("rtn", "gptq")
GROUP_SIZES = (16, 32, 64, 128, 256)
FP8_MAX = 448.0
SCALE_BYTES = 2


def quantise_error(msg: str):
    return PlanError(f"quantise: {msg}")


def parse_bits(v, where: str = "bits"):
    if isinstance(v, str) and v.strip().lower() in ("fp8", "e4m3", "float8"):
        return "fp8"
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, bool) or v not in BITS:
        raise quantise_error(f"{where} must be one of 2, 3, 4, 8, 'fp8' or 16 (unchanged), got {v!r}")
    return v


def bits_per_weight(bits, group_size: int, scale_bytes: int = SCALE_BYTES) -> float:
    """Stored bits per weight, its group's scale included (scales are stored in the model's dtype: 2 bytes in bf16
    and fp16, 4 in float32)."""
    if bits == 16:
        return 16.0
    return (8 if bits == "fp8" else bits) + 8 * scale_bytes / group_size


_PER_EXPERT_ON_DISK: dict[str, bool] = {}


def saves_per_expert(lay) -> bool:
    """Whether the family's checkpoints hold one 2-D tensor per expert and projection (what the packed export
    rewrites): transformers' converters merge ``experts.*.`` keys into its fused tensors on load. GPT-OSS saves
    them fused, and its export stays dequantised."""
    root = getattr(lay, "root", None)
    if root is None:
        return True
    kind = type(root).__name__
    if kind not in _PER_EXPERT_ON_DISK:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter

            convs = get_model_conversion_mapping(root, add_legacy=False)
            _PER_EXPERT_ON_DISK[kind] = any(
                isinstance(c, WeightConverter) and any("*" in src and "expert" in src for src in c.source_patterns)
                for c in convs)
        except Exception:  # noqa: BLE001 - a transformers without converters: assume the packed layout
            _PER_EXPERT_ON_DISK[kind] = True
    return _PER_EXPERT_ON_DISK[kind]


def packable_group(view) -> int:
    """The largest group size whose groups fill every expert input (hidden and intermediate sizes), so the export
    packs; 128 where none does (the export is then dequantised, and the report counts it so)."""
    dims = {lay.hidden_size for lay in view} | {lay.intermediate_size for lay in view}
    return max((g for g in GROUP_SIZES if all(d % g == 0 for d in dims)), default=128)


def avg_bits_budget(avg: float, view, what: str = "avg_bits") -> float:
    """The routed experts' byte budget for ``avg`` bits per expert weight, scales included (refused in words
    outside 2 to 16 or not finite: a budget of 1e308 bits wrote Infinity into the plan)."""
    if not isinstance(avg, (int, float)) or isinstance(avg, bool) or not 2 <= avg <= 16:
        raise quantise_error(f"{what}: an average of 2 to 16 bits per expert weight, got {avg!r}")
    return avg / 8 * sum(lay.expert_weight_params() * lay.num_experts for lay in view)


def _itemsize(view) -> int:
    """Bytes per weight of the model as the export writes it (its own dtype)."""
    return next(p for p in view.model.parameters() if p.is_floating_point()).dtype.itemsize


def fake_quant(w: torch.Tensor, bits, group_size: int, in_dim: int = -1) -> torch.Tensor:
    """``w`` rounded to ``bits`` group-wise along ``in_dim`` and dequantised, in ``w``'s dtype and layout."""
    return quantise_tensor(w, bits, group_size, in_dim)[0]


def quantise_tensor(w: torch.Tensor, bits, group_size: int, in_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dequantised ``w`` in its dtype and layout, scales [rows, groups] with ``in_dim`` moved last, or None for 16).

    The scales are what a compact export stores: the export's codes are ``round(w_dq / scale)``, exactly the
    codes used here, so the reloaded model holds the preview's weights."""
    if bits == 16:
        return w, None
    amax = _grouped(w, group_size, in_dim)[0].abs().amax(-1, keepdim=True)
    half = FP8_MAX if bits == "fp8" else (2 ** bits - 1) / 2  # compressed-tensors' symmetric rule
    # the scale as stored (16 bits): codes and preview both use exactly it
    scale = torch.where(amax > 0, amax / half, torch.ones_like(amax)).to(torch.bfloat16).float()[..., 0]
    return on_grid(w, bits, scale, group_size, in_dim), scale


def _grouped(w: torch.Tensor, group_size: int, in_dim: int) -> tuple[torch.Tensor, torch.Size]:
    """``w`` in float32 with ``in_dim`` last, zero-padded and cut into groups [..., groups, group_size]; and the
    unpadded shape with ``in_dim`` last."""
    x = w.float().movedim(in_dim, -1)
    shape = x.shape
    pad = (-shape[-1]) % group_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*shape[:-1], -1, group_size), shape


def on_grid(w: torch.Tensor, bits, scale: torch.Tensor, group_size: int, in_dim: int = -1) -> torch.Tensor:
    """``w`` rounded onto a fixed grid: the codes ``round(w / scale)`` of the scales apply chose (what the export
    stores), dequantised, in ``w``'s dtype and layout."""
    g, shape = _grouped(w, group_size, in_dim)
    n = shape[-1]
    sc = scale.float().to(g.device).unsqueeze(-1)
    if bits == "fp8":
        q = (g / sc).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    else:
        q = torch.clamp(torch.round(g / sc), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * sc).reshape(*shape[:-1], -1)[..., :n].movedim(-1, in_dim).to(w.dtype)


class _OnGrid(torch.nn.Module):
    """A parametrisation: the weight as trained is latent; what the model computes with is that weight on the
    plan's grid, with the gradient passed straight through (STE). The student trained is the quantised one."""

    def __init__(self, slots: dict, group_size: int, in_dim: int):
        super().__init__()
        self.slots, self.group_size, self.in_dim = slots, group_size, in_dim  # {slot or None: (bits, scale)}

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if None in self.slots:  # a plain Linear weight
            bits, scale = self.slots[None]
            q = on_grid(w, bits, scale, self.group_size, self.in_dim)
        else:
            q = w.clone()
            for slot, (bits, scale) in self.slots.items():
                q[slot] = on_grid(w[slot], bits, scale, self.group_size, self.in_dim)
        return w + (q - w).detach()


def train_on_grid(model, plan, view) -> int:
    """Make a quantise plan's applied model train on its grid (straight-through), so the student measured during
    distillation is the one its export stores. ``view``: the applied model's MoE view (which layout each layer's
    experts have). Returns how many weights are held to a grid (0 for other plans)."""
    from torch.nn.utils import parametrize

    spec = plan.ops.get("quantise") if plan is not None else None
    if spec is None:
        return 0
    gs, n = spec["group_size"], 0
    for mod in model.modules():
        note = getattr(mod, "_explorer_notes", {}).get("quantise")
        if note and isinstance(mod, torch.nn.Linear) and not parametrize.is_parametrized(mod, "weight"):
            parametrize.register_parametrization(mod, "weight", _OnGrid({None: note}, gs, -1))
            n += 1
    for lay in view or []:
        note = getattr(lay.experts, "_explorer_notes", {}).get("quantise")
        if not note:
            continue
        in_dim = 0 if lay.transposed else -1
        for name, part in (("gate_up_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            if isinstance(getattr(lay.experts, name, None), torch.Tensor) \
                    and not parametrize.is_parametrized(lay.experts, name):
                slots = {slot: (b, sc[part]) for slot, (b, *sc) in note.items() if sc[part] is not None}
                parametrize.register_parametrization(lay.experts, name, _OnGrid(slots, gs, in_dim))
                n += 1
    return n


def baked(model):
    """A copy of ``model`` whose weights held to a grid are written on it as plain parameters (what
    ``save_pretrained`` and the export read); ``model`` itself keeps training on its grid, its parameter objects
    (the optimizer's) unchanged. The grids are lifted off for the copy and put back: a deep copy of a parametrised
    module shares its class, and removing the copy's parametrisation would strip the original's too."""
    import copy

    from torch.nn.utils import parametrize

    held = [(path, mod, name) for path, mod in model.named_modules()
            for name in list(getattr(mod, "parametrizations", {}) or {})]
    grid = {(path, name): getattr(mod, name).detach().clone() for path, mod, name in held}
    lifted = []
    try:
        for path, mod, name in held:
            lifted.append((mod, name, mod.parametrizations[name][0]))
            parametrize.remove_parametrizations(mod, name, leave_parametrized=False)  # the same Parameter stays
        out = copy.deepcopy(model)
    finally:
        for mod, name, p in lifted:
            parametrize.register_parametrization(mod, name, p)
    with torch.no_grad():
        for (path, name), value in grid.items():
            getattr(out.get_submodule(path), name).copy_(value)
    return out


def in_dims(lay) -> tuple[int, int]:
    """The input dimension of one expert's gate_up and down tensors in the layer's layout."""
    return (0, 0) if lay.transposed else (-1, -1)


class Quantise(Operation):
    name = "quantise"
    summary = "weight-only round-to-nearest quantisation of routed experts (int2/3/4/8, fp8), per expert bits"

    # ---- the plan field ---------------------------------------------------------------------------------
    def parse(self, value: Any) -> dict | None:
        if value is None:
            return None
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            value = {"bits": value}
        if not isinstance(value, dict):
            raise quantise_error(f"expected a mapping such as {{bits: 4, group_size: 128}}, got {type(value).__name__}")
        unknown = set(value) - {"bits", "group_size", "per_expert", "layers", "attention", "shared", "method", "damp"}
        if unknown:
            raise quantise_error(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}; it takes bits, group_size, "
                         "per_expert, layers, attention, shared, method and damp")
        method = value.get("method", "rtn")
        if method not in QUANTISE_METHODS:
            raise quantise_error(f"method must be one of {', '.join(QUANTISE_METHODS)} (round-to-nearest or GPTQ), "
                                 f"got {method!r}")
        damp = value.get("damp", 0.01)
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp <= 1:
            raise quantise_error(f"damp (GPTQ's dampening, a share of the Hessian's mean diagonal) must lie in (0, 1], "
                                 f"got {damp!r}")
        gs = value.get("group_size", 128)
        if isinstance(gs, bool) or gs not in GROUP_SIZES:
            raise quantise_error(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {gs!r}")
        per = value.get("per_expert") or {}
        if not isinstance(per, dict) or not all(isinstance(v, dict) for v in per.values()):
            raise quantise_error("per_expert maps MoE layers to {expert: bits}, e.g. {0: {3: 2, 5: 8}}")
        layers = value.get("layers")
        if layers is not None and not isinstance(layers, list):
            raise quantise_error(f"layers must be a list of MoE layers, got {type(layers).__name__}")
        return {"bits": parse_bits(value.get("bits", 4)), "group_size": int(gs),
                "per_expert": {i: {read_id(e): parse_bits(b, f"per_expert bits of layer {i} expert {e}")
                                   for e, b in v.items()} for i, v in int_keys(per).items()},
                "layers": None if layers is None else [read_id(x, "a layer number") for x in layers],
                **{k: None if value.get(k) is None else parse_bits(value[k], k) for k in ("attention", "shared")},
                "method": method, "damp": float(damp)}

    def dump(self, spec: dict) -> dict:
        d = {"bits": spec["bits"], "group_size": spec["group_size"]}
        if spec.get("method", "rtn") != "rtn":
            d["method"], d["damp"] = spec["method"], spec.get("damp", 0.01)
        for k in ("attention", "shared"):
            if spec.get(k) is not None:
                d[k] = spec[k]
        if spec["per_expert"]:
            d["per_expert"] = {str(i): {str(e): b for e, b in sorted(v.items())}
                               for i, v in sorted(spec["per_expert"].items())}
        if spec["layers"] is not None:
            d["layers"] = list(spec["layers"])
        return d

    def validate(self, spec: dict, plan, view) -> None:
        n = len(view)
        if spec.get("shared") not in (None, 16) and not any(lay.shared for lay in view):
            raise quantise_error(f"shared: {view.model_type} has no shared experts to quantise")
        for i in list(spec["per_expert"]) + list(spec["layers"] or []):
            if not 0 <= i < n:
                raise quantise_error(f"MoE layer {i} does not exist (the model has {n} MoE layers)")
        for i, v in spec["per_expert"].items():
            gone = set(plan.removed(i))
            for e in v:
                if not 0 <= e < view[i].num_experts:
                    raise quantise_error(f"MoE layer {i}: expert {e} does not exist (experts 0..{view[i].num_experts - 1})")
                if e in gone:
                    raise quantise_error(f"MoE layer {i}: expert {e} is removed by this plan; it has no bits to choose")

    def describe(self, spec: dict) -> str:
        name = lambda b: "FP8" if b == "fp8" else f"{b}-bit"  # noqa: E731
        if spec["per_expert"]:
            bits = [b for v in spec["per_expert"].values() for b in v.values()]
            out = f"quantise experts to {len(set(bits))} bit widths (g{spec['group_size']})"
        else:
            out = f"quantise experts to {name(spec['bits'])} (g{spec['group_size']})"
        more = [f"{k} to {name(spec[k])}" for k in ("attention", "shared") if spec.get(k) not in (None, 16)]
        if spec.get("method") == "gptq":
            out = out.replace("quantise experts", "quantise experts by GPTQ")
        return out + (", " + ", ".join(more) if more else "")

    def combine(self, mine: dict, other: dict) -> dict:
        out = dict(other)
        out["per_expert"] = {**mine["per_expert"], **other["per_expert"]}
        return out

    # ---- what it does ------------------------------------------------------------------------------------
    def bits_of(self, spec: dict, layer: int, expert: int):
        if spec["layers"] is not None and layer not in spec["layers"]:
            return 16
        return spec["per_expert"].get(layer, {}).get(expert, spec["bits"])

    def touches(self, spec: dict, lay) -> bool:
        return spec is not None and any(self.bits_of(spec, lay.index, e) != 16 for e in range(lay.num_experts))

    def speed_limit(self, spec: dict) -> str | None:
        return ("quantised weights are stored packed but computed dequantised here: transformers has no packed "
                "kernel on this path, so speed and memory in use are the original's; vLLM's compressed-tensors "
                "kernels are where they pay")

    def needs_hessians(self, spec: dict) -> bool:
        return spec is not None and spec.get("method") == "gptq"

    def edit(self, spec: dict, ctx) -> dict:
        """Rounds the kept experts in ``ctx.per``; returns {expert: (bits, gate_up scales, down scales)}, which
        apply keeps on the new model so that an export can store the codes (``write_compact``)."""
        lay, per = ctx.lay, ctx.per
        d_gu, d_dn = in_dims(lay)
        scales = {}
        for e in ctx.kept:
            b = self.bits_of(spec, lay.index, e)
            if b == 16:
                continue
            gu, dn, gb, db = per[e]
            if spec.get("method") == "gptq" and b != "fp8":
                gu, s_gu, dn, s_dn = _gptq_expert(spec, ctx, e, b, gu, dn)
            else:
                gu, s_gu = quantise_tensor(gu, b, spec["group_size"], d_gu)
                dn, s_dn = quantise_tensor(dn, b, spec["group_size"], d_dn)
            per[e] = (gu, dn, gb, db)
            scales[e] = (b, s_gu, s_dn)
        return scales

    def param_edits(self, spec: dict, plan, view) -> dict:
        """Attention and shared-expert weights, rounded group-wise along their inputs: {parameter: (value, (bits,
        scales))}; preview swaps them in for its duration, apply writes them, the export packs them."""
        out = {}
        for qn, (bits, mod) in linear_targets(spec, plan, view).items():
            w = mod.weight
            if w.device.type == "meta":
                raise quantise_error(f"{qn} is offloaded (device map): quantising attention or shared experts needs their "
                             "weights in memory")
            with torch.no_grad():
                dq, scale = quantise_tensor(w.detach(), bits, spec["group_size"], -1)
            out[qn + ".weight"] = (dq, (bits, scale))
        return out

    def bytes_saved(self, spec: dict, plan, view) -> float:
        """Bytes the packed attention / shared projections save on disk; none where the export writes them
        dequantised (they are packed only beside packed routed experts)."""
        if compact_refusal(spec) is not None:
            return 0.0
        size = _itemsize(view)
        return sum(m.weight.numel() * (size - bits_per_weight(b, spec["group_size"], size) / 8)
                   for b, m in linear_targets(spec, plan, view).values())

    def expert_bytes(self, spec: dict, lay, kept: list[int], params_per_expert: int) -> float | None:
        """The kept experts' bytes as the export stores them: packed codes plus scales in the model's dtype, or
        None (their full size) where the export is written dequantised (FP8, several widths)."""
        width = round(params_per_expert * lay.intermediate_size / lay.expert_weight_params())  # after slimming
        gs = spec["group_size"]
        if compact_refusal(spec) is not None or lay.hidden_size % gs or width % gs or not saves_per_expert(lay):
            return None  # written dequantised: no packed format for these inputs (see _odd_inputs_note)
        size = lay.gate_up.dtype.itemsize
        return sum(params_per_expert * bits_per_weight(self.bits_of(spec, lay.index, e), gs, size) / 8
                   for e in kept)

    # ---- command line ----------------------------------------------------------------------------------


    def write_export(self, spec: dict, model, folder) -> str | None:
        return write_compact(spec, model, folder)

    def stored_format(self, spec: dict) -> str | None:
        return "compressed-tensors"

    def recipes(self, spec: dict, plan, view) -> dict[str, str]:
        return {"llmcompressor": recipe(spec, plan, view)}

    def out_of_core(self, spec: dict, plan, view, stats, config, model) -> str | None:
        if spec.get("method") == "gptq":
            return ("quantise with gptq runs each expert's calibration tokens through the model: use the in-memory "
                    "apply (without --out-of-core), or method rtn out of core")
        qc = getattr(config, "quantization_config", None)
        if qc:
            method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
            return (f"quantise: the checkpoint is already quantised ({method}); quantise the bf16 original, or "
                    "dequantise it first")
        return None

    def write_checkpoint(self, spec: dict, plan, view, folder, block_map: dict, renumbered) -> str | None:
        return write_checkpoint(spec, plan, view, folder, block_map, renumbered)


QUANTISE = Quantise()


def _gptq_expert(spec: dict, ctx, e: int, bits: int, gu: torch.Tensor, dn: torch.Tensor):
    """(gate_up, its scales, down, its scales) of expert ``e`` rounded by GPTQ, in their layout; round-to-nearest
    where the expert saw fewer than ``MIN_TOKENS`` calibration tokens. A merged expert's down projection, whose
    intermediate Hessian does not follow neuron alignment, is rounded with the diagonal one (no compensation)."""
    from ..compensate import MIN_TOKENS, gptq

    lay, gs, damp = ctx.lay, spec["group_size"], spec.get("damp", 0.01)
    h_in, h_mid, tokens = ctx.hessians(e, "quantise with gptq")
    d_gu, d_dn = in_dims(lay)
    if tokens < MIN_TOKENS:
        return (*quantise_tensor(gu, bits, gs, d_gu), *quantise_tensor(dn, bits, gs, d_dn))
    if h_mid is None:
        h_mid = torch.diag(ctx.neuron_energy(e, "neuron_sq").float())
    out = []
    for w, h in ((gu, h_in), (dn, h_mid)):
        w_oi = w.T if lay.transposed else w  # [out, in]
        q, sc = gptq(w_oi, h, bits, gs, damp)
        out += [(q.T if lay.transposed else q).contiguous().to(w.dtype), sc]
    return tuple(out)


def gptq_fallbacks(spec: dict, stats, view) -> list[tuple[int, int]]:
    """(MoE layer, expert) pairs a GPTQ plan rounds to nearest: routed fewer than ``MIN_TOKENS`` calibration tokens."""
    from ..compensate import MIN_TOKENS

    if spec.get("method") != "gptq" or stats is None:
        return []
    key = "hess_tokens" if all("hess_tokens" in lay for lay in stats.layers) else "count"
    return [(lay.index, e) for lay in view for e in range(lay.num_experts)
            if QUANTISE.bits_of(spec, lay.index, e) not in (16, "fp8") and stats.layers[lay.index][key][e] < MIN_TOKENS]


def linear_targets(spec: dict, plan, view) -> dict:
    """In-memory module name -> (bits, nn.Linear) of the attention projections (``attention``) and shared-expert
    projections (``shared``) the spec quantises, in the decoder layers and MoE layers the plan keeps."""
    out = {}
    names = {id(m): n for n, m in view.model.named_modules()}
    b_att, b_sh = spec.get("attention"), spec.get("shared")
    if b_att not in (None, 16):
        dropped = set(plan.dropped_blocks())
        for li, dl in enumerate(view.decoder_layers):
            if li in dropped:
                continue
            moe = {id(m) for lay in view if lay.layer_idx == li for m in lay.block.modules()}
            for rel, m in dl.named_modules():
                if isinstance(m, torch.nn.Linear) and id(m) not in moe and re.search(r"attn|attention", rel):
                    out[names[id(m)]] = (b_att, m)
    if b_sh not in (None, 16):
        keep = set(plan.surviving_layers(view))
        for lay in view:
            if lay.index in keep:
                for sh in lay.shared:
                    for m in sh.modules():
                        if isinstance(m, torch.nn.Linear):
                            out[names[id(m)]] = (b_sh, m)
    return out


# ---- compact export (compressed-tensors pack-quantized) ----------------------------------------------------
EXPERT_KEY = re.compile(r"layers\.(\d+)\..*experts\.(\d+)\.(\w+)\.weight$")


def compact_refusal(spec: dict) -> str | None:
    """Why the export cannot be written packed (it is then written dequantised, in the model's dtype)."""
    if spec["bits"] == "fp8" or any(b == "fp8" for v in spec["per_expert"].values() for b in v.values()):
        return ("FP8 experts are written dequantised: transformers folds FP8 expert scales per channel only, and "
                "these are per group")
    widths = {spec["bits"]} | {b for v in spec["per_expert"].values() for b in v.values()}
    if len(widths - {16}) > 1 or spec["layers"] is not None or 16 in widths:
        return ("experts of several bit widths (or some left at 16 bits) are written dequantised: transformers loads "
                "every family's experts into fused tensors with one compressed-tensors scheme for all of them "
                "(get_experts_scheme), so one config group per width would reload as another model")
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return ("the experts are written dequantised: the packed format needs compressed-tensors "
                "(pip install -e \".[quant]\")")
    return None


def write_compact(spec: dict, model, folder) -> str | None:
    """Store the quantised experts in ``folder``'s shards as compressed-tensors ``pack-quantized`` (int codes packed
    in int32 plus one scale per group, the format vLLM and llm-compressor read); plain
    ``transformers.from_pretrained`` dequantises them while loading, to exactly the weights the preview used.

    Codes come from the dequantised weights and the scales the quantise edit kept (``round(w / scale)`` is exact),
    so nothing is rounded twice. Scales are stored in the model's dtype (bf16-representable values). Where a family
    saves its experts fused rather than one 2-D tensor per expert and projection, the export stays dequantised."""
    from pathlib import Path

    folder = Path(folder)
    ex = _pack_experts(spec, model, folder)
    lin = _pack_linears(spec, model, folder, alone=not (ex or "").startswith("experts stored packed"))
    return "; ".join(n for n in (ex, lin) if n) or None


ALONE_NOTE = ("attention and shared-expert weights are written dequantised: they are packed only beside packed "
              "routed experts (a quantization_config over unpacked experts stops transformers loading DeepSeek-V3 "
              "and Llama-4 checkpoints)")


def _pack_experts(spec: dict, model, folder) -> str | None:
    if not any(getattr(m, "_explorer_notes", {}).get("quantise") for m in model.modules()
               if not isinstance(m, torch.nn.Linear)):
        return None
    why = compact_refusal(spec)
    if why is not None:
        return why
    from safetensors import safe_open

    from ..moe import decoder_layers_of

    bits, gs = spec["bits"], spec["group_size"]
    args, scheme = packing.scheme(bits, gs)
    layers = decoder_layers_of(model)
    owners = {}  # decoder layer -> (experts module, {slot: (bits, s_gu, s_dn)})
    for li, dl in enumerate(layers):
        for mod in dl.modules():
            if isinstance(mod, torch.nn.Linear):
                continue  # attention and shared-expert projections: _pack_linears
            note = getattr(mod, "_explorer_notes", {}).get("quantise")
            if note:
                owners[li] = (mod, note)
    if not owners:
        return None
    wanted = {(li, slot) for li, (_, note) in owners.items() for slot in note}
    shards = sorted(folder.glob("*.safetensors"))
    new_shards, done = {}, {}
    for shard in shards:
        out, changed = {}, False
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                m = EXPERT_KEY.search(k)
                if m and t.dim() == 2 and (int(m[1]), int(m[2])) in wanted:
                    li, slot = int(m[1]), int(m[2])
                    if t.shape[-1] % gs:
                        return _odd_inputs_note(k, t.shape[-1], gs)
                    scale = _scale_rows(owners[li][0], owners[li][1][slot], slot, t)
                    if scale is not None:
                        out.update(packing.packed(k, t, scale, scheme))
                        done[(li, slot)] = done.get((li, slot), 0) + 1
                        changed = True
                        continue
                out[k] = t
        new_shards[shard] = (out, changed)
    proj = {li: _projections(mod) for li, (mod, _) in owners.items()}
    missing = [x for x in wanted if done.get(x, 0) != proj[x[0]]]
    if missing:
        return ("the experts are written dequantised: this family saves them in a layout the packed format does "
                f"not cover (decoder layer {missing[0][0]}, expert {missing[0][1]})")
    for shard, (out, changed) in new_shards.items():
        if changed:
            packing.rewrite_shard(folder, shard, out)
    packing.declare(folder, packing.experts_group(args))
    return packing.packed_note(bits, gs)


def _pack_linears(spec: dict, model, folder, alone: bool = False) -> str | None:
    """The in-memory export's quantised attention and shared-expert projections (their scales kept by apply)."""
    from ..shards import disk_name

    lin = {n: m._explorer_notes["quantise"] for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and "quantise" in getattr(m, "_explorer_notes", {})}
    if not lin:
        return None
    if alone:
        return ALONE_NOTE
    to_disk = disk_name(model)
    return _write_linears(spec, folder, {to_disk(n + ".weight"): (n, b, scale) for n, (b, scale) in lin.items()})


def _write_linears(spec: dict, folder, targets: dict, raw: bool = False, alone: bool = False) -> str:
    """Attention and shared-expert projections (``nn.Linear``, one 2-D weight each) stored packed, one config group
    per bit width naming its modules; dequantised, with the reason, where packing cannot say it. ``targets``: disk
    key -> (module name in the loaded model, bits, scales or None); ``raw``: the shards hold the unrounded weights
    (out of core), which are then rounded here, as the preview rounds them."""
    from safetensors import safe_open
    gs = spec["group_size"]
    shards = sorted(folder.glob("*.safetensors"))
    where = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                if k in targets:
                    where[k] = (shard, f.get_slice(k).get_shape())
    missing = sorted(set(targets) - set(where))
    if missing and raw:
        raise PlanError(f"out-of-core apply: the checkpoint does not name {missing[0]} as the model does, so its "
                        "attention or shared-expert weights cannot be quantised shard by shard; use the in-memory "
                        "apply")
    why = _linears_refusal(alone, missing, targets, where, gs)
    if why is not None and not raw:
        return why  # the model's weights are the preview's already
    schemes = {} if why is not None else {b: packing.scheme(b, gs) for _, b, _ in targets.values()}

    def rounded(key: str):
        if key not in targets:
            return None
        _, b, scale = targets[key]

        def fn(t):
            dq, sc = (t, scale) if scale is not None else quantise_tensor(t, b, gs, -1)
            return {key: dq} if why is not None else packing.packed(key, dq, sc, schemes[b][1])
        return fn
    if why is None or raw:
        packing.rewrite_shards(folder, rounded)
    if why is not None:
        return why
    packing.declare(folder, {f"group_linear_{b}": {"targets": sorted(n for n, bb, _ in targets.values() if bb == b),
                                            "weights": schemes[b][0].model_dump()} for b in schemes})
    widths = ", ".join(f"{b}-bit" for b in sorted(schemes))
    return f"attention and shared-expert projections stored packed ({widths}, one scale per {gs} inputs)"


def _linears_refusal(alone: bool, missing: list, targets: dict, where: dict, gs: int) -> str | None:
    """Why the projections cannot be written packed (None: they can)."""
    if alone:
        return ALONE_NOTE
    if missing:
        return f"attention and shared-expert weights are written dequantised: the checkpoint names {missing[0]} otherwise"
    if any(b == "fp8" for _, b, _ in targets.values()):
        return "attention and shared-expert weights are written dequantised: FP8 groups are not packed"
    odd = next((k for k, (_, shape) in where.items() if shape[-1] % gs), None)
    if odd is not None:
        return (f"attention and shared-expert weights are written dequantised: {odd} takes {where[odd][1][-1]} inputs, "
                f"not a multiple of the group size {gs}")
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return "attention and shared-expert weights are written dequantised (no compressed-tensors)"
    return None


def _odd_inputs_note(key: str, n: int, gs: int) -> str:
    return (f"the experts are written dequantised: the packed format needs each expert's input size to be a multiple "
            f"of the group size, and {key.split('.')[-2]} takes {n} inputs against groups of {gs}; a group size of "
            f"{max(g for g in GROUP_SIZES if n % g == 0)} would pack")


def write_checkpoint(spec: dict, plan, view, folder, block_map: dict, renumbered) -> str:
    """The out-of-core quantisation: shard by shard (one in memory at a time), each kept expert's 2-D weights as the
    checkpoint editor wrote them are rounded exactly as the preview rounds them, and stored packed (or, where the
    packed format cannot say it, dequantised, as the in-memory export does). Refuses in words, before rewriting
    anything, a checkpoint that stores experts fused rather than one tensor per expert and projection."""
    from pathlib import Path

    from safetensors import safe_open
    folder = Path(folder)
    new_to_old = {new: old for old, new in block_map.items() if new is not None}
    by_dec = {lay.layer_idx: lay for lay in view}
    kept = {lay.layer_idx: plan.kept(lay.index, lay.num_experts) for lay in view}

    def bits_for(li: int, slot: int):
        lay = by_dec.get(new_to_old.get(li))
        if lay is None or slot >= len(kept[lay.layer_idx]) or lay.index not in survivors:
            return None  # a dense layer, a multi-token-prediction layer kept uncut, or a dropped MoE sub-layer
        b = QUANTISE.bits_of(spec, lay.index, kept[lay.layer_idx][slot])
        return None if b == 16 else b

    survivors = set(plan.surviving_layers(view))
    shards = sorted(folder.glob("*.safetensors"))
    shapes = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                m = EXPERT_KEY.search(k)
                if m:
                    shapes[k] = (int(m[1]), int(m[2]), f.get_slice(k).get_shape())
    found = {(li, slot) for li, slot, shape in shapes.values() if len(shape) == 2}
    wanted = {(block_map[lay.layer_idx], s) for lay in view if lay.index in survivors
              for s in range(len(kept[lay.layer_idx])) if bits_for(block_map[lay.layer_idx], s) is not None}
    missing = sorted(wanted - found)
    if missing:
        raise PlanError(f"out-of-core apply: this checkpoint does not store expert {missing[0][1]} of decoder layer "
                        f"{missing[0][0]} as one 2-D tensor per projection (the family saves its experts fused), so "
                        "the shard-by-shard quantiser cannot find it: quantise with the in-memory apply")
    gs = spec["group_size"]
    why = compact_refusal(spec)
    if why is None:
        odd = next((k for k, (li, slot, shape) in shapes.items()
                    if bits_for(li, slot) is not None and shape[-1] % gs), None)
        if odd is not None:
            why = _odd_inputs_note(odd, shapes[odd][2][-1], gs)
    args, scheme = packing.scheme(spec["bits"], gs) if why is None else (None, None)

    def rounded(key: str):
        li, slot, shape = shapes.get(key, (None, None, None))
        b = bits_for(li, slot) if li is not None and len(shape) == 2 else None
        if b is None:
            return None

        def fn(t):
            dq, scale = quantise_tensor(t, b, gs, -1)
            return packing.packed(key, dq, scale, scheme) if scheme is not None else {key: dq}
        return fn
    packing.rewrite_shards(folder, rounded)
    notes = []
    if wanted:
        if scheme is None:
            notes.append(why)
        else:
            packing.declare(folder, packing.experts_group(args))
            notes.append(packing.packed_note(spec["bits"], gs))
    lin = linear_targets(spec, plan, view)
    if lin:
        from ..shards import disk_name

        to_disk = disk_name(view.model)
        stack = {id(m): n for n, m in view.model.named_modules()}[id(view.decoder_layers)]
        renumber = re.compile(re.escape(stack) + r"\.(\d+)\.")

        def new_name(n: str) -> str:  # decoder layers renumbered by Block Drop
            return renumber.sub(lambda m: f"{stack}.{block_map[int(m.group(1))]}.", n, count=1)

        targets = {renumbered(to_disk(n + ".weight")): (new_name(n), b, None) for n, (b, _) in lin.items()}
        notes.append(_write_linears(spec, folder, targets, raw=True, alone=not (wanted and scheme is not None)))
    return "; ".join(notes) or None


def _projections(experts) -> int:
    """How many 2-D tensors a saved expert has: gate, up and down, or up and down."""
    return 3 if hasattr(experts, "gate_up_proj") else 2


def _scale_rows(experts, note, slot: int, saved: torch.Tensor) -> torch.Tensor | None:
    """The scales [out, groups] of one saved [out, in] expert tensor: the rows of the fused tensor it was cut from,
    found by exact equality (gate and up halves, or interleaved rows, depending on the family)."""
    _, s_gu, s_dn = note
    for name, s in (("gate_up_proj", s_gu), ("up_proj", s_gu), ("down_proj", s_dn)):
        w = getattr(experts, name, None)
        if not isinstance(w, torch.Tensor) or s is None:
            continue
        for rows_in in (w[slot], w[slot].T):  # [out, in] in either stored layout
            n = rows_in.shape[0]
            if n != s.shape[0]:
                continue
            for sel in (slice(None), slice(0, n // 2), slice(n // 2, None), slice(0, None, 2), slice(1, None, 2)):
                part = rows_in[sel]
                if part.shape == saved.shape and torch.equal(part, saved):
                    return s[sel]
    return None


register(QUANTISE)


# ---- the plan as an llm-compressor recipe --------------------------------------------------------------------
RECIPE_FILE = "llmcompressor_recipe.yaml"
# never quantised by the explorer: the head, routers (their rows decide routing) and the embedding
RECIPE_IGNORE = ["lm_head", "re:.*embed_tokens.*", r"re:.*\.(gate|router)$", r"re:.*\.(gate|router)\.(weight|linear)$",
                 r"re:.*shared_expert_gate$"]


def _recipe_args(bits, gs: int) -> dict:
    """compressed-tensors QuantizationArgs of the explorer's rule: symmetric groups of ``gs`` inputs."""
    from compressed_tensors.quantization import QuantizationArgs

    kind = {"num_bits": 8, "type": "float"} if bits == "fp8" else {"num_bits": int(bits), "type": "int"}
    args = QuantizationArgs(**kind, symmetric=True, strategy="group", group_size=gs)
    return {k: v for k, v in args.model_dump(mode="json").items()
            if k in ("num_bits", "type", "symmetric", "strategy", "group_size")}


def recipe(spec: dict, plan, view) -> str:
    """An llm-compressor recipe (YAML) that quantises what ``spec`` quantises, with the same scheme, on the cut
    model (experts numbered as the export numbers them): the user replays the quantisation with the tool they run
    at scale. Round-to-nearest is llm-compressor's ``QuantizationModifier``; one config group per bit width, the
    experts of a width named by layer and expert where widths differ; what stays in full precision is listed."""
    import yaml

    gs = spec["group_size"]
    block_map = plan.block_map(len(view.decoder_layers))
    by_bits: dict = {}
    full: list[str] = []
    keep = set(plan.surviving_layers(view))
    uniform = not spec["per_expert"] and spec["layers"] is None
    for lay in view:
        if lay.index not in keep:
            continue
        L = block_map[lay.layer_idx]
        kept = plan.kept(lay.index, lay.num_experts)
        for slot, e in enumerate(kept):
            b = QUANTISE.bits_of(spec, lay.index, e)
            if b == 16:
                full.append(f"layer {L} expert {slot}")
            elif not uniform:
                by_bits.setdefault(b, {}).setdefault(L, []).append(slot)
    groups = {}
    if uniform and spec["bits"] != 16:
        groups["routed_experts"] = {"targets": list(packing.EXPERT_TARGETS), "weights": _recipe_args(spec["bits"], gs)}
    for b, layers in sorted(by_bits.items(), key=lambda kv: str(kv[0])):
        targets = [rf"re:.*layers\.{L}\.[^.]+\.experts\.({'|'.join(map(str, slots))})\..*"
                   for L, slots in sorted(layers.items())]
        groups[f"experts_{b}bit" if b != "fp8" else "experts_fp8"] = {"targets": targets,
                                                                      "weights": _recipe_args(b, gs)}
    if spec.get("attention") not in (None, 16):
        groups["attention"] = {"targets": [r"re:.*(self_attn|attention)\.[^.]*proj$"],
                               "weights": _recipe_args(spec["attention"], gs)}
    if spec.get("shared") not in (None, 16):
        groups["shared_experts"] = {"targets": [r"re:.*shared_experts?\..*"],
                                    "weights": _recipe_args(spec["shared"], gs)}
    gptq = spec.get("method") == "gptq"
    how = ("GPTQ (GPTQModifier; llm-compressor calibrates each expert on the tokens routed to it)" if gptq
           else "round-to-nearest (QuantizationModifier)")
    head = ("# llm-compressor recipe written by the MoE Compression Explorer from plan.json:\n"
            f"# {QUANTISE.describe(spec)}, weight-only {how}, symmetric groups of {gs} inputs.\n"
            "# Replay on the cut model (expert numbers are the export's): llmcompressor.oneshot(model=..., "
            f"recipe='{RECIPE_FILE}').\n"
            "# Left in full precision: lm_head, embeddings, routers, attention and shared experts unless a group "
            "below names them" + (f"; experts {', '.join(full[:20])}{' ...' if len(full) > 20 else ''}" if full
                                  else "") + ".\n")
    modifier = {"ignore": list(RECIPE_IGNORE), "config_groups": groups}
    if gptq:
        # no activation order: the explorer walks the columns in their own order (llm-compressor defaults to static)
        modifier = {**modifier, "dampening_frac": spec.get("damp", 0.01), "block_size": 128, "actorder": None}
    body = {"quant_stage": {"quant_modifiers": {"GPTQModifier" if gptq else "QuantizationModifier": modifier}}}
    return head + yaml.safe_dump(body, sort_keys=False, width=120)
