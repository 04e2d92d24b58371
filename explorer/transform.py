"""What a plan does to one MoE layer's tensors: one function used by both preview and apply.

``layer_edit`` turns (layer, plan, stats) into a ``LayerEdit``: which experts stay, and where the plan's operations
change weights (``explorer.ops``: merging, slimming, pruning, quantisation) the new tensors of the kept experts in
order (neuron helpers: ``explorer.neurons``). Preview runs the
unmodified model with these edits; apply writes the same tensors into a new model, so the two agree.
"""
from __future__ import annotations

import torch

from .kernels import LayerEdit  # noqa: F401  (what layer_edit returns; defined beside the kernels that read it)
from .devices import materialized
from .moe import MoELayer

from .ops import OPS, EditContext
from .plan import Plan, PlanError


def layer_edit(lay: MoELayer, plan: Plan, stats=None, materialise: bool = False) -> LayerEdit | None:
    """The edit of MoE layer ``lay`` under ``plan`` (None: untouched and not materialised). The operations of the
    plan edit the kept experts' tensors in registry order (``explorer.ops``)."""
    i, E = lay.index, lay.num_experts
    if i in plan.dropped_layers():
        return LayerEdit(skip=True)
    kept = plan.kept(i, E)
    ops = [(OPS[name], spec) for name, spec in plan.ops.items() if OPS[name].touches(spec, lay)]
    if stats is None:
        why = next((w for w in (op.needs_stats(spec, lay) for op, spec in ops) if w), None)
        if why:
            raise PlanError(why)
    keep = torch.zeros(E, dtype=torch.bool)
    keep[kept] = True
    slot = torch.full((E,), -1, dtype=torch.long)
    slot[kept] = torch.arange(len(kept))
    if not (ops or materialise):
        if len(kept) == E:
            return None
        return LayerEdit(keep=keep, kept=kept, slot=slot)
    with torch.no_grad(), materialized(lay.experts):  # offloaded expert weights are read through accelerate's hook
        dev = lay.gate_up.device
        ctx = EditContext(lay, stats, kept, {e: lay.expert_tensors(e) for e in kept})
        notes = {}
        for op, spec in ops:
            note = op.edit(spec, ctx)
            if note is not None:
                notes[op.name] = note
        per = ctx.per
        tensors = tuple(None if per[kept[0]][j] is None else torch.stack([per[e][j] for e in kept]).to(dev)
                        for j in range(4))
    return LayerEdit(keep=keep, kept=kept, tensors=tensors, slot=slot, notes=notes)
