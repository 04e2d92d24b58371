"""Neuron bookkeeping across expert layouts: which rows of gate_up are a neuron's, a merged expert's energies,
neuron selection and weight matching (MC-SMoE's alignment). Shared by the operations, ``layer_edit`` and the
out-of-core editor; below all of them.
"""
from __future__ import annotations

import torch

from .moe import MoELayer


# ---- neuron bookkeeping across layouts --------------------------------------------------------------------
def _concatenated(lay: MoELayer) -> bool:
    return bool(getattr(lay.experts, "is_concatenated", True))


def up_positions(lay: MoELayer, idx: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Positions in gate_up's 2I axis that belong to intermediate neurons ``idx`` (of a tensor for ``width``
    neurons: the layer's own by default)."""
    I = lay.intermediate_size if width is None else width
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
