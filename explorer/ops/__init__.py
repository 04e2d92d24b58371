"""Compression operations as modules: one module per operation, one registry that lists them.

An operation owns its plan field (read, written and checked here, so recipes keep their keys), its description,
its byte accounting, what it does to the tensors of one MoE layer (the one edit preview and apply share), what it
does out of core (or its refusal in words), and its planner and command-line options. ``Plan``, ``layer_edit``,
``Plan.report``, the checkpoint editor, ``planners``, the CLI and the app loop over ``OPS`` instead of naming it.

Adding an operation is one new module that subclasses ``Operation`` and calls ``register``, plus its test.
The six operations that came first (drop, merge, slim, prune, layer and block drop) still live in ``plan`` and
``transform``; they move here one by one.
"""
from __future__ import annotations

from typing import Any


class Operation:
    """What every operation module provides. ``spec`` is the operation's parsed plan field."""

    name: str = ""  # the plan key
    summary: str = ""  # one line, for help texts and the README

    def parse(self, value: Any) -> Any:
        """The plan field as read from JSON/YAML, checked for form (PlanError in words)."""
        raise NotImplementedError

    def dump(self, spec: Any) -> Any:
        """The plan field as JSON."""
        raise NotImplementedError

    def validate(self, spec: Any, plan, view) -> None:
        """Raise PlanError naming the first problem of ``spec`` on this model."""

    def describe(self, spec: Any) -> str:
        raise NotImplementedError

    def combine(self, mine: Any, other: Any) -> Any:
        """Both plans set this operation: the other plan's wins unless an operation knows better."""
        return other

    def touches(self, spec: Any, lay) -> bool:
        """Whether the operation changes the tensors of MoE layer ``lay`` (then they are materialised)."""
        return False

    def edit(self, spec: Any, lay, per: dict, kept: list[int]) -> Any:
        """Change the kept experts' tensors in ``per`` (expert id -> (gate_up, down, gate_up_bias, down_bias), in
        the layer's own layout) in place; runs after merging, slimming and pruning. What it returns is kept in
        ``LayerEdit.notes[name]`` (and by apply on the new experts module) for the export to read."""

    def expert_bytes(self, spec: Any, lay, kept: list[int], params_per_expert: int) -> float | None:
        """Bytes of the layer's kept routed experts after the operation (None: two bytes a weight, as bf16)."""
        return None

    def write_export(self, spec: Any, model, folder) -> str | None:
        """Rewrite the tensors ``save_pretrained`` put in ``folder`` (a staging folder, before it is committed) in
        the operation's own stored format; returns a sentence for the export's summary, or None."""
        return None

    def out_of_core(self, spec: Any) -> str | None:
        """Why the out-of-core apply cannot do this yet (None: it can)."""
        return f"{self.name} is not done out of core yet: load the model and apply it in memory"

    preset: str | None = None  # the app's and widgets' preset name; its "amount" is ``preset_args``'s first input

    def planner(self, stats, view, **kw):
        """The operation's planner, as a recipe step calls it (``planners.make``)."""
        raise NotImplementedError

    def preset_args(self, amount: float, criterion: str, method: str) -> dict:
        """The planner's arguments for the app's preset controls."""
        return {}

    def add_cli(self, parser, choice) -> None:
        """Options of ``explorer plan``: ``choice`` is the group of mutually exclusive operations."""

    def from_cli(self, args, stats, view):
        """The plan ``explorer plan`` writes when this operation's option was given, else None."""
        return None


OPS: dict[str, Operation] = {}


def register(op: Operation) -> Operation:
    if not op.name or op.name in OPS:
        raise ValueError(f"an operation needs a new name, got {op.name!r}")
    OPS[op.name] = op
    return op


from . import quantise  # noqa: E402,F401  (registers itself)
