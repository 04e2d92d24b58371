"""What a plan does to one MoE layer's tensors: one function used by both preview and apply.

``layer_edit`` turns (layer, plan, stats) into a ``LayerEdit``: which experts stay, and where the plan changes
weights (merges, slimming, weight pruning) the new tensors of the kept experts in order. Preview runs the
unmodified model with these edits; apply writes the same tensors into a new model, so the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .moe import MoELayer, materialized
from .plan import Plan, PlanError


@dataclass
class LayerEdit:
    keep: torch.Tensor | None = None  # bool [E]: experts that may still be routed to
    kept: list[int] | None = None  # original ids of the kept experts, in order
    tensors: tuple | None = None  # (gate_up, down, gate_up_bias, down_bias) of the kept experts, in order
    slot: torch.Tensor | None = None  # long [E]: original expert -> row of ``tensors`` (-1: removed)
    skip: bool = False  # Layer Drop
    notes: dict = field(default_factory=dict)  # operation name -> what its edit returned (e.g. quantisation scales)


# ---- neuron bookkeeping across layouts --------------------------------------------------------------------
def _concatenated(lay: MoELayer) -> bool:
    return bool(getattr(lay.experts, "is_concatenated", True))


def up_positions(lay: MoELayer, idx: torch.Tensor) -> torch.Tensor:
    """Positions in gate_up's 2I axis that belong to intermediate neurons ``idx``."""
    I = lay.intermediate_size
    if not lay.gated:
        return idx
    if _concatenated(lay):
        return torch.cat([idx, idx + I])
    return torch.stack([2 * idx, 2 * idx + 1], dim=1).reshape(-1)


def group_energy(st: dict, key: str, group: list[int], perms=None) -> torch.Tensor:
    """A merged expert's neuron energies: its members' sums, each member's neurons in the aligned order."""
    perms = perms or [slice(None)] * len(group)
    return sum(torch.as_tensor(st[key][e])[p] for e, p in zip(group, perms))


