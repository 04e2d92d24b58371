"""Per-expert input Hessians for error-compensating rounding and pruning (GPTQ, SparseGPT).

GPTQ and SparseGPT weigh each weight's error by the second moment of the inputs of the layer it sits in. In a MoE
layer each expert sees only the tokens routed to it, so each expert gets its own: ``H_in[e] = Σ x xᵀ`` over the
(real) tokens routed to expert ``e`` (the input of its gate/up projection; for families that gate the input, the
gated input the expert computes with), and ``H_mid[e] = Σ h hᵀ`` over the same tokens for its down projection,
where ``h`` is its intermediate activation. This is llm-compressor's MoE calibration (each expert calibrated on
the tokens routed to it), gathered in one pass through the same kernels the statistics use.

They are E·(H² + I²) numbers per MoE layer (float32), too many to collect by default: the statistics pass does
not, and a GPTQ or SparseGPT plan asks for them (``add_hessians``, ``explorer stats --hessians``).
"""
from __future__ import annotations

import torch

from .layerwise import forward_batches

KEYS = ("hess_in", "hess_mid", "hess_tokens")


class HessianObserver:
    """Accumulates ``Σ x xᵀ`` and ``Σ h hᵀ`` per expert; called by the expert kernels (``kernels.Observer``)."""

    def __init__(self, view, device=None):
        self.acc = []
        for lay in view:
            E, H, I = lay.num_experts, lay.hidden_size, lay.intermediate_size
            dev = device or lay.device
            self.acc.append({"hess_in": torch.zeros(E, H, H, device=dev), "hess_mid": torch.zeros(E, I, I, device=dev),
                             "hess_tokens": torch.zeros(E, dtype=torch.float64, device=dev)})
        self.valid: torch.Tensor | None = None  # [T] real tokens of the batch running

    def begin(self, lay, x, logits, w, idx) -> None:
        pass

    def _add(self, lay, e: int, tok, xin, h) -> None:
        v = (self.valid.to(tok.device)[tok] if self.valid is not None else torch.ones_like(tok, dtype=torch.bool))
        if not bool(v.any()):
            return
        x, m = xin[v].float(), h[v].float()
        a = self.acc[lay.index]
        a["hess_in"][e] += (x.T @ x).to(a["hess_in"].device)
        a["hess_mid"][e] += (m.T @ m).to(a["hess_mid"].device)
        a["hess_tokens"][e] += float(v.sum())

    def expert(self, lay, e, tok, g, xin, h, y) -> None:
        self._add(lay, int(e), tok, xin, h)

    def experts(self, lay, eid, tok, g, xin, h, y) -> None:
        for e in torch.unique(eid).tolist():
            sel = eid == e
            self._add(lay, e, tok[sel], xin[sel], h[sel])

    def end(self, lay) -> None:
        pass


def collect_hessians(model, view, blocks, batch_size: int = 8, progress=None) -> list[dict]:
    """One pass over ``blocks``: per MoE layer ``{"hess_in": [E,H,H], "hess_mid": [E,I,I], "hess_tokens": [E]}``
    as numpy float32 (tokens float64)."""
    from .layerwise import engine_of

    engine = engine_of(model)
    obs = HessianObserver(view, device=engine.device if engine is not None else None)
    batches = list(blocks.batches(batch_size))

    def before(bi: int) -> None:
        obs.valid = batches[bi].attention_mask().reshape(-1).bool()

    with torch.inference_mode(), view.patched(lambda lay, hs: lay.forward(hs, observer=obs)):
        for _ in forward_batches(model, batches, before, logits=False, progress=progress):
            pass
    return [{k: v.cpu().numpy() for k, v in a.items()} for a in obs.acc]


def add_hessians(stats, model, view, blocks, batch_size: int = 8, progress=None):
    """``stats`` with each MoE layer's per-expert Hessians added (in place; returned)."""
    for lay, h in zip(stats.layers, collect_hessians(model, view, blocks, batch_size, progress)):
        lay.update(h)
    return stats


def has_hessians(stats) -> bool:
    return stats is not None and all("hess_in" in lay and "hess_mid" in lay for lay in stats.layers)
