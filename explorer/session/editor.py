"""The plan being edited: set from JSON, a preset (each operation module's planner), the depth and width controls,
heatmap clicks (drop an expert) and merge groups picked expert by expert."""
from __future__ import annotations

from .. import planners
from ..ops import presets
from ..plan import Plan, PlanError, fingerprint
from .common import PRESETS, SessionError


class PlanEditor:
    def _init_editor(self) -> None:
        self.plan = Plan()
        self.pending: tuple[int, list[int]] | None = None  # a merge group being picked: (layer, experts)

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

    def preset(self, kind: str, amount: float, criterion: str = "reap", method: str = "mc-smoe",
               mode: str = "uniform", protect_super: bool = False) -> Plan:
        """A planner's plan: drop-experts (fraction), merge (experts kept per layer), drop-layers / drop-blocks
        (count), slim (fraction kept), prune (sparsity)."""
        self.require(stats=True)
        op = presets().get(kind)
        if op is None:
            raise SessionError(f"unknown preset {kind!r}: one of {', '.join(PRESETS)}")
        opts = dict(criterion=criterion, method=method, mode=mode, protect_super=protect_super)
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
