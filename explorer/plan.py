"""A compression plan: a small declarative recipe, validated before use, JSON/YAML round-trip.

A plan holds one spec per compression operation of the registry (``explorer.ops``: each operation module reads,
writes, checks and accounts for its own plan keys) plus what the plan was made for (``model``), a note and the
planner calls that wrote it (``recipe``). This module knows no operation by name: it asks each what it keeps.

Indices: expert operations and ``drop_layers`` name MoE layers by their position among the MoE layers
(0..n_moe-1, as in the plots); ``drop_blocks`` names decoder layers (0..num_hidden_layers-1). The keys:

    drop_experts  {moe_layer: [expert, ...]}            remove experts (router rows and biases with them)
    merge         {moe_layer: [[expert, ...], ...]}     each group becomes one expert: the frequency-weighted
                  merge_weights {moe_layer: [[w, ...]]} average of its members (weights stored so a replay is
                  merge_align  bool                      exact), optionally after aligning neurons by permutation;
                                                         the router keeps the row of the group's FIRST member
                                                         (planners put the dominant, most used, expert first)
    slim          fraction of intermediate neurons kept in every expert (by activation energy, as SlimMoE)
    slim_layers   optional [moe_layer, ...] to slim (default: all)
    recipe        the planner calls that wrote the plan; ``planners.replay`` runs them on another model's statistics
    drop_layers   [moe_layer, ...]  MoE sub-layer removed with its post-attention norm (Layer Drop); attention stays
    drop_blocks   [decoder_layer, ...]  whole decoder layers removed, KV-cache indices renumbered (Block Drop)
    prune         {"sparsity": 0.5, "method": "moe-pruner" | "wanda", "nm": [2, 4] | null}  unstructured weights
"""
from __future__ import annotations

import json
import copy
from pathlib import Path


from .errors import PlanError  # noqa: F401  (also where callers have long imported it from)
from .moe import MoEModel
from .ops import OPS, owner
from .outputs import atomic_write

MAX_PLAN_BYTES = 4 << 20  # a plan for 256 experts x 100 layers is ~1 MB of JSON
MAX_PLAN_DEPTH = 12  # the deepest a plan nests: merge_weights {layer: [[w]]} inside the recipe lists


