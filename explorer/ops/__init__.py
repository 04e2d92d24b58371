"""Compression operations as modules: one module per operation, one registry that lists them.

An operation owns what it does, below the plan: its plan fields (read, written and checked here, so recipes keep
their keys), its description, its parameter and byte accounting, what it does to the tensors of one MoE layer (the
one edit preview and apply share), what it does to the model's structure and out of core (or its refusal in words).
How it is chosen (its planners, the app's preset, its ``explorer plan`` option) lives above the plan, in
``explorer.planners.<operation>``. ``Plan``, ``layer_edit``, ``apply_plan``, the checkpoint editor, the planners,
``Session.preset`` and the CLI loop over ``OPS`` and ``PLANNING`` instead of naming operations.

Adding an operation is an ``Operation`` subclass passed to ``register`` and a ``Planning`` passed to
``register_planning`` (one user module may hold both), plus its test; the import at the bottom of this file sets
the order in which operations edit a layer (merging before slimming before pruning before quantisation).
"""
from __future__ import annotations

from .base import (OPS, EditContext, LayerListOperation, Operation, min_keep, owner,  # noqa: F401
                   register)

# the order of these imports is the order in which operations edit a layer
from . import drop_experts, merge, slim, prune, drop_layers, drop_blocks, quantise  # noqa: E402,F401,I001