def top_neurons(energy: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The ``n_keep`` neurons of highest activation energy, in their original order (SlimMoE's slimming)."""
    return torch.topk(energy.float(), n_keep).indices.sort().values


def select_neurons(lay: MoELayer, gu, dn, gb, idx: torch.Tensor):
    """One expert's tensors restricted (or permuted) to intermediate neurons ``idx``."""
    pos = up_positions(lay, idx.to(gu.device))
    gu2 = gu.index_select(1 if lay.transposed else 0, pos)
    dn2 = dn.index_select(0 if lay.transposed else 1, idx.to(dn.device))
    gb2 = None if gb is None else gb.index_select(0, pos)
    return gu2, dn2, gb2


def neuron_features(lay: MoELayer, gu, dn) -> torch.Tensor:
    """[I, 3H]: each neuron's gate row, up row and down column (what weight matching compares)."""
    I = dn.shape[0] if lay.transposed else dn.shape[1]
    idx = torch.arange(I, device=gu.device)
    if not lay.gated:
        g_pos = u_pos = idx
    elif _concatenated(lay):
        g_pos, u_pos = idx, idx + I
    else:
        g_pos, u_pos = 2 * idx, 2 * idx + 1
    if lay.transposed:
        g, u, d = gu[:, g_pos].T, gu[:, u_pos].T, dn
    else:
        g, u, d = gu[g_pos], gu[u_pos], dn.T
    return torch.cat([g, u, d], dim=1).float()


def align_to(lay: MoELayer, ref: tuple, other: tuple) -> tuple:
    """Permute ``other``'s neurons to best match ``ref``'s (weight matching, Hungarian), as MC-SMoE."""
    from scipy.optimize import linear_sum_assignment

    fr, fo = neuron_features(lay, ref[0], ref[1]), neuron_features(lay, other[0], other[1])
    cost = -(fr @ fo.T).cpu().numpy()
    _, perm = linear_sum_assignment(cost)
    perm_t = torch.as_tensor(perm, dtype=torch.long)
    gu, dn, gb = select_neurons(lay, other[0], other[1], other[2], perm_t)
    return gu, dn, gb, other[3], perm_t


def merge_group(lay: MoELayer, group: list[int], weights: list[float], align: bool) -> tuple:
    """Weighted average of the group's experts (first member is the reference for alignment)."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    ref = lay.expert_tensors(group[0])
    acc = [None if t is None else t.detach().float() * w[0] for t in ref]
    perms = [torch.arange(lay.intermediate_size)]
    for e, a in zip(group[1:], w[1:]):
        t = lay.expert_tensors(e)
        if align:
            gu, dn, gb, db, perm = align_to(lay, ref, t)
            t = (gu, dn, gb, db)
            perms.append(perm)
        else:
            perms.append(torch.arange(lay.intermediate_size))
        for j in range(4):
            if acc[j] is not None:
                acc[j] = acc[j] + t[j].detach().float() * a
    dt = ref[0].dtype
    return tuple(None if t is None else t.to(dt) for t in acc), perms


def group_weights(plan: Plan, layer: int, stats) -> list[list[float]]:
    """Frequency weights for each merge group: stored in the plan, else from statistics, else uniform."""
    groups = plan.merge.get(layer, [])
    if layer in plan.merge_weights:
        return plan.merge_weights[layer]
    if stats is not None:
        c = stats.layers[layer]["count"]
        return [[float(c[e]) + 1e-6 for e in g] for g in groups]
    return [[1.0] * len(g) for g in groups]


# ---- importance scores inside experts ------------------------------------------------------------------------
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


def prune_expert(lay: MoELayer, gu, dn, in_norm: torch.Tensor, hid_norm: torch.Tensor, sparsity: float, nm):
    """Zero weights by |W_ij|·‖X_j‖ compared within each output row (Wanda; MoE-Pruner with gated norms)."""
    gu_oi = gu.T if lay.transposed else gu  # [2I, H]
    dn_oi = dn.T if lay.transposed else dn  # [H, I]
    m1 = _prune_mask(gu_oi.abs().float() * in_norm[None, :].to(gu.device), sparsity, nm)
    m2 = _prune_mask(dn_oi.abs().float() * hid_norm[None, :].to(dn.device), sparsity, nm)
    gu_oi = gu_oi * m1
    dn_oi = dn_oi * m2
    return (gu_oi.T if lay.transposed else gu_oi).contiguous(), (dn_oi.T if lay.transposed else dn_oi).contiguous()


def layer_edit(lay: MoELayer, plan: Plan, stats=None, materialise: bool = False) -> LayerEdit | None:
    """The edit of MoE layer ``lay`` under ``plan`` (None: untouched and not materialised)."""
    i, E = lay.index, lay.num_experts
    if i in plan.drop_layers:
        return LayerEdit(skip=True)
    kept = plan.kept(i, E)
    merges = plan.merge.get(i, [])
    slim = plan.slim is not None and (plan.slim_layers is None or i in plan.slim_layers) and plan.slim < 1
    prune = plan.prune is not None and plan.prune_sparsity() > 0
    if (slim or prune) and stats is None:
        raise PlanError("slimming and weight pruning score neurons and weights from router statistics: "
                        "collect them first (collect_stats, or `python -m explorer stats`)")
    keep = torch.zeros(E, dtype=torch.bool)
    keep[kept] = True
    slot = torch.full((E,), -1, dtype=torch.long)
    slot[kept] = torch.arange(len(kept))
    from .ops import OPS

    ops = [(OPS[name], spec) for name, spec in plan.ops.items() if OPS[name].touches(spec, lay)]
    if not (merges or slim or prune or ops or materialise):
        if len(kept) == E:
            return None
        return LayerEdit(keep=keep, kept=kept, slot=slot)
    st = stats.layers[i] if stats is not None else None
    with torch.no_grad(), materialized(lay.experts):  # offloaded expert weights are read through accelerate's hook
        dev = lay.gate_up.device
        per = {e: lay.expert_tensors(e) for e in kept}
        neuron_imp = {e: torch.as_tensor(st["neuron_sq"][e]) for e in kept} if st is not None else {}
        neuron_imp_g = {e: torch.as_tensor(st["neuron_sq_gated"][e]) for e in kept} if st is not None else {}
        in_imp = {}
        if st is not None:
            key = "in_sq_gated" if (plan.prune or {}).get("method", "moe-pruner") == "moe-pruner" else "in_sq"
            in_imp = {e: torch.as_tensor(st[key][e]) for e in kept}
        for g, wts in zip(merges, group_weights(plan, i, stats)):
            tensors, perms = merge_group(lay, g, wts, plan.merge_align)
            per[g[0]] = tensors
            if st is not None:  # the merged expert's neuron and input energies: members' sums, aligned
                neuron_imp[g[0]] = group_energy(st, "neuron_sq", g, perms)
                neuron_imp_g[g[0]] = group_energy(st, "neuron_sq_gated", g, perms)
                key = "in_sq_gated" if (plan.prune or {}).get("method", "moe-pruner") == "moe-pruner" else "in_sq"
                in_imp[g[0]] = sum(torch.as_tensor(st[key][e]) for e in g)
        if slim:
            n_keep = plan.slim_width(lay.intermediate_size)
            for e in kept:
                idx = top_neurons(neuron_imp[e], n_keep)
                gu, dn, gb = select_neurons(lay, per[e][0], per[e][1], per[e][2], idx)
                per[e] = (gu, dn, gb, per[e][3])
                neuron_imp[e], neuron_imp_g[e] = neuron_imp[e][idx], neuron_imp_g[e][idx]
        if prune:
            p = plan.prune
            hid = neuron_imp_g if p.get("method", "moe-pruner") == "moe-pruner" else neuron_imp
            for e in kept:
                gu, dn = prune_expert(lay, per[e][0], per[e][1], in_imp[e].float().sqrt(), hid[e].float().sqrt(),
                                      float(p["sparsity"]), p.get("nm"))
                per[e] = (gu, dn, per[e][2], per[e][3])
        notes = {}
        for op, spec in ops:  # registered operations run last, on the experts that remain
            note = op.edit(spec, lay, per, kept)
            if note is not None:
                notes[op.name] = note
        tensors = tuple(None if per[kept[0]][j] is None else torch.stack([per[e][j] for e in kept]).to(dev)
                        for j in range(4))
    return LayerEdit(keep=keep, kept=kept, tensors=tensors, slot=slot, notes=notes)
