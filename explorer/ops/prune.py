"""Unstructured weight pruning inside experts: zero weights by |W_ij|·‖X_j‖ within each output row (Wanda), with
the router-gated input norms of MoE-Pruner; or by SparseGPT, which chooses the weights from each expert's input
Hessian and updates the rest to compensate (``explorer.compensate``); optionally N:M (keep N of every M weights in a
row).

Plan field: ``prune: {"sparsity": 0.5, "method": "moe-pruner" | "wanda" | "sparsegpt", "nm": [2, 4] | null}``.
"""
from __future__ import annotations

import torch

from ..errors import PlanError
from .base import EditContext, Operation, register
from .slim import NEEDS_STATS

PRUNE_METHODS = ("moe-pruner", "wanda", "sparsegpt")


def sparsity_of(p: dict) -> float:
    """The share of weights pruning zeroes: N:M keeps N of every M whatever ``sparsity`` says."""
    nm = p.get("nm")
    return 1 - int(nm[0]) / int(nm[1]) if nm else float(p["sparsity"])


def pruned_per_row(p: dict, cols: int) -> int:
    """Weights zeroed in one output row of ``cols`` inputs (what ``_prune_mask`` does)."""
    nm = p.get("nm")
    if nm:
        n, m = int(nm[0]), int(nm[1])
        return cols // m * (m - n)
    return int(round(cols * float(p["sparsity"])))


def _prune_mask(score: torch.Tensor, sparsity: float, nm) -> torch.Tensor:
    """Keep-mask comparing weights within each output row ([out, in] score)."""
    if nm is not None:
        n, m = int(nm[0]), int(nm[1])
        rows, cols = score.shape
        usable = cols - cols % m
        s = score[:, :usable].reshape(rows, -1, m)
        keep = torch.ones_like(s, dtype=torch.bool)
        low = torch.topk(s, m - n, dim=-1, largest=False).indices  # keep N of every M (2:4 keeps 2 of 4)
        keep.scatter_(-1, low, False)
        full = torch.ones_like(score, dtype=torch.bool)
        full[:, :usable] = keep.reshape(rows, usable)
        return full
    k = int(round(score.shape[1] * sparsity))
    if k == 0:
        return torch.ones_like(score, dtype=torch.bool)
    low = torch.topk(score, k, dim=1, largest=False).indices
    return torch.ones_like(score, dtype=torch.bool).scatter_(1, low, False)


def prune_expert(lay, gu, dn, in_norm: torch.Tensor, hid_norm: torch.Tensor, sparsity: float, nm):
    """Zero weights by |W_ij|·‖X_j‖ compared within each output row (Wanda; MoE-Pruner with gated norms)."""
    gu_oi = gu.T if lay.transposed else gu  # [2I, H]
    dn_oi = dn.T if lay.transposed else dn  # [H, I]
    m1 = _prune_mask(gu_oi.abs().float() * in_norm[None, :].to(gu.device), sparsity, nm)
    m2 = _prune_mask(dn_oi.abs().float() * hid_norm[None, :].to(dn.device), sparsity, nm)
    gu_oi = gu_oi * m1
    dn_oi = dn_oi * m2
    return (gu_oi.T if lay.transposed else gu_oi).contiguous(), (dn_oi.T if lay.transposed else dn_oi).contiguous()


