"""The plan being edited: set from JSON, a preset (each operation module's planner), the depth and width controls,
heatmap clicks (drop an expert) and merge groups picked expert by expert."""
from __future__ import annotations

from .. import planners
from ..planners import presets
from ..plan import Plan, PlanError, fingerprint
from .common import PRESETS, SessionError


TABLE_VIEWS = ("auto", "every layer", "one layer")  # auto: every layer up to EVERY_TICK experts, one layer beyond
TABLE_SORTS = ("expert id", "most load", "least load", "highest REAP", "lowest REAP")


class PlanEditor:
    def _init_editor(self) -> None:
        self.plan = Plan()
        self.pending: tuple[int, list[int]] | None = None  # a merge group being picked: (layer, experts)
        if not hasattr(self, "table_view"):  # how the table shows experts is the user's choice: kept across plans
            self.table_view, self.table_layer, self.table_sort = "auto", 0, "expert id"

    def plan_file(self, folder) -> str:
        """The current plan written as ``folder``/plan.json (for a download button): written again only when
        the plan's content changed, so the file is never a stale one."""
        import hashlib
        from pathlib import Path

        text = self.plan.to_json()
        key = hashlib.sha1(text.encode()).hexdigest()[:16]
        path = Path(folder) / "plan.json"
        if getattr(self, "_plan_written", None) == (key, str(path)) and path.exists():
            return str(path)
        self.plan.to_json(path)
        self._plan_written = (key, str(path))
        return str(path)

    def set_table(self, view: str, layer: int | None = None, sort: str | None = None) -> None:
        """How the Plan tab's load table shows the experts: every layer (one cell per expert) or one layer (one row
        per expert, sorted), for models whose layers hold more experts than a row can show."""
        if view not in TABLE_VIEWS:
            raise SessionError(f"table view must be one of {', '.join(TABLE_VIEWS)}, not {view!r}")
        if sort is not None and sort not in TABLE_SORTS:
            raise SessionError(f"table order must be one of {', '.join(TABLE_SORTS)}, not {sort!r}")
        if layer is not None:
            n = len(self.view) if self.view is not None else 1
            if not 0 <= int(layer) < n:
                raise SessionError(f"MoE layer {layer} does not exist: this model has layers 0-{n - 1}")
            self.table_layer = int(layer)
        self.table_view = view
        self.table_sort = sort or self.table_sort

    def one_layer_table(self) -> bool:
        """Whether the load table shows one layer (asked, or auto on a model with more than EVERY_TICK experts)."""
        from ..figures import EVERY_TICK

        if self.table_view == "auto":
            return self.view is not None and max(self.view.num_experts) > EVERY_TICK
        return self.table_view == "one layer"

    def expert_rows(self) -> list[dict]:
        """The one-layer table: a row per expert of ``table_layer`` in ``table_sort`` order, with its load, tokens,
        REAP score and what the plan does with it."""
        self.require(stats=True)
        st = self.stats
        i = self.table_layer = min(self.table_layer, len(st.layers) - 1)  # another model may have fewer layers
        E = st.num_experts[i]
        load = st.load_vs_uniform()[i, :E]
        reap = st.reap(i)
        merged = {e: g for g in self.plan.merge.get(i, []) for e in g}
        picked = set(self.pending[1]) if self.pending and self.pending[0] == i else set()
        dropped = set(self.plan.drop_experts.get(i, []))
        key = {"expert id": range(E), "most load": -load, "least load": load, "highest REAP": -reap,
               "lowest REAP": reap}[self.table_sort]
        order = sorted(range(E), key=lambda e: (key[e], e))
        return [{"expert": e, "load (x uniform)": round(float(load[e]), 2), "tokens": int(st.layers[i]["count"][e]),
                 "REAP": float(reap[e]),
                 "plan": ("dropped" if e in dropped else f"merged with {sorted(set(merged[e]) - {e})}" if e in merged
                          else "picked" if e in picked else "kept")} for e in order]

    def set_plan(self, plan: Plan | str | dict) -> Plan:
        self.require()
        self.require_idle()
        if isinstance(plan, str):
            plan = Plan.loads(plan)
        elif isinstance(plan, dict):
            plan = Plan.from_dict(plan)
        plan.validate(self.view)
        if not plan.model:
            plan.model = fingerprint(self.view)
        if plan.ops.get("merge") is not None and self.stats is not None:
            from ..ops.merge import with_weights  # the weights the preview uses, written into the plan kept

            plan.ops["merge"] = with_weights(plan.ops["merge"], self.stats)
        self.plan = plan
        return plan

    def preset_controls(self, kind: str) -> dict:
        """The preset's own controls on this model: what its amount means, its range and default, which of the
        shared controls (criterion, method, mode, protect_super) apply, and the methods that make sense here."""
        self.require()
        op = presets().get(kind)
        if op is None:
            raise SessionError(f"unknown preset {kind!r}: one of {', '.join(PRESETS)}")
        lo, hi, step, default = op.amount_range(self.view)
        return {"label": op.amount_label, "minimum": lo, "maximum": hi, "step": step, "value": default,
                "uses": tuple(op.uses), "methods": tuple(op.usable_methods(self.view))}

    def preset(self, kind: str, amount: float, criterion: str = "reap", method: str | None = None,
               mode: str = "uniform", protect_super: bool = False) -> Plan:
        """A planner's plan: drop-experts (fraction), merge (experts kept per layer), drop-layers / drop-blocks
        (count), slim (fraction kept), prune (sparsity), quantise (bits). ``method`` (None: the preset's first) is
        refused in words where the preset has no such method; an amount outside the preset's range likewise."""
        self.require(stats=True)
        c = self.preset_controls(kind)
        op = presets()[kind]
        if method is not None and method not in op.methods:  # one the model cannot take is said by its planner
            raise SessionError(f"{kind}: " + (f"the method is one of {', '.join(c['methods'])}, not {method!r}"
                                              if op.methods else f"takes no method (got {method!r})"))
        try:
            value = float(amount)
        except (TypeError, ValueError):
            value = None  # quantise's "fp8": its planner reads it
        if value is not None and not c["minimum"] - 1e-9 <= value <= c["maximum"] + 1e-9:
            raise SessionError(f"{kind}: {c['label']} lies between {c['minimum']:g} and {c['maximum']:g} on this "
                               f"model, got {amount!r}")
        opts = dict(criterion=criterion, method=method or (c["methods"][0] if c["methods"] else None), mode=mode,
                    protect_super=protect_super)
        try:
            kw = op.preset_args(amount, opts, self)
        except PlanError as err:
            raise SessionError(str(err)) from err
        return self.set_plan(planners.make(planners.PRESETS[kind], self.stats, self.view, **kw))

    def set_depth(self, drop_layers: list[int], drop_blocks: list[int], slim_keep: float | None) -> Plan:
        """The Plan tab's depth and width controls: MoE sub-layers and decoder blocks to drop, and the fraction of
        neurons every expert keeps (1 or None: no slimming); the rest of the plan stays."""
        self.require()
        d = self.plan.to_dict()
        d.update(drop_layers=sorted(int(i) for i in drop_layers), drop_blocks=sorted(int(i) for i in drop_blocks),
                 slim=None if slim_keep is None or float(slim_keep) >= 1.0 else float(slim_keep))
        return self.set_plan(d)

    def toggle_expert(self, layer: int, expert: int) -> Plan:
        """Click on a heatmap cell: add the expert to the drop list of its layer, or take it out."""
        self.require()
        d = {k: list(v) for k, v in self.plan.drop_experts.items()}
        cur = d.setdefault(int(layer), [])
        if int(expert) in cur:
            cur.remove(int(expert))
        else:
            cur.append(int(expert))
            cur.sort()
        d = {k: v for k, v in d.items() if v}
        new = Plan.from_dict({**self.plan.to_dict(), "drop_experts": {str(k): v for k, v in d.items()}})
        return self.set_plan(new)

    def pick_for_merge(self, layer: int, expert: int) -> tuple[int, list[int]]:
        """Click in merge mode: add the expert to the group being picked (same layer), or take it out."""
        self.require()
        layer, expert = int(layer), int(expert)
        if self.pending is None or self.pending[0] != layer:
            self.pending = (layer, [])
        members = self.pending[1]
        if expert in members:
            members.remove(expert)
        else:
            members.append(expert)
        return self.pending

    def merge_pending(self) -> Plan:
        """Turn the picked experts into a merge group of the plan (the first picked keeps its router row)."""
        self.require()
        if self.pending is None or len(self.pending[1]) < 2:
            raise SessionError("pick at least two experts of one layer to merge (click mode: add to merge group)")
        layer, members = self.pending
        d = self.plan.to_dict()
        d["merge"] = {**d["merge"], str(layer): d["merge"].get(str(layer), []) + [list(members)]}
        d["merge_weights"] = {k: v for k, v in d["merge_weights"].items() if k != str(layer)}
        if self.stats is not None:  # the weights the preview uses, stored: a replay without statistics is the same
            from ..ops.merge import group_weights

            d["merge_weights"][str(layer)] = group_weights(Plan.from_dict(d).op("merge"), layer, self.stats)
        plan = self.set_plan(d)
        self.pending = None
        return plan
