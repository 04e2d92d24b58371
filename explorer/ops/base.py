"""What every compression operation is: the ``Operation`` base, the edit context of one MoE layer, the registry
``OPS`` they register into, and the readers of plan fields (whole numbers as the plan must spell them).

Below the operation modules: it knows no operation, no plan and no planner.
"""
from __future__ import annotations

import copy
from typing import Any

from ..errors import PlanError


# ---- plan-field readers ------------------------------------------------------------------------------------
def int_keys(d: dict | None) -> dict:
    return {read_id(k, "a layer number"): v for k, v in (d or {}).items()}


def read_id(v, what: str = "an expert id") -> int:
    """An index as the plan must spell it: a whole number (or its decimal string, as JSON keys are), never
    1.9 read as 1, ``true`` read as 1, or Infinity."""
    if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v.strip().lstrip("-").isdigit()):
        raise PlanError(f"{what} must be a whole number, got {v!r}")
    return int(v)


def read_weight(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise PlanError(f"merge weights must be finite numbers, got {v!r}")
    return float(v)


def read_ids(v, what: str) -> list[int]:
    if not isinstance(v, list):
        raise PlanError(f"{what} must be a list of whole numbers, got {type(v).__name__}")
    return [read_id(e, what[:-1] if what.endswith("s") else what) for e in v]


# ---- operations --------------------------------------------------------------------------------------------
class Operation:
    """What every operation module provides. ``spec`` is the operation's parsed plan fields (None: not in the plan);
    hooks whose operation has nothing to say keep these defaults."""

    name: str = ""  # the registry name (the plan key of one-key operations)
    keys: tuple[str, ...] = ()  # the plan keys it owns (default: (name,))
    defaults: dict[str, Any] = {}  # a plan key's value when the operation is absent (``plan.<key>``)
    always_written: bool = False  # write the keys (with defaults) even when absent, as recipes have always had them
    summary: str = ""  # one line, for help texts and the README

    def __init__(self) -> None:
        if not self.keys:
            self.keys = (self.name,)

    # ---- the plan fields ----------------------------------------------------------------------------------
    def read(self, fields: dict) -> Any:
        """The spec from this operation's plan keys as read from JSON/YAML (None: the operation is absent);
        PlanError in words when their form is wrong."""
        value = fields.get(self.name)
        return None if value is None else self.parse(value)

    def parse(self, value: Any) -> Any:
        raise NotImplementedError

    def write(self, spec: Any) -> dict:
        """The operation's plan keys as JSON (empty or defaults when absent)."""
        if spec is None:
            return {k: copy.deepcopy(self.defaults.get(k)) for k in self.keys} if self.always_written else {}
        return {self.name: self.dump(spec)}

    def dump(self, spec: Any) -> Any:
        raise NotImplementedError

    def value(self, spec: Any, key: str) -> Any:
        """``plan.<key>`` for one of this operation's keys."""
        return spec

    def validate(self, spec: Any, plan, view) -> None:
        """Raise PlanError naming the first problem of ``spec`` on this model."""

    def describe(self, spec: Any) -> str:
        raise NotImplementedError

    def combine(self, mine: Any, other: Any) -> Any:
        """Both plans set this operation: the other plan's wins unless an operation knows better."""
        return other

    # ---- structure: what the plan keeps -----------------------------------------------------------------
    def removed_experts(self, spec: Any, layer: int) -> list[int]:
        """Experts whose router row disappears in MoE layer ``layer``."""
        return []

    def named_experts(self, spec: Any) -> dict[int, list[int]]:
        """Experts this operation names by id, per MoE layer: an expert named by two operations (or twice), or in
        a layer another operation removes, is refused by ``Plan.validate``."""
        return {}

    def dropped_layers(self, spec: Any) -> list[int]:
        """MoE layers whose MoE sub-layer is removed (its attention stays)."""
        return []

    def dropped_blocks(self, spec: Any) -> list[int]:
        """Decoder layers removed whole."""
        return []

    def width(self, spec: Any, lay) -> int | None:
        """Intermediate neurons each kept expert of ``lay`` has after the operation (None: unchanged)."""
        return None

    def sources(self, spec: Any, layer: int, stats) -> dict[int, tuple[list[int], list[float]]]:
        """Kept experts built from several originals: expert -> (members, weights), first member = the expert."""
        return {}

    # ---- accounting -------------------------------------------------------------------------------------
    def zeroed(self, spec: Any, lay, n_experts: int, width: int) -> int:
        """Weights of the layer's ``n_experts`` kept experts (of ``width`` neurons) the operation sets to zero."""
        return 0

    def expert_bytes(self, spec: Any, lay, kept: list[int], params_per_expert: int) -> float | None:
        """Bytes of the layer's kept routed experts after the operation (None: two bytes a weight, as bf16)."""
        return None

    def bytes_saved(self, spec: Any, plan, view) -> float:
        """Bytes saved outside the routed experts (quantised attention, shared experts), against bf16."""
        return 0.0

    def speed_limit(self, spec: Any) -> str | None:
        """What this operation cannot turn into speed in transformers' kernels, in words (None: nothing to say); shown
        beside a plan's measured speed (``explorer.speed``) instead of a misleading figure."""
        return None

    def not_stock(self, spec: Any, view) -> str | None:
        """Why a stock config cannot describe the result of this operation (None: it can, if the shapes agree)."""
        return None

    # ---- what it does -----------------------------------------------------------------------------------
    def needs_stats(self, spec: Any, lay) -> str | None:
        """Why editing ``lay`` needs router statistics (None: it does not)."""
        return None

    def touches(self, spec: Any, lay) -> bool:
        """Whether the operation changes the tensors of MoE layer ``lay`` (then they are materialised)."""
        return False

    def needs_hessians(self, spec: Any) -> bool:
        """Whether editing needs each expert's input Hessians (``explorer.hessians``) in the statistics."""
        return False

    def neurons(self, spec: Any, ctx: "EditContext") -> dict | None:
        """The intermediate neurons each kept expert keeps (None: all); the out-of-core editor reads it."""
        return None

    def edit(self, spec: Any, ctx: "EditContext") -> Any:
        """Change the kept experts' tensors in ``ctx.per`` in place, in registry order. What it returns is kept in
        ``LayerEdit.notes[name]`` (and by apply on the new experts module) for the export to read."""

    def param_edits(self, spec: Any, plan, view) -> dict:
        """Weights outside the routed experts the operation changes: {qualified parameter name: (new value, note)}.
        Preview swaps them in for its duration (the originals are never written); apply copies them into the new
        model and keeps ``note`` on the module (``_explorer_notes[name]``) for the export."""
        return {}

    def apply_model(self, spec: Any, model, view, plan) -> None:
        """Structural changes apply makes after the layers' tensors are written (e.g. removing decoder layers)."""

    def stored_format(self, spec: Any) -> str | None:
        """The weight format the export stores this operation's result in, when not the model's own (e.g.
        "compressed-tensors"), for the engine line; None otherwise."""
        return None

    def recipes(self, spec: Any, plan, view) -> dict[str, str]:
        """Recipes for the tools users replay this operation with at scale: {tool: text} (e.g. llm-compressor's
        YAML), written beside a plan and into an export."""
        return {}

    def write_export(self, spec: Any, model, folder) -> str | None:
        """Rewrite the tensors ``save_pretrained`` put in ``folder`` (a staging folder, before it is committed) in
        the operation's own stored format; returns a sentence for the export's summary, or None."""
        return None

    def write_checkpoint(self, spec: Any, plan, view, folder, block_map: dict, renumbered) -> str | None:
        """Out of core: rewrite the shards the checkpoint editor wrote in ``folder`` (staged; old decoder layer ->
        new in ``block_map``, and ``renumbered(stored key)`` -> its key in the output), one shard at a time;
        returns a sentence for the summary, or None."""
        return None

    def out_of_core(self, spec: Any, plan, view, stats, config, model) -> str | None:
        """Why the out-of-core apply cannot do this (None: it can). May raise PlanError for a missing input."""
        return f"{self.name} is not done out of core yet: load the model and apply it in memory"


class LayerListOperation(Operation):
    """An operation whose plan field is a list of layer numbers that it removes (Layer Drop, Block Drop): read,
    written, combined (union) and checked alike; ``unit`` and ``count_of`` word its range check."""

    always_written = True
    unit = "layer"

    def __init__(self) -> None:
        super().__init__()
        self.defaults = {self.name: []}

    def count_of(self, view) -> tuple[int, str]:
        """(how many layers the numbers range over, how the message says it)."""
        raise NotImplementedError

    def read(self, fields: dict):
        v = fields.get(self.name)
        if v is not None and not isinstance(v, list):
            raise PlanError(f"{self.name} must be a list of layer numbers, e.g. [1, 3]; got {type(v).__name__}")
        return read_ids(v, self.name) or None if v else None

    def write(self, spec) -> dict:
        return {self.name: list(spec or [])}

    def validate(self, spec, plan, view) -> None:
        n, said = self.count_of(view)
        for i in spec:
            if not 0 <= i < n:
                raise PlanError(f"{self.name}: {self.unit} {i} does not exist (the model has {said})")
        if len(set(spec)) != len(spec):
            raise PlanError(f"{self.name} names a layer twice")

    def combine(self, mine, other):
        return sorted(set(mine) | set(other))

    def out_of_core(self, spec, plan, view, stats, config, model) -> str | None:
        return None



class EditContext:
    """One MoE layer being edited: the kept experts' tensors and what the statistics say about their neurons and
    inputs, tracked through merging (members, neuron alignment) and slimming (neurons kept)."""

    def __init__(self, lay, stats, kept: list[int], per: dict):
        self.lay, self.stats, self.kept, self.per = lay, stats, kept, per
        self.st = stats.layers[lay.index] if stats is not None else None  # this layer's sums
        self.members: dict[int, tuple[list[int], list]] = {}  # merged expert -> (originals, their neuron orders)
        self.neurons: dict[int, Any] = {}  # expert -> neuron indices kept (into its aligned order)

    def neuron_energy(self, e: int, key: str = "neuron_sq"):
        """Expert ``e``'s per-neuron energy (``neuron_sq`` or ``neuron_sq_gated``): a merged expert's members'
        sums in the aligned order, restricted to the neurons still kept."""
        from ..neurons import group_energy

        group, perms = self.members.get(e, ([e], None))
        x = group_energy(self.st, key, group, perms)
        idx = self.neurons.get(e)
        return x if idx is None else x[idx]

    def hessians(self, e: int, what: str):
        """Expert ``e``'s input Hessians for error-compensating edits: (H_in [H, H], H_mid [I', I'] or None where
        the intermediate Hessian does not follow the expert through merging, tokens). Merged experts sum their
        members' H_in (same inputs); slimmed experts keep the rows and columns of their kept neurons. PlanError in
        words where the statistics hold no Hessians."""
        import torch

        from ..errors import PlanError

        if self.st is None or "hess_in" not in self.st:
            raise PlanError(f"{what} needs each expert's input Hessian: pass statistics (--stats; their Hessians "
                            "are collected when missing, or kept with `python -m explorer stats MODEL --hessians`); a "
                            "session collects them when a plan asks")
        group, perms = self.members.get(e, ([e], None))
        h_in = sum(torch.as_tensor(self.st["hess_in"][m], dtype=torch.float32) for m in group)
        tokens = float(sum(self.st["hess_tokens"][m] for m in group))
        h_mid = None
        if len(group) == 1 and perms is None:
            h_mid = torch.as_tensor(self.st["hess_mid"][e], dtype=torch.float32)
            idx = self.neurons.get(e)
            if idx is not None:
                idx = torch.as_tensor(idx, dtype=torch.long)
                h_mid = h_mid[idx][:, idx]
        return h_in, h_mid, tokens

    def input_energy(self, e: int, key: str = "in_sq"):
        """Expert ``e``'s per-input-channel energy (``in_sq`` or ``in_sq_gated``), members' sums when merged."""
        import torch

        group = self.members.get(e, ([e], None))[0]
        return sum(torch.as_tensor(self.st[key][m]) for m in group)


OPS: dict[str, Operation] = {}
FEWER_EXPERTS_SPEED = "fewer experts save memory, not FLOPs per token: every token still runs top-k experts"  # what dropping or merging cannot buy


def add_to_registry(registry: dict, name: str, entry, owned, owned_by, noun: str) -> None:
    """Put ``entry`` under a ``name`` the registry does not hold yet; refuse ``owned`` items (plan keys, planner
    names) that another entry already holds (``owned_by(entry)``). The operations' and the planners' registry."""
    if not name or name in registry:
        raise ValueError(f"a new name is needed, got {name!r}")
    clash = {k for e in registry.values() for k in owned_by(e)} & set(owned)
    if clash:
        raise ValueError(f"{noun} {sorted(clash)} already belong to another operation")
    registry[name] = entry


def register(op: Operation) -> Operation:
    add_to_registry(OPS, op.name, op, op.keys, lambda o: o.keys, "plan key(s)")
    return op


def owner(key: str) -> Operation | None:
    """The operation that owns plan key ``key``."""
    for op in OPS.values():
        if key in op.keys:
            return op
    return None


def min_keep(stats, view, layer: int) -> tuple[int, int]:
    """(least experts a layer may keep, granularity of the kept count)."""
    return view[layer].keep_rule() if view is not None else (stats.top_k, 1)