def _depth(x, limit: int = MAX_PLAN_DEPTH) -> None:
    stack = [(x, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            raise PlanError(f"the plan nests deeper than {limit} levels; a plan is a flat mapping of layers to lists")
        if isinstance(v, dict):
            stack.extend((w, d + 1) for w in v.values())
        elif isinstance(v, list):
            stack.extend((w, d + 1) for w in v)


class Plan:
    """A plan: ``Plan(drop_experts={0: [1]}, slim=0.5, notes=...)``, or ``Plan.from_dict`` / ``Plan.load``.

    Each operation's keys read as attributes (``plan.drop_experts``, ``plan.merge_weights``; their default when the
    operation is absent) and can be set (``plan.merge_align = True``); ``plan.ops`` maps operation names to specs.
    """

    def __init__(self, model: dict | None = None, notes: str = "", recipe: list | None = None,
                 ops: dict | None = None, **fields):
        self.__dict__.update(model=dict(model or {}), notes=notes or "", recipe=list(recipe or []))
        grouped: dict[str, dict] = {}
        for k, v in fields.items():
            op = owner(k)
            if op is None:
                raise TypeError(f"Plan has no field {k!r}: one of model, notes, recipe, ops, "
                                f"{', '.join(k for o in OPS.values() for k in o.keys)}")
            grouped.setdefault(op.name, {})[k] = v
        self._set_specs(dict(ops or {}), grouped)

    def _set_specs(self, specs: dict, changes: dict[str, dict]) -> None:
        """``specs`` (operation -> spec) with some plan keys changed (operation -> {key: value}), each operation
        reading its keys anew; kept in registry order, an operation whose spec reads as absent left out."""
        for name, f in changes.items():
            current = {k: OPS[name].value(specs[name], k) for k in OPS[name].keys} if name in specs else {}
            spec = OPS[name].read({**current, **f})
            if spec is None:
                specs.pop(name, None)
            else:
                specs[name] = spec
        self.__dict__["ops"] = {name: specs[name] for name in OPS if name in specs}

    def __getattr__(self, key: str):
        if key.startswith("_") or "ops" not in self.__dict__:
            raise AttributeError(key)
        op = owner(key)
        if op is None:
            raise AttributeError(f"'Plan' has no attribute {key!r}")
        spec = self.__dict__["ops"].get(op.name)
        return copy.deepcopy(op.defaults.get(key)) if spec is None else op.value(spec, key)

    def __setattr__(self, key: str, value) -> None:
        op = owner(key)
        if op is None:
            self.__dict__[key] = value
            return
        self._set_specs(dict(self.ops), {op.name: {key: value}})

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Plan({self.describe()!r})"

    # ---- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d: dict = {"version": 1}
        for name, op in OPS.items():  # each operation writes its own keys, as recipes have them
            d.update(copy.deepcopy(op.write(self.ops.get(name))))
        d.update(model=copy.deepcopy(self.model), notes=self.notes, recipe=copy.deepcopy(self.recipe))
        return d

    def op(self, name: str):
        """The spec of registered operation ``name`` in this plan, or None."""
        return self.ops.get(name)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict):
            raise PlanError("a plan is a JSON/YAML mapping")
        d = dict(d)
        d.pop("version", None)
        d.pop("ops", None)
        known = {"model", "notes", "recipe"} | {k for op in OPS.values() for k in op.keys}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"unknown plan field(s): {', '.join(sorted(map(str, unknown)))}")
        if not isinstance(d.get("notes") or "", str):
            raise PlanError(f"notes must be text, got {type(d['notes']).__name__}")
        if d.get("recipe") is not None and not (isinstance(d["recipe"], list)
                                                and all(isinstance(r, dict) for r in d["recipe"])):
            raise PlanError("recipe must be a list of planner calls ({'planner': ..., ...})")
        try:
            ops = {}
            for name, op in OPS.items():
                spec = op.read({k: d[k] for k in op.keys if k in d})
                if spec is not None:
                    ops[name] = spec
            return cls(model=d.get("model") or {}, notes=d.get("notes") or "", recipe=d.get("recipe") or [], ops=ops)
        except (TypeError, ValueError, AttributeError) as err:
            raise PlanError(f"malformed plan: {err}") from err

    def to_json(self, path: str | Path | None = None) -> str:
        try:
            s = json.dumps(self.to_dict(), indent=1, allow_nan=False)  # strict JSON: other readers refuse NaN
        except ValueError as err:
            raise PlanError(f"the plan holds a number that JSON cannot say (NaN or infinity): {err}") from None
        if path is not None:
            atomic_write(path, s)
        return s

    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        s = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write(path, s)
        return s

    @classmethod
    def loads(cls, text: str) -> "Plan":
        text = text.strip()
        if not text:
            raise PlanError("the plan is empty")
        if len(text.encode("utf-8", "replace")) > MAX_PLAN_BYTES:
            raise PlanError(f"the plan is larger than {MAX_PLAN_BYTES >> 20} MB; a plan names layers and experts")
        if text[0] in "{[":  # JSON: report the parser's line and column
            try:
                d = json.loads(text)
            except json.JSONDecodeError as err:
                raise PlanError(f"the plan is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
                                ) from err
            except RecursionError as err:
                raise PlanError(f"the plan nests deeper than {MAX_PLAN_DEPTH} levels") from err
        else:
            import yaml

            class _NoAliases(yaml.SafeLoader):
                """A YAML reader without anchors and aliases: a few hundred characters of nested aliases expand
                to billions of leaves (a 'billion laughs' plan), and a plan never needs them."""

                def compose_node(self, parent, index):
                    if self.check_event(yaml.events.AliasEvent) or getattr(self.peek_event(), "anchor", None):
                        mark = self.peek_event().start_mark
                        raise PlanError(f"the plan uses YAML anchors or aliases (line {mark.line + 1}, column "
                                        f"{mark.column + 1}); write each value out")
                    return super().compose_node(parent, index)

            try:
                d = yaml.load(text, Loader=_NoAliases)  # noqa: S506 - a SafeLoader without aliases
            except RecursionError as err:
                raise PlanError(f"the plan nests deeper than {MAX_PLAN_DEPTH} levels") from err
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                raise PlanError(f"the plan is neither valid JSON nor YAML: "
                                f"{getattr(err, 'problem', None) or 'unreadable'}{where}") from err
        _depth(d)
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if not p.exists():
            raise PlanError(f"plan file not found: {p}")
        if not p.is_file():
            raise PlanError(f"{p} is not a plan file (a folder or a device); pass the plan's .json or .yaml")
        try:
            text = p.read_text(encoding="utf-8")
        except PermissionError as err:
            raise PlanError(f"no permission to read the plan {p}") from err
        except UnicodeDecodeError as err:
            raise PlanError(f"{p} is not text (UTF-8): not a plan") from err
        return cls.loads(text)

    # ---- combination ----------------------------------------------------------------------------------
    def is_empty(self) -> bool:
        return not self.ops

    def describe(self) -> str:
        """A short human name: the planner's note, or what the plan does."""
        if self.notes:
            return self.notes
        return "; ".join(OPS[name].describe(spec) for name, spec in self.ops.items()) or "empty plan"

    def needs_hessians(self) -> bool:
        """Whether an operation of this plan edits with per-expert input Hessians (GPTQ, SparseGPT)."""
        return any(OPS[name].needs_hessians(spec) for name, spec in self.ops.items())

    def series(self) -> str:
        """What kind of cut this is, for grouping plans in a chart: the planner and its criterion or method
        (``drop experts (reap)``), several joined by ``+``, or the operations and "by hand" without a recipe."""
        if self.recipe:
            parts = []
            for r in self.recipe:
                how = r.get("criterion") or r.get("method")
                parts.append(str(r.get("planner", "plan")).replace("_", " ") + (f" ({how})" if how else ""))
            return " + ".join(dict.fromkeys(parts))
        return " + ".join(name.replace("_", " ") for name in self.ops) + " (by hand)" if self.ops else "empty plan"

    def combine(self, other: "Plan") -> "Plan":
        """Both plans' operations (each operation says how two of its specs combine; by default other's wins)."""
        ops = dict(self.ops)
        for name, spec in other.ops.items():
            ops[name] = spec if name not in ops else OPS[name].combine(ops[name], spec)
        d = {"model": self.model or other.model, "notes": "; ".join(x for x in (self.notes, other.notes) if x),
             "recipe": self.recipe + other.recipe}
        for name, op in OPS.items():
            d.update(op.write(ops.get(name)))
        return Plan.from_dict(copy.deepcopy(d))

    # ---- structure: what the plan keeps (asked of every operation) -----------------------------------
    def _ask(self, hook: str, *args) -> list:
        return [getattr(OPS[name], hook)(spec, *args) for name, spec in self.ops.items()]

    def stored_formats(self) -> list[str]:
        """Weight formats the export stores some of this plan's results in (``Operation.stored_format``)."""
        return [f for f in self._ask("stored_format") if f]

    def recipes(self, view: MoEModel) -> dict[str, str]:
        """{tool: recipe text} to replay this plan's operations with other tools (``Operation.recipes``)."""
        return {k: v for d in self._ask("recipes", self, view) for k, v in d.items()}

    def not_stock(self, view: MoEModel) -> list[str]:
        """Why the operations' result cannot be said by a stock config, whatever the counts (Layer Drop, ...)."""
        return [r for r in self._ask("not_stock", view) if r]

    def removed(self, layer: int) -> list[int]:
        """Experts whose router row disappears in MoE layer ``layer`` (dropped, and merged non-first members)."""
        return sorted(e for x in self._ask("removed_experts", layer) for e in x)

    def kept(self, layer: int, num_experts: int) -> list[int]:
        gone = set(self.removed(layer))
        return [e for e in range(num_experts) if e not in gone]

    def dropped_layers(self) -> list[int]:
        """MoE layers whose MoE sub-layer the plan removes (Layer Drop)."""
        return sorted({i for x in self._ask("dropped_layers") for i in x})

    def dropped_blocks(self) -> list[int]:
        """Decoder layers the plan removes whole (Block Drop)."""
        return sorted({i for x in self._ask("dropped_blocks") for i in x})

    def kept_blocks(self, n_blocks: int) -> list[int]:
        """The decoder layers Block Drop leaves, in order (their new index is their place in this list)."""
        gone = set(self.dropped_blocks())
        return [i for i in range(n_blocks) if i not in gone]

    def block_map(self, n_blocks: int) -> dict[int, int | None]:
        """Old decoder-layer index -> new one after Block Drop (None: dropped). The one owner of this renumbering:
        apply, the checkpoint editor, distillation and the layout file all read it."""
        remap: dict[int, int | None] = {i: None for i in range(n_blocks)}
        remap.update({old: new for new, old in enumerate(self.kept_blocks(n_blocks))})
        return remap

    def blocked_moe_layers(self, view: MoEModel) -> set[int]:
        """MoE layers inside decoder layers the plan removes."""
        blocks = set(self.dropped_blocks())
        return {lay.index for lay in view if lay.layer_idx in blocks}

    def surviving_layers(self, view: MoEModel) -> list[int]:
        """MoE layers the compressed model still has (the one owner of this rule)."""
        gone = self.blocked_moe_layers(view) | set(self.dropped_layers())
        return [lay.index for lay in view if lay.index not in gone]

    def width(self, lay) -> int:
        """Intermediate neurons each kept expert of MoE layer ``lay`` has under the plan."""
        widths = [w for w in self._ask("width", lay) if w is not None]
        return min(widths) if widths else lay.intermediate_size

    def param_edits(self, view: MoEModel) -> dict:
        """Weights outside the routed experts the plan changes: {qualified parameter name: (value, {operation:
        note})}; apply keeps the notes on the module for the export."""
        out: dict = {}
        for name, spec in self.ops.items():
            for qn, (value, note) in OPS[name].param_edits(spec, self, view).items():
                out[qn] = (value, {name: note} if note is not None else {})
        return out

    def sources(self, layer: int, stats=None) -> dict[int, tuple[list[int], list[float]]]:
        """Kept experts built from several originals (merged): expert -> (members, weights)."""
        out: dict = {}
        for x in self._ask("sources", layer, stats):
            out.update(x)
        return out

    def validate(self, view: MoEModel) -> "Plan":
        """Raise PlanError naming the first problem; returns self so calls chain."""
        n, E = len(view), view.num_experts
        if self.model.get("num_experts") and list(self.model["num_experts"]) != list(E):
            raise PlanError(f"this plan was made for a model with experts per layer {self.model['num_experts']}, "
                            f"not {E} ({view.text_config.model_type})")
        for name, spec in self.ops.items():  # each operation's own form and ranges first
            OPS[name].validate(spec, self, view)
        removers: dict[int, list[str]] = {}  # MoE layer -> operations that remove it
        for name, spec in self.ops.items():
            blocks = set(OPS[name].dropped_blocks(spec))
            gone = set(OPS[name].dropped_layers(spec)) | {lay.index for lay in view if lay.layer_idx in blocks}
            for i in gone:
                removers.setdefault(i, []).append(name)
        if len(removers) >= n:
            by = " and ".join(sorted({x for v in removers.values() for x in v}))
            raise PlanError(f"the plan removes every MoE layer ({n} of {n}, by {by}): the result would not be a "
                            "mixture of experts")
        twice = sorted(i for i, v in removers.items() if len(v) > 1)
        if twice:
            raise PlanError(f"MoE layer(s) {twice} are dropped twice: by {' and '.join(removers[twice[0]])}")
        named: dict[int, list[tuple[int, str]]] = {}
        for name, spec in self.ops.items():
            for i, experts in OPS[name].named_experts(spec).items():
                if not 0 <= i < n:
                    raise PlanError(f"{name}: MoE layer {i} does not exist (the model has {n} MoE layers)")
                if i in removers:
                    raise PlanError(f"{name}: MoE layer {i} is itself dropped by this plan; remove one of the two")
                named.setdefault(i, []).extend((e, name) for e in experts)
        for i, pairs in sorted(named.items()):
            seen: dict[int, str] = {}
            for e, name in pairs:
                if e in seen:
                    how = f"by {name}" if seen[e] == name else f"by {seen[e]} and {name}"
                    raise PlanError(f"MoE layer {i}: expert {e} is named twice ({how}); an expert can be dropped or "
                                    "merged once")
                seen[e] = name
                if not 0 <= e < E[i]:
                    raise PlanError(f"MoE layer {i}: expert {e} does not exist (experts 0..{E[i] - 1})")
        for lay in view:
            problem = lay.check_kept(E[lay.index] - len(self.removed(lay.index)))
            if problem:
                raise PlanError(f"MoE layer {lay.index}: {problem}")
        return self

    # ---- accounting -----------------------------------------------------------------------------------
    def report(self, view: MoEModel, form: str = "per-layer") -> dict:
        """Parameters before/after (total, active per token), bytes as the export writes them (``bytes_before``,
        ``bytes_after``: the model's own dtype, quantised experts packed where the export packs them; a bf16 copy's
        ``bytes_bf16_after`` beside), and which engines load the export in ``form`` (``explorer.engines``)."""
        self.validate(view)
        total = sum(p.numel() for p in view.model.parameters())
        dtype = next(p for p in view.model.parameters() if p.is_floating_point()).dtype
        size = dtype.itemsize
        before_active = view.summary()["params_active"]
        removed_total, removed_active = self._removed_by_block_drop(view)
        bytes_saved = float(sum(self._ask("bytes_saved", self, view)))  # outside the routed experts
        zeroed = 0
        experts_after, width_after = [], []
        sub_dropped, block_dropped = set(self.dropped_layers()), self.blocked_moe_layers(view)
        for lay in view:
            change = self._moe_layer_change(lay, size, lay.index in sub_dropped, lay.index in block_dropped)
            if change is None:
                continue
            removed_total += change["params"]
            removed_active += change["active"]
            bytes_saved += change["bytes_saved"]
            zeroed += change["zeroed"]
            if "experts" in change:
                experts_after.append(change["experts"])
                width_after.append(change["width"])
        after_total = total - removed_total
        stock, why, engines = self._loader_note(view, form)
        return {
            "params_before": total, "params_after": after_total,
            "active_before": before_active, "active_after": before_active - removed_active,
            "params_nonzero_after": after_total - zeroed, "bytes_bf16_after": 2 * after_total,
            "dtype": str(dtype).replace("torch.", ""),
            "bytes_before": size * total, "bytes_after": int(size * after_total - bytes_saved),
            "experts_after": experts_after, "intermediate_after": width_after,
            "loadable_by_transformers": stock or form == "padded", "loader_note": why, "engines": engines,
            "form": "stock" if stock else form,
        }

    def _removed_by_block_drop(self, view: MoEModel) -> tuple[int, int]:
        """(parameters, active parameters per token) of the decoder layers Block Drop removes whole."""
        total = active = 0
        for dl_i in set(self.dropped_blocks()):
            n = sum(p.numel() for p in view.decoder_layers[dl_i].parameters())
            total += n
            moe = [lay for lay in view if lay.layer_idx == dl_i]
            # a MoE layer's inactive experts were never active
            active += n - (moe[0].expert_params() * (moe[0].num_experts - moe[0].top_k) if moe else 0)
        return total, active

    def _moe_layer_change(self, lay, size: int, sub_dropped: bool, block_dropped: bool) -> dict | None:
        """What the plan removes from one MoE layer that survives Block Drop: parameters, active parameters, bytes
        saved by storage in fewer bytes, weights set to zero, and the experts and width it keeps (absent for a
        Layer-Dropped MoE sub-layer); None for a layer inside a dropped block."""
        i, E, k, width = lay.index, lay.num_experts, lay.top_k, lay.intermediate_size
        per_expert = lay.expert_params()
        if sub_dropped:
            n = per_expert * E + lay.router_params() + lay.shared_params()  # the norm before it stays
            return {"params": n, "active": n - per_expert * (E - k), "bytes_saved": 0.0, "zeroed": 0}
        if block_dropped:
            return None
        kept_ids = self.kept(i, E)
        kept = len(kept_ids)
        width_after = self.width(lay)
        per_kept = lay.expert_params_at(width_after)
        kept_weights = lay.expert_weight_params() * width_after // width  # one kept expert's weights, slimmed
        saved = sum(size * kept_weights * kept - b  # operations that store weights in fewer bytes
                    for b in self._ask("expert_bytes", lay, kept_ids, kept_weights) if b is not None)
        return {"params": per_expert * E - per_kept * kept + (E - kept) * lay.router_row_params(),
                "active": (per_expert - per_kept) * k, "bytes_saved": float(saved),
                "zeroed": sum(self._ask("zeroed", lay, kept, width_after)), "experts": kept, "width": width_after}

    def _loader_note(self, view: MoEModel, form: str = "per-layer") -> tuple[bool, str, list[dict]]:
        """Whether a stock config describes the result, the engines' verdicts in one line, and the verdicts
        (``explorer.engines``)."""
        from .engines import as_dicts, engine_line, uniformity, verdicts

        vs = verdicts(self, view, form)
        return not uniformity(self, view), engine_line(vs), as_dicts(vs)

def fingerprint(view: MoEModel) -> dict:
    return {"model_type": view.text_config.model_type, "num_experts": view.num_experts, "top_k": view.top_k,
            "num_hidden_layers": len(view.decoder_layers), "moe_layer_indices": [lay.layer_idx for lay in view]}