class Prune(Operation):
    name = "prune"
    defaults = {"prune": None}
    always_written = True
    summary = "zero weights inside experts by |W|·‖X‖ per output row (MoE-Pruner, Wanda), optionally N:M"

    def read(self, fields: dict):
        return fields.get("prune")

    def write(self, spec) -> dict:
        return {"prune": spec}

    def validate(self, spec, plan, view) -> None:
        p = spec
        if not isinstance(p, dict) or "sparsity" not in p:
            raise PlanError("prune needs {'sparsity': s, 'method': 'moe-pruner' | 'wanda'}")
        if not 0 <= float(p["sparsity"]) < 1:
            raise PlanError(f"prune sparsity must be in [0, 1), got {p['sparsity']}")
        if p.get("method", "moe-pruner") not in PRUNE_METHODS:
            raise PlanError(f"prune method must be one of {PRUNE_METHODS}, got {p.get('method')!r}")
        nm = p.get("nm")
        if nm is not None and not (len(nm) == 2 and 0 < int(nm[0]) < int(nm[1])):
            raise PlanError(f"prune N:M must be [N, M] with 0 < N < M, got {nm}")

    def describe(self, spec) -> str:
        nm = spec.get("nm")
        amount = f"{int(nm[0])}:{int(nm[1])}" if nm else f"{float(spec['sparsity']):.0%}"
        return f"prune {amount} ({spec.get('method', 'moe-pruner')})"

    def zeroed(self, spec, lay, n_experts: int, width: int) -> int:
        if sparsity_of(spec) <= 0:
            return 0
        H, I = lay.hidden_size, lay.intermediate_size
        gu_rows = (lay.gate_up[0].numel() // H) * width // I  # [out, in] = [2I' or I', H]; down [H, I']
        per_row = pruned_per_row
        if spec.get("method") == "sparsegpt":  # the same count in every block of its columns
            from ..compensate import pruned_per_row as sgpt_per_row

            per_row = lambda p, cols: sgpt_per_row(cols, float(p["sparsity"]), p.get("nm"))  # noqa: E731
        return n_experts * (per_row(spec, H) * gu_rows + per_row(spec, width) * H)

    def speed_limit(self, spec) -> str | None:
        if sparsity_of(spec) <= 0:
            return None
        return ("pruned weights are zeros in dense matrices: multiplied like any other (2:4 needs sparse kernels, "
                "which transformers does not use)")

    def needs_hessians(self, spec) -> bool:
        return spec is not None and spec.get("method") == "sparsegpt" and sparsity_of(spec) > 0

    def needs_stats(self, spec, lay) -> str | None:
        return NEEDS_STATS if self.touches(spec, lay) else None

    def touches(self, spec, lay) -> bool:
        return sparsity_of(spec) > 0

    def edit(self, spec, ctx: EditContext) -> None:
        if spec.get("method") == "sparsegpt":
            return _sparsegpt_edit(spec, ctx)
        gated = spec.get("method", "moe-pruner") == "moe-pruner"
        for e in ctx.kept:
            gu, dn, gb, db = ctx.per[e]
            x = ctx.input_energy(e, "in_sq_gated" if gated else "in_sq").float().sqrt()
            h = ctx.neuron_energy(e, "neuron_sq_gated" if gated else "neuron_sq").float().sqrt()
            gu, dn = prune_expert(ctx.lay, gu, dn, x, h, float(spec["sparsity"]), spec.get("nm"))
            ctx.per[e] = (gu, dn, gb, db)

    def out_of_core(self, spec, plan, view, stats, config, model) -> str | None:
        return "prune (weight pruning) is done in memory only: use the in-memory apply (without --out-of-core)"


def _sparsegpt_edit(spec, ctx: EditContext) -> None:
    """SparseGPT on each kept expert's two projections, each with the Hessian of its own inputs; a merged expert's
    down projection, whose intermediate Hessian is not tracked through neuron alignment, with the diagonal one
    (its per-neuron energies: no compensation across neurons)."""
    from ..compensate import sparsegpt

    lay, sp, nm = ctx.lay, float(spec["sparsity"]), spec.get("nm")
    for e in ctx.kept:
        gu, dn, gb, db = ctx.per[e]
        h_in, h_mid, _ = ctx.hessians(e, "prune with sparsegpt")
        if h_mid is None:
            h_mid = torch.diag(ctx.neuron_energy(e, "neuron_sq").float())
        gu_oi = gu.T if lay.transposed else gu  # [2I, H]
        dn_oi = dn.T if lay.transposed else dn  # [H, I]
        g2 = sparsegpt(gu_oi, h_in, sp, nm).to(gu.dtype)
        d2 = sparsegpt(dn_oi, h_mid, sp, nm).to(dn.dtype)
        ctx.per[e] = ((g2.T if lay.transposed else g2).contiguous(), (d2.T if lay.transposed else d2).contiguous(),
                      gb, db)


register(Prune())
