"""Where the view's tensors are: accelerate's big-model hooks (weights spread over GPUs, CPU and disk) and the
device a module computes on."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


# ---- accelerate's big-model hooks ---------------------------------------------------------------------------
# With ``device_map`` (weights spread over GPUs, CPU and disk), accelerate moves a module's weights in just before
# its own forward and back out after. The view reads expert and router tensors directly, so it opens the same
# hooks around its own computation: offloaded weights are then real tensors, and gone again afterwards.
@contextmanager
def materialized(*modules: nn.Module | None):
    """Inside the block, the weights of ``modules`` are on their execution device even when offloaded."""
    hooked = [m for m in modules if m is not None and getattr(m, "_hf_hook", None) is not None]
    for m in hooked:
        m._hf_hook.pre_forward(m)
    try:
        yield
    finally:
        for m in hooked:
            m._hf_hook.post_forward(m, None)


@contextmanager
def forward_hooks(*specs):
    """Hooks that exist only inside the block. Each spec is (module, "pre" | "post", fn) or (..., with_kwargs);
    whatever happens inside, every hook is removed on exit."""
    handles = []
    try:
        for mod, when, fn, *kw in specs:
            register = mod.register_forward_pre_hook if when == "pre" else mod.register_forward_hook
            handles.append(register(fn, with_kwargs=bool(kw and kw[0])))
        yield
    finally:
        for h in handles:
            h.remove()


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device when it is dispatched, else its weights' device."""
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
        for p in m.parameters(recurse=False):
            if p.device.type != "meta":
                return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """The device token ids go to: the input embedding's."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(emb) if emb is not None else module_device(model)
