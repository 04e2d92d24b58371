"""The view's self-check: each MoE layer's recomputation is held against the family's own block (all experts, and
routing among a kept subset against a sliced copy of the block); what it does not reproduce is refused in words.
"""
from __future__ import annotations

import copy
import torch
from torch import nn

from .devices import materialized
from .kernels import ExpertLayer, LayerEdit
from .layout import EXPERT_COUNT_NAMES, UnsupportedModelError, slice_experts_of



def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _main(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().reshape(-1), b.float().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_kept_ids(lay: ExpertLayer) -> list[int]:
    """A small set of experts the layer may keep (one step above its least allowed count, spread over the groups):
    what the self-check routes among. Small, since the check copies these experts of one layer (16 + 8 of
    DeepSeek-V3's 256, about 1 GB in bf16; 9 of OLMoE's 64)."""
    E = lay.num_experts
    least, step = lay.keep_rule()
    g, _ = lay.groups
    n = max(least, min(E - step, least + step))
    if n >= E:
        return list(range(E))
    per = n // g
    size = E // g
    return [grp * size + j for grp in range(g) for j in range(size - per, size)]  # the last ``per`` of each group


def sliced_block(lay: ExpertLayer, kept: list[int]) -> nn.Module:
    """A shallow copy of ``lay``'s block as the smaller model holds it: the kept experts' rows (copied), the
    sliced router, block-level per-expert tensors sliced. What ``apply`` writes, built for one layer."""
    b = copy.copy(lay.block)
    b._modules, b._parameters, b._buffers = dict(b._modules), dict(b._parameters), dict(b._buffers)
    ex = copy.copy(lay.experts)
    ex._parameters, ex._buffers = dict(ex._parameters), dict(ex._buffers)
    for m in (b, ex):  # accelerate's hooks and forward wrappers belong to the originals
        for name in ("forward", "_hf_hook", "_old_forward"):
            m.__dict__.pop(name, None)
    idx = torch.as_tensor(kept, dtype=torch.long)
    with materialized(lay.experts):
        for name, t in list(ex._parameters.items()):
            if t is not None and t.dim() and t.shape[0] == lay.num_experts:
                ex._parameters[name] = nn.Parameter(t.detach().index_select(0, idx.to(t.device)), requires_grad=False)
    for name in EXPERT_COUNT_NAMES:
        if getattr(ex, name, None) == lay.num_experts:
            setattr(ex, name, len(kept))
    attr_ex = next(n for n, m in lay.block.named_children() if m is lay.experts)
    attr_r = next(n for n, m in lay.block.named_children() if m is lay.router)
    b._modules[attr_ex] = ex
    router, _ = lay.sliced_router(kept)
    b._modules[attr_r] = router
    slice_experts_of(b, kept, lay.num_experts, recurse=False)
    return b


def check_layer(lay: ExpertLayer, model_type: str, tokens: int = 16, seed: int = 0, masked: bool = True) -> None:
    """Refuse (UnsupportedModelError) what the view of this layer does not reproduce."""
    where = f"{model_type}: MoE layer {lay.index} (decoder layer {lay.layer_idx}, {type(lay.block).__name__})"
    n_held = lay.gate_up.shape[0]
    if n_held != lay.num_experts:
        raise UnsupportedModelError(
            f"{where}: its router scores {lay.num_experts} experts but the block holds {n_held}; routed slots "
            "without weights (zero-computation or null experts, as LongCat-Flash's) are not supported")
    dev = lay.device
    # the hidden states' dtype is the experts' (a router kept in float32, as DeepSeek-V3's, takes them as they are)
    dtype = lay.gate_up.dtype if lay.gate_up.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(seed + lay.index)
    x = torch.randn(1, tokens, lay.hidden_size, generator=g).to(dev, dtype)
    tol = _tolerance(dtype)
    with torch.no_grad():
        try:
            ref = _main(lay.block(x))
        except Exception as err:  # noqa: BLE001 - any failure of the family's own block is the answer
            raise UnsupportedModelError(
                f"{where} cannot be run on hidden states alone ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "the explorer cannot observe or edit it") from err
        try:
            got = _main(lay.forward(x))
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"{where}: {err}") from err
        except Exception as err:  # noqa: BLE001
            raise UnsupportedModelError(
                f"{where}: the explorer's view of the block fails ({type(err).__name__}: "
                f"{str(err).splitlines()[0]}); it does not know this family's layout") from err
        if got.numel() != ref.numel():
            raise UnsupportedModelError(f"{where}: the view's output has shape {tuple(got.shape)}, the block's "
                                        f"{tuple(ref.shape)}")
        err = _rel(got, ref)
        if not err <= tol:
            raise UnsupportedModelError(
                f"{where}: the view does not reproduce the block's own output (relative difference {err:.2g}, "
                f"tolerance {tol:g}); the block computes more than router + experts + shared experts as the "
                "explorer knows them, so its statistics and previews would be wrong. Refused.")
        if not masked:
            return
        kept = check_kept_ids(lay)
        if len(kept) == lay.num_experts:
            return
        keep = torch.zeros(lay.num_experts, dtype=torch.bool)
        keep[kept] = True
        try:
            small = _main(sliced_block(lay, kept)(x))
        except Exception as err:  # noqa: BLE001
            raise UnsupportedModelError(
                f"{where}: the block with {len(kept)} of {lay.num_experts} experts kept fails "
                f"({type(err).__name__}: {str(err).splitlines()[0]}); expert removal cannot be applied") from err
        got = _main(lay.forward(x, edit=LayerEdit(keep=keep)))
        err = _rel(got, small)
        if not err <= tol:
            raise UnsupportedModelError(
                f"{where}: routing among {len(kept)} kept experts differs from the smaller model's own block "
                f"(relative difference {err:.2g}); previews of dropped or merged experts would be wrong. Refused.")
