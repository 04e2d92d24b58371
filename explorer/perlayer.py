"""Per-layer MoE shapes that a stock config cannot say, restored from the config by a small model class.

A plan that keeps different expert counts or widths per layer, or drops MoE sub-layers (Layer Drop), gives a
model whose tensors a stock config does not describe: the config holds one ``num_experts`` and one width. The
export then records, in ``config.json`` under ``explorer_per_layer``, exactly what differs from the model the stock
config builds (the shapes of the tensors that differ, the integer settings of the modules that hold them, and the
MoE sub-layers that add nothing), writes the weights under transformers' serialised key names, and ships this file
as ``modeling_explorer.py`` with ``auto_map``: plain ``AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)`` and lm-eval's ``hf`` model (``trust_remote_code=True``) load it without the explorer.

The explorer itself never runs the copy in an export: it builds the same class from this module. So this module
imports nothing but torch and transformers (it is the file copied), and its checks are said in words: a user's
transformers reads it too.
"""
from __future__ import annotations

import torch
from torch import nn

PER_LAYER_KEY = "explorer_per_layer"  # the config field this class reads
MODELING_FILE = "modeling_explorer.py"
CLASS_NAME = "ExplorerMoEForCausalLM"


class DroppedMoE(nn.Module):
    """Stands where a dropped MoE sub-layer was (Layer Drop): contributes nothing, holds no weights."""

    def __init__(self, returns_tuple: bool = False, flat: bool = False):
        super().__init__()
        self.returns_tuple, self.flat = returns_tuple, flat

    def forward(self, hidden_states, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        if self.flat:
            out = out.reshape(-1, out.shape[-1])
        return (out, None) if self.returns_tuple else out


class PerLayerError(ValueError):
    """``explorer_per_layer`` in a config names what the model does not have, or a shape that cannot be."""


def restore_per_layer(model: nn.Module, spec: dict) -> None:
    """Give a freshly built model (its weights not yet loaded) the shapes, settings and dropped sub-layers of
    ``spec`` (the config's ``explorer_per_layer``). Tensors are replaced by empty ones of the recorded shape, on the
    same device and dtype, so loading the checkpoint fills them."""
    if not isinstance(spec, dict) or set(spec) - {"shapes", "settings", "dropped"}:
        raise PerLayerError(f"{PER_LAYER_KEY} holds shapes, settings and dropped; got {spec!r:.200}")
    modules = dict(model.named_modules())
    for name, flags in (spec.get("dropped") or {}).items():
        parent, _, child = name.rpartition(".")
        if name not in modules or parent not in modules:
            raise PerLayerError(f"{PER_LAYER_KEY}: the dropped sub-layer {name} is not a module of this model")
        flags = flags if isinstance(flags, dict) else {}
        setattr(modules[parent], child, DroppedMoE(bool(flags.get("returns_tuple")), bool(flags.get("flat"))))
    modules = dict(model.named_modules())
    for name, shape in (spec.get("shapes") or {}).items():
        owner, _, leaf = name.rpartition(".")
        mod = modules.get(owner)
        old = getattr(mod, leaf, None) if mod is not None else None
        if not isinstance(old, torch.Tensor):
            raise PerLayerError(f"{PER_LAYER_KEY}: {name} is not a weight of this model")
        if (not isinstance(shape, list) or len(shape) != old.dim()
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise PerLayerError(f"{PER_LAYER_KEY}: the shape of {name} is {shape!r}; expected {old.dim()} positive "
                                "whole numbers")
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(mod, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            setattr(mod, leaf, new)
    for name, values in (spec.get("settings") or {}).items():
        mod = modules.get(name)
        if mod is None or not isinstance(values, dict):
            raise PerLayerError(f"{PER_LAYER_KEY}: settings name {name}, which is not a module of this model")
        for attr, v in values.items():
            have = getattr(mod, attr, None)
            if not isinstance(have, int) or isinstance(have, bool) or not isinstance(v, int) or v <= 0:
                raise PerLayerError(f"{PER_LAYER_KEY}: {name}.{attr} = {v!r}; expected a positive whole number "
                                    "where the model holds one")
            setattr(mod, attr, v)


class PerLayerMoE:
    """Mixed into a family's ``...ForCausalLM``: its layers take the shapes the config's ``explorer_per_layer``
    records, before any weight is loaded."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        spec = getattr(config, PER_LAYER_KEY, None)
        if spec:
            restore_per_layer(self, spec)

    @classmethod
    def is_custom_code(cls) -> bool:
        """The weights are stored as the family's own class stores them: transformers applies that class's
        key conversions (renamed embeddings, per-expert keys) to this one too, as it would to the stock class."""
        return False
