"""A compression plan: a small declarative recipe, validated before use, JSON/YAML round-trip.

Indices: expert operations and ``drop_layers`` name MoE layers by their position among the MoE layers
(0..n_moe-1, as in the plots); ``drop_blocks`` names decoder layers (0..num_hidden_layers-1).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path


from .errors import ExplorerError
from .moe import MoEModel
from .outputs import atomic_write

PRUNE_METHODS = ("moe-pruner", "wanda")


class PlanError(ExplorerError):
    """A plan cannot be applied to this model; the message names the layer and the problem."""


def _intkeys(d: dict | None) -> dict:
    return {_id(k, "a layer number"): v for k, v in (d or {}).items()}


def _id(v, what: str = "an expert id") -> int:
    """An index as the plan must spell it: a whole number (or its decimal string, as JSON keys are), never
    1.9 read as 1, ``true`` read as 1, or Infinity."""
    if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v.strip().lstrip("-").isdigit()):
        raise PlanError(f"{what} must be a whole number, got {v!r}")
    return int(v)


def _weight(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise PlanError(f"merge weights must be finite numbers, got {v!r}")
    return float(v)


def _ids(v, what: str) -> list[int]:
    if not isinstance(v, list):
        raise PlanError(f"{what} must be a list of whole numbers, got {type(v).__name__}")
    return [_id(e, what[:-1] if what.endswith("s") else what) for e in v]


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


@dataclass
class Plan:
    drop_experts: dict[int, list[int]] = field(default_factory=dict)
    merge: dict[int, list[list[int]]] = field(default_factory=dict)
    merge_weights: dict[int, list[list[float]]] = field(default_factory=dict)
    merge_align: bool = False
    slim: float | None = None
    slim_layers: list[int] | None = None
    drop_layers: list[int] = field(default_factory=list)
    drop_blocks: list[int] = field(default_factory=list)
    prune: dict | None = None
    model: dict = field(default_factory=dict)  # what the plan was made for: model_type, num_experts, ...
    notes: str = ""
    recipe: list[dict] = field(default_factory=list)  # the planner calls that wrote it: replayable on another model
    ops: dict = field(default_factory=dict)  # operations of the registry (explorer.ops): plan key -> parsed spec

    # ---- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        from .ops import OPS

        d = asdict(self)
        d.pop("ops")
        for k in ("drop_experts", "merge", "merge_weights"):
            d[k] = {str(i): v for i, v in sorted(d[k].items())}
        for name, spec in self.ops.items():  # each operation writes its own key, as recipes have it
            d[name] = OPS[name].dump(spec)
        return {"version": 1, **d}

    def op(self, name: str):
        """The spec of registered operation ``name`` in this plan, or None."""
        return self.ops.get(name)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict):
            raise PlanError("a plan is a JSON/YAML mapping")
        from .ops import OPS

        d = dict(d)
        d.pop("version", None)
        d.pop("ops", None)
        ops = {}
        for name, op in OPS.items():
            if d.get(name) is not None:
                ops[name] = op.parse(d[name])
            d.pop(name, None)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise PlanError(f"unknown plan field(s): {', '.join(sorted(unknown))}")
        examples = {"drop_experts": '{"0": [1, 2]}', "merge": '{"0": [[1, 2]]}', "merge_weights": '{"0": [[3.0, 1.0]]}'}
        for k, ex in examples.items():
            if d.get(k) is not None and not isinstance(d[k], dict):
                raise PlanError(f"{k} must map MoE layers to lists, e.g. {ex}; got {type(d[k]).__name__}")
        for k in ("drop_layers", "drop_blocks", "slim_layers"):
            if d.get(k) is not None and not isinstance(d[k], list):
                raise PlanError(f"{k} must be a list of layer numbers, e.g. [1, 3]; got {type(d[k]).__name__}")
        try:
            for k in ("merge", "merge_weights"):
                for i, v in (d.get(k) or {}).items():
                    if not isinstance(v, list) or not all(isinstance(g, list) for g in v):
                        raise PlanError(f"{k} of layer {i} must be a list of groups, e.g. [[1, 2]]; got {v!r}")
            if not isinstance(d.get("notes") or "", str):
                raise PlanError(f"notes must be text, got {type(d['notes']).__name__}")
            if d.get("recipe") is not None and not (isinstance(d["recipe"], list)
                                                    and all(isinstance(r, dict) for r in d["recipe"])):
                raise PlanError("recipe must be a list of planner calls ({'planner': ..., ...})")
            return cls(
                drop_experts={k: _ids(v, "drop_experts ids") for k, v in _intkeys(d.get("drop_experts")).items()},
                merge={k: [_ids(g, "merge group ids") for g in v] for k, v in _intkeys(d.get("merge")).items()},
                merge_weights={k: [[_weight(w) for w in g] for g in v]
                               for k, v in _intkeys(d.get("merge_weights")).items()},
                merge_align=bool(d.get("merge_align", False)),
                slim=None if d.get("slim") is None else float(d["slim"]),
                slim_layers=None if d.get("slim_layers") is None else _ids(d["slim_layers"], "slim_layers"),
                drop_layers=_ids(d.get("drop_layers") or [], "drop_layers"),
                drop_blocks=_ids(d.get("drop_blocks") or [], "drop_blocks"),
                prune=d.get("prune"), model=d.get("model") or {}, notes=d.get("notes") or "",
                recipe=list(d.get("recipe") or []), ops=ops,
            )
        except (TypeError, ValueError, AttributeError) as err:
            raise PlanError(f"malformed plan: {err}") from err

    def to_json(self, path: str | Path | None = None) -> str:
        s = json.dumps(self.to_dict(), indent=1)
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
    def _pruned_per_row(self, cols: int) -> int:
        """Weights pruning zeroes in one output row of ``cols`` inputs (what ``transform._prune_mask`` does)."""
        nm = self.prune.get("nm")
        if nm:
            n, m = int(nm[0]), int(nm[1])
            return cols // m * (m - n)
        return int(round(cols * float(self.prune["sparsity"])))

    def prune_sparsity(self) -> float:
        """The share of routed-expert weights pruning zeroes: N:M keeps N of every M whatever ``sparsity`` says."""
        if not self.prune:
            return 0.0
        nm = self.prune.get("nm")
        return 1 - int(nm[0]) / int(nm[1]) if nm else float(self.prune["sparsity"])

    def slim_width(self, intermediate: int) -> int:
        """Neurons an expert of width ``intermediate`` keeps under ``slim``: a multiple of 8 (rows of 16 bytes in
        bf16, what transformers' default grouped_mm kernel needs: 30 of 48 crashed it), at least 8."""
        n = max(1, round(self.slim * intermediate))
        if intermediate >= 16 and n % 8:
            n = max(8, min(intermediate - intermediate % 8, int(n / 8 + 0.5) * 8))
        return n

    def is_empty(self) -> bool:
        return not (self.drop_experts or self.merge or self.slim or self.drop_layers or self.drop_blocks or self.prune
                    or self.ops)

    def describe(self) -> str:
        """A short human name: the planner's note, or what the plan does."""
        if self.notes:
            return self.notes
        parts = []
        n = sum(len(v) for v in self.drop_experts.values())
        if n:
            parts.append("drop " + ", ".join(f"L{i}:" + "/".join(f"e{e}" for e in v)
                                             for i, v in sorted(self.drop_experts.items())) if n <= 4
                         else f"drop {n} experts")
        if self.merge:
            parts.append(f"merge {sum(len(g) for v in self.merge.values() for g in v)} experts into "
                         f"{sum(len(v) for v in self.merge.values())}")
        if self.slim is not None:
            parts.append(f"slim to {self.slim:.0%}")
        if self.drop_layers:
            parts.append("drop MoE layers " + ",".join(map(str, self.drop_layers)))
        if self.drop_blocks:
            parts.append("drop blocks " + ",".join(map(str, self.drop_blocks)))
        if self.prune:
            nm = self.prune.get("nm")
            amount = f"{int(nm[0])}:{int(nm[1])}" if nm else f"{float(self.prune['sparsity']):.0%}"
            parts.append(f"prune {amount} ({self.prune.get('method', 'moe-pruner')})")
        from .ops import OPS

        parts += [OPS[name].describe(spec) for name, spec in self.ops.items()]
        return "; ".join(parts) or "empty plan"

    def combine(self, other: "Plan") -> "Plan":
        """Both plans' operations (other's win where they set the same scalar)."""
        d = self.to_dict()
        o = other.to_dict()
        for k in ("drop_experts", "merge", "merge_weights"):
            for i, v in o[k].items():
                d[k][i] = (d[k].get(i, []) + v) if k == "drop_experts" else (d[k].get(i, []) + v)
        for k in ("drop_layers", "drop_blocks"):
            d[k] = sorted(set(d[k]) | set(o[k]))
        for k in ("slim", "slim_layers", "prune"):
            if o[k] is not None:
                d[k] = o[k]
        d["merge_align"] = d["merge_align"] or o["merge_align"]
        d["notes"] = "; ".join(x for x in (d["notes"], o["notes"]) if x)
        d["recipe"] = d["recipe"] + o["recipe"]
        d["model"] = d["model"] or o["model"]
        from .ops import OPS

        for name, spec in other.ops.items():
            mine = self.ops.get(name)
            d[name] = OPS[name].dump(spec if mine is None else OPS[name].combine(mine, spec))
        return Plan.from_dict(d)

    # ---- structure ------------------------------------------------------------------------------------
    def removed(self, layer: int) -> list[int]:
        """Experts whose router row disappears in MoE layer ``layer`` (dropped, and merged non-first members)."""
        out = list(self.drop_experts.get(layer, []))
        for g in self.merge.get(layer, []):
            out += g[1:]
        return sorted(out)

    def kept(self, layer: int, num_experts: int) -> list[int]:
        gone = set(self.removed(layer))
        return [e for e in range(num_experts) if e not in gone]

    def kept_blocks(self, n_blocks: int) -> list[int]:
        """The decoder layers Block Drop leaves, in order (their new index is their place in this list)."""
        gone = set(self.drop_blocks)
        return [i for i in range(n_blocks) if i not in gone]

    def block_map(self, n_blocks: int) -> dict[int, int | None]:
        """Old decoder-layer index -> new one after Block Drop (None: dropped). The one owner of this renumbering:
        apply, the checkpoint editor, distillation and the layout file all read it."""
        remap: dict[int, int | None] = {i: None for i in range(n_blocks)}
        remap.update({old: new for new, old in enumerate(self.kept_blocks(n_blocks))})
        return remap

    def blocked_moe_layers(self, view: MoEModel) -> set[int]:
        blocks = set(self.drop_blocks)
        return {lay.index for lay in view if lay.layer_idx in blocks}

    def validate(self, view: MoEModel) -> "Plan":
        """Raise PlanError naming the first problem; returns self so calls chain."""
        n, E = len(view), view.num_experts
        if self.model.get("num_experts") and list(self.model["num_experts"]) != list(E):
            raise PlanError(f"this plan was made for a model with experts per layer {self.model['num_experts']}, "
                            f"not {E} ({view.text_config.model_type})")
        n_dec = len(view.decoder_layers)
        for i in self.drop_blocks:
            if not 0 <= i < n_dec:
                raise PlanError(f"drop_blocks: decoder layer {i} does not exist (the model has {n_dec})")
        if len(set(self.drop_blocks)) != len(self.drop_blocks):
            raise PlanError("drop_blocks names a layer twice")
        if len(set(self.drop_blocks)) >= n_dec:
            raise PlanError("drop_blocks removes every decoder layer")
        for i in self.drop_layers:
            if not 0 <= i < n:
                raise PlanError(f"drop_layers: MoE layer {i} does not exist (the model has {n} MoE layers)")
        if len(set(self.drop_layers)) != len(self.drop_layers):
            raise PlanError("drop_layers names a layer twice")
        blocked = self.blocked_moe_layers(view)
        if len(blocked | set(self.drop_layers)) >= n:
            raise PlanError(f"the plan removes every MoE layer ({n} of {n}, by drop_layers and drop_blocks): the "
                            "result would not be a mixture of experts")
        both = blocked & set(self.drop_layers)
        if both:
            raise PlanError(f"MoE layer(s) {sorted(both)} are dropped twice: by drop_layers and drop_blocks")
        for name, table in (("drop_experts", self.drop_experts), ("merge", self.merge)):
            for i in table:
                if not 0 <= i < n:
                    raise PlanError(f"{name}: MoE layer {i} does not exist (the model has {n} MoE layers)")
                if i in blocked or i in self.drop_layers:
                    raise PlanError(f"{name}: MoE layer {i} is itself dropped by this plan; remove one of the two")
        for i in range(n):
            lay = view[i]
            drops = self.drop_experts.get(i, [])
            if len(set(drops)) != len(drops):
                raise PlanError(f"MoE layer {i}: drop_experts names an expert twice")
            seen = set(drops)
            for g in self.merge.get(i, []):
                if len(g) < 2:
                    raise PlanError(f"MoE layer {i}: merge group {g} needs at least two experts")
                for e in g:
                    if e in seen:
                        raise PlanError(f"MoE layer {i}: expert {e} is named twice (in merge group {g} and "
                                        "another group or the drop list)")
                    seen.add(e)
            for e in seen:
                if not 0 <= e < E[i]:
                    raise PlanError(f"MoE layer {i}: expert {e} does not exist (experts 0..{E[i] - 1})")
            if i in self.merge_weights:
                ws = self.merge_weights[i]
                if len(ws) != len(self.merge.get(i, [])) or any(len(w) != len(g) for w, g in zip(ws, self.merge[i])):
                    raise PlanError(f"MoE layer {i}: merge_weights do not match the merge groups")
                if any(x < 0 for w in ws for x in w) or any(sum(w) <= 0 for w in ws):
                    raise PlanError(f"MoE layer {i}: merge_weights must be non-negative with a positive sum")
            problem = lay.check_kept(E[i] - len(self.removed(i)))
            if problem:
                raise PlanError(f"MoE layer {i}: {problem}")
        if self.slim is not None:
            if not 0 < self.slim <= 1:
                raise PlanError(f"slim keeps a fraction of neurons in (0, 1], got {self.slim}")
            if round(self.slim * view[0].intermediate_size) < 1:
                raise PlanError(f"slim={self.slim} keeps no neuron of {view[0].intermediate_size}")
            for i in self.slim_layers or []:
                if not 0 <= i < n:
                    raise PlanError(f"slim_layers: MoE layer {i} does not exist")
        if self.prune is not None:
            p = self.prune
            if not isinstance(p, dict) or "sparsity" not in p:
                raise PlanError("prune needs {'sparsity': s, 'method': 'moe-pruner' | 'wanda'}")
            if not 0 <= float(p["sparsity"]) < 1:
                raise PlanError(f"prune sparsity must be in [0, 1), got {p['sparsity']}")
            if p.get("method", "moe-pruner") not in PRUNE_METHODS:
                raise PlanError(f"prune method must be one of {PRUNE_METHODS}, got {p.get('method')!r}")
            nm = p.get("nm")
            if nm is not None and not (len(nm) == 2 and 0 < int(nm[0]) < int(nm[1])):
                raise PlanError(f"prune N:M must be [N, M] with 0 < N < M, got {nm}")
        from .ops import OPS

        for name, spec in self.ops.items():
            OPS[name].validate(spec, self, view)
        return self

    # ---- accounting -----------------------------------------------------------------------------------
    def report(self, view: MoEModel) -> dict:
        """Parameters before/after (total, active per token), bytes (bf16, and with quantised experts at their
        bits: ``bytes_after``), and loader compatibility."""
        self.validate(view)
        total = sum(p.numel() for p in view.model.parameters())
        before_active = view.summary()["params_active"]
        removed_total = removed_active = 0
        experts_after, inter_after = [], []
        blocked = self.blocked_moe_layers(view)
        for dl_i, dl in enumerate(view.decoder_layers):
            if dl_i in self.drop_blocks:
                n = sum(p.numel() for p in dl.parameters())
                removed_total += n
                moe = [lay for lay in view if lay.layer_idx == dl_i]
                if moe:
                    lay = moe[0]
                    removed_active += n - lay.expert_params() * (lay.num_experts - lay.top_k)
                else:
                    removed_active += n
        from .ops import OPS

        bytes_saved = 0.0
        for lay in view:
            i = lay.index
            if i in blocked:
                continue
            E, k, I = lay.num_experts, lay.top_k, lay.intermediate_size
            per = lay.expert_params()
            if i in self.drop_layers:
                n = per * E + lay.router_params() + lay.shared_params()  # the norm before it stays
                removed_total += n
                removed_active += n - per * (E - k)
                continue
            kept = len(self.kept(i, E))
            I2 = I
            if self.slim is not None and (self.slim_layers is None or i in self.slim_layers):
                I2 = self.slim_width(I)
            gub = lay.gate_up_bias[0].numel() if lay.gate_up_bias is not None else 0
            dnb = lay.down_bias[0].numel() if lay.down_bias is not None else 0
            per2 = (lay.gate_up[0].numel() + lay.down[0].numel() + gub) * I2 // I + dnb
            row = lay.router_row_params()
            w2 = lay.expert_weight_params() * I2 // I  # one kept expert's weights, after slimming
            for name, spec in self.ops.items():  # operations that store expert weights in fewer bytes
                b = OPS[name].expert_bytes(spec, lay, self.kept(i, E), w2)
                if b is not None:
                    bytes_saved += 2 * w2 * kept - b
            removed_total += per * E - per2 * kept + (E - kept) * row
            removed_active += (per - per2) * k
            experts_after.append(kept)
            inter_after.append(I2)
        after_total = total - removed_total
        nonzero = after_total
        if self.prune and self.prune_sparsity() > 0:
            live = [x for x in view if x.index not in blocked and x.index not in self.drop_layers]
            for lay, e, i2 in zip(live, experts_after, inter_after):
                H, I = lay.hidden_size, lay.intermediate_size
                gu_rows = (lay.gate_up[0].numel() // H) * i2 // I  # [out, in] = [2I' or I', H]; down [H, I']
                nonzero -= e * (self._pruned_per_row(H) * gu_rows + self._pruned_per_row(i2) * H)
        uniform = len(set(experts_after)) <= 1 and len(set(inter_after)) <= 1
        shared_sized_alike = (self.slim is not None and view[0].shared
                              and getattr(view.text_config, "shared_expert_intermediate_size", None) is None)
        loadable = uniform and not self.drop_layers and not shared_sized_alike
        why = ("every MoE layer keeps the same shape: plain AutoModelForCausalLM.from_pretrained loads it"
               if loadable else
               "expert counts or widths differ per layer, or MoE sub-layers are dropped: a stock config cannot say "
               "so; explorer.load_model restores it from explorer_layout.json")
        return {
            "params_before": total, "params_after": after_total,
            "active_before": before_active, "active_after": before_active - removed_active,
            "params_nonzero_after": nonzero, "bytes_bf16_after": 2 * after_total,
            "bytes_before": 2 * total, "bytes_after": int(2 * after_total - bytes_saved),
            "experts_after": experts_after, "intermediate_after": inter_after,
            "loadable_by_transformers": loadable, "loader_note": why,
        }


def fingerprint(view: MoEModel) -> dict:
    return {"model_type": view.text_config.model_type, "num_experts": view.num_experts, "top_k": view.top_k,
            "num_hidden_layers": len(view.decoder_layers), "moe_layer_indices": [lay.layer_idx for lay in view]}


