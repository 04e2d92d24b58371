"""A plan's what-if on the unmodified model: routing masks, edited expert tensors and layer skips.

A drop plan costs no copy of any weight (a mask); merges, slimming and pruning compute the edited tensors of the
touched layers once (the same ``layer_edit`` that ``apply`` writes into the new model). The model's own
parameters are never modified, and everything is undone when the context exits.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .layerwise import engine_of
from .moe import MoEModel
from .perplexity import Perplexity, perplexity
from .plan import Plan, PlanError
from .transform import layer_edit


@contextmanager
def previewing(model, view: MoEModel, plan: Plan, stats=None):
    """Inside the block, ``model`` computes as if ``plan`` were applied."""
    plan.validate(view)
    if stats is not None:
        stats.check_fits(view)
    skipped = [view.decoder_layers[i] for i in plan.dropped_blocks()]
    if skipped:  # a property of the family's layer loop: checked once
        _check_identity_block(skipped[0], view)
    engine = engine_of(model)
    if engine is None:
        edits = {lay.index: layer_edit(lay, plan, stats) for lay in view}
    else:  # layer by layer: each layer's edit is made from its weights while it is read, and freed with it
        edits = {}

        def made(i: int) -> None:
            edits.update({lay.index: layer_edit(lay, plan, stats) for lay in view if lay.layer_idx == i})

        def freed(i: int) -> None:
            for lay in view:
                if lay.layer_idx == i:
                    edits.pop(lay.index, None)
        engine.on_load.append(made)
        engine.on_unload.append(freed)
    swapped = []  # (module, name, original parameter): weights outside the experts, swapped in, never written
    for dl in skipped:
        dl.forward = _identity_block
    try:
        for qn, (value, _) in plan.param_edits(view).items():
            mod_name, pname = qn.rsplit(".", 1)
            mod = model.get_submodule(mod_name)
            swapped.append((mod, pname, mod._parameters[pname]))
            mod._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)

        def fwd(lay, hs):
            e = edits.get(lay.index)
            if e is None:  # the family's own forward, or the view where the experts are kept in FP8
                return lay.forward(hs) if lay.fp8_kept else type(lay.block).forward(lay.block, hs)
            return lay.forward(hs, edit=e)

        with view.patched(fwd):
            yield model
    finally:
        for mod, pname, orig in reversed(swapped):
            mod._parameters[pname] = orig
        for dl in skipped:
            if "forward" in dl.__dict__:
                del dl.forward
        if engine is not None:
            engine.on_load.remove(made)
            engine.on_unload.remove(freed)


def _identity_block(hidden_states, *args, **kwargs):
    return hidden_states


def _check_identity_block(dl, view: MoEModel) -> None:
    """Block Drop is previewed by a decoder layer that returns its input. That is exact only where the model's
    layer loop takes the hidden states alone from each layer (``hidden_states = decoder_layer(...)``); where it
    takes more (GLM-MoE-DSA passes its indexer's choices to the next layer) the stand-in would be wrong: refused
    in words, not approximated."""
    if not view.layers_hand_on_hidden_states_only():
        raise PlanError(f"{view.model_type}: its decoder layers ({type(dl).__name__}) hand the next layer more than "
                        "the hidden states, so a dropped block cannot be previewed exactly; apply the plan and "
                        "evaluate the smaller model instead")


def preview_perplexity(model, view: MoEModel, plan: Plan, blocks, stats=None, batch_size: int = 8) -> Perplexity:
    """Perplexity of ``plan`` on ``blocks`` in one evaluation pass, without building the smaller model."""
    with previewing(model, view, plan, stats):
        return perplexity(model, blocks, batch_size=batch_size)
