"""One user's working state: the model, its data and statistics, the plans tried, a distillation run.

The Gradio app keeps one ``Session`` per browser session and the notebook widgets one per explorer; both only
arrange controls around these methods, so they behave the same and nothing is computed in the UI layer.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np

from .errors import ExplorerError
from . import planners
from .apply import apply_plan, export
from .data import Dataset, load_data, text_blocks
from .distill import DistillConfig, Distiller
from .loading import DEMO_MODEL, load_model
from .moe import input_device
from .ops import preset_methods, presets
from .outputs import check_export_dir
from .perplexity import fmt_ppl, perplexity
from .plan import Plan, PlanError, fingerprint
from .preview import preview_perplexity
from .report import preview_result
from .saliency import CHEAP, expert_scores, expert_similarity
from .stats import RouterStats, VocabRouting, collect_stats, token_routes, vocab_routing


PRESETS = tuple(planners.PRESETS)  # what ``preset`` makes: each operation module's preset
METHODS = preset_methods()  # the presets' method choices (merge and prune methods)


MAX_STUDENTS = 3  # distilled students kept per session (each is a copy of the cut model)


def _key(plan: Plan) -> str:
    """What a plan cuts (not its notes, recipe or model fingerprint): two plans that cut alike share a student."""
    d = {k: v for k, v in plan.to_dict().items() if k not in ("notes", "recipe", "model")}
    return json.dumps(d, sort_keys=True)


class SessionError(ExplorerError):
    """A user-facing problem: the message is shown as it is."""


class Session:
    def __init__(self, block_len: int = 128, max_tokens: int = 4096, out_root: str | Path | None = None,
                 untrusted: bool = False, allow_paths: list[str | Path] | None = None):
        self.model = self.tok = self.view = None
        self.source: str | None = None
        self.data: Dataset | None = None
        self.data_source = "demo"
        self.block_len, self.max_tokens = block_len, max_tokens
        self.pareto_x = "params"  # the Pareto chart's size axis: params or bytes
        self.pareto_y = "ppl"  # the Pareto chart's quality axis: ppl, or "task:NAME" once tasks are scored
        self.task_key: tuple | None = None  # (tasks, limit) the Compare table's task columns were scored with
        self.base_scores: dict | None = None  # the original's task scores under task_key (evaluate_tasks' "tasks")
        self.plan_tasks: dict[str, dict] = {}  # plan JSON -> its task scores under task_key
        self.stats: RouterStats | None = None
        self._scores: dict[str, list[np.ndarray]] = {}
        self._vocab: tuple[str, VocabRouting] | None = None
        self._previews: dict[tuple, dict] = {}
        self.base = None  # Perplexity of the unmodified model on the evaluation blocks
        self.plan = Plan()
        self.tried: list[dict] = []
        self.distiller: Distiller | None = None  # the latest run (the Distill tab shows it)
        self.students: dict[str, Distiller] = {}  # every distilled plan's run, kept when the plan changes
        self.pending: tuple[int, list[int]] | None = None  # a merge group being picked: (layer, experts)
        self.lock = threading.Lock()  # one long job per session
        # relative export paths resolve here (the app gives each browser session its own), never the server's cwd
        self.out_root = Path(out_root) if out_root is not None else None
        # a shared app (--share, or bound beyond loopback) takes every field from strangers: no server path is read
        # or written unless the owner listed it (allow_paths); relative exports never climb out of out_root
        self.untrusted = untrusted
        self.allow_paths = [Path(p).expanduser().resolve() for p in (allow_paths or [])]
        self.data_key: str | None = None  # which evaluation tokens the perplexities were measured on

    # ---- model and data ---------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.model is not None

    def require(self, stats: bool = False) -> None:
        if self.model is None:
            raise SessionError("load a model first (Model tab)")
        if stats and self.stats is None:
            raise SessionError("collect statistics first (Model tab)")

    def load(self, source: str | None = None, device: str | None = None, dtype: str | None = None,
             trust_remote_code: bool = False, device_map: str | None = None, max_memory: str | None = None) -> dict:
        """device_map ('auto') spreads a model larger than one device over GPUs, CPU and disk."""
        src = None if source in (None, "", "demo", str(DEMO_MODEL)) else source.strip()
        self.check_source(src, "model")
        model, tok, view = load_model(src, device=device or None, dtype=dtype or None,
                                      trust_remote_code=trust_remote_code, device_map=device_map or None,
                                      max_memory=max_memory or None)
        self.model, self.tok, self.view = model, tok, view
        self.source = src or str(DEMO_MODEL)
        self.stats, self._scores, self.base, self.plan, self.tried, self.distiller = None, {}, None, Plan(), [], None
        self.students = {}
        self._vocab, self._previews = None, {}
        self.set_data(self.data_source)
        return self.summary()

    def set_data(self, source: str = "demo", block_len: int | None = None, max_tokens: int | None = None,
                 uploaded: bool = False) -> dict:
        """``uploaded``: ``source`` is the session's own copy of uploaded files, not a path a user typed."""
        self.require()
        if not uploaded:
            self.check_source(source, "data")
        data = load_data(self.tok, source, block_len=block_len or self.block_len,
                         max_tokens=max_tokens if max_tokens is not None else self.max_tokens, model=self.model)
        self.data, self.data_source = data, source
        self.data_key = hashlib.sha1(data.eval.input_ids.numpy().tobytes()).hexdigest()[:12]
        self.stats, self._scores, self.base = None, {}, None
        return {"source": source, "domains": data.eval.domains, "calib_tokens": data.calib.tokens,
                "eval_tokens": data.eval.tokens, "block_len": data.eval.block_len}

    def summary(self) -> dict:
        self.require()
        s = self.view.summary()
        s["source"] = self.source
        s["device"] = str(input_device(self.model))
        s["dtype"] = str(next(self.model.parameters()).dtype).replace("torch.", "")
        return s

    # ---- statistics and scores --------------------------------------------------------------------------
    def collect(self, progress=None) -> RouterStats:
        self.require()
        with self.lock:
            self.stats = collect_stats(self.model, self.view, self.data.calib, progress=progress)
            self._scores, self._previews = {}, {}
            self.base = perplexity(self.model, self.data.eval)
        return self.stats

    def scores(self, criterion: str, progress=None) -> list[np.ndarray]:
        self.require(stats=True)
        if criterion not in self._scores:
            kw = {}
            if criterion not in CHEAP:
                kw = dict(model=self.model, view=self.view, blocks=self.data.calib, max_tokens=1024,
                          progress=progress)
            self._scores[criterion] = expert_scores(self.stats, criterion, **kw)
        return self._scores[criterion]

    def similarity(self, layer: int, kind: str) -> np.ndarray:
        self.require(stats=True)
        return expert_similarity(self.stats, layer, kind, self.view)

    def vocab(self) -> VocabRouting:
        """Which experts each token id goes to, on (up to 8K tokens of) the calibration text; computed once."""
        self.require(stats=True)
        if self._vocab is None or self._vocab[0] != self.data_key:
            self._vocab = (self.data_key, vocab_routing(self.model, self.view, self.data.calib, max_tokens=8192))
        return self._vocab[1]

    def routes(self, text: str) -> dict:
        self.require()
        if not text or not text.strip():
            raise SessionError("type some text to see how it is routed")
        return token_routes(self.model, self.view, self.tok, text, max_tokens=400)

    # ---- plans ------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A long job (distillation, statistics) holds this session."""
        return self.lock.locked()

    def require_idle(self) -> None:
        if self.busy:
            raise SessionError("a distillation or another long job is running in this session: stop it (Distill "
                               "tab) or wait for it to finish, then change the plan")

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
            from .ops.merge import group_weights

            d["merge_weights"][str(layer)] = group_weights(Plan.from_dict(d).op("merge"), layer, self.stats)
        plan = self.set_plan(d)
        self.pending = None
        return plan

    def baseline(self):
        self.require()
        if self.base is None:
            self.base = perplexity(self.model, self.data.eval)
        return self.base

    def preview(self, plan: Plan | None = None, name: str | None = None) -> dict:
        """What-if perplexity and size of ``plan`` (default: the current plan); recorded for comparison."""
        self.require()
        plan = plan or self.plan
        base = self.baseline()
        # the same plan on the same model, statistics and text gives the same numbers: a redraw costs nothing
        key = (plan.to_json(), self.data_key, id(self.model), id(self.stats))
        out = self._previews.get(key)
        if out is None:
            t = time.perf_counter()
            if not self.lock.acquire(blocking=False):  # never queue silently behind a distillation
                raise SessionError("a distillation or another long job is running in this session: the preview "
                                   "waits until it ends (stop it on the Distill tab)")
            try:
                res = preview_perplexity(self.model, self.view, plan, self.data.eval, stats=self.stats)
            finally:
                self.lock.release()
            out = self._previews[key] = preview_result(res, base, plan.report(self.view), time.perf_counter() - t)
        if not plan.is_empty():
            entry = {"name": name or plan.describe(), "params": out["params_after"], "bytes": out["bytes_after"],
                     "active": out["active_after"], "ppl": out["ppl"], "plan": plan.to_dict(), "data": self.data_key}
            same = [i for i, e in enumerate(self.tried) if e["plan"] == entry["plan"] and not e.get("distilled")]
            if same:  # measured again: the row keeps its place in Compare
                self.tried[same[0]] = entry
            else:
                self.tried.append(entry)
        return out

    def compared(self) -> list[dict]:
        """The plans tried, each marked ``stale`` when measured on other evaluation text than the current one."""
        return [{**e, "stale": e.get("data") != self.data_key} for e in self.tried]

    def pareto_baseline(self) -> dict:
        """The original model as a point of the Pareto chart: parameters, bytes in bf16, perplexity."""
        n = self.view.summary()["params_total"]
        return {"params": n, "bytes": 2 * n, "ppl": self.baseline().ppl, "tasks": self.base_tasks}

    def score_tasks(self, tasks: str, limit: int | None = 200, progress=None, only_current: bool = False) -> list[dict]:
        """Task accuracy (lm-eval) of the original and of every comparable plan tried, previews scored through
        their masks and edits and distilled students as they are; one column per task in Compare. Minutes on the
        demo: off until asked. ``limit``: items per task (None: all). ``only_current``: the plan in force only,
        with or without a Compare row (the Plan tab's button)."""
        from .preview import previewing
        from .tasks import check, evaluate_tasks, resolve, summary_row

        self.require()
        cfgs = resolve(tasks)
        check(cfgs)  # unknown tasks or unreachable data: said before any scoring
        key = (tasks, limit)
        if not self.lock.acquire(timeout=30):  # a preview of a click ends within seconds; a distillation does not
            raise SessionError("a distillation or another long job is running in this session: task scoring "
                               "waits until it ends")
        try:
            if self.task_key != key:
                self.base_scores = None
                self.plan_tasks = {}
                for e in self.tried:
                    e.pop("tasks", None)
            self.task_key = key
            todo = [e for e in self.comparable() if "tasks" not in e]
            cur = self.plan.to_dict()
            if only_current:
                todo = [e for e in todo if e["plan"] == cur]
                if not todo and self.plan.to_json() not in self.plan_tasks:
                    todo = [{"name": self.plan.describe(), "plan": cur}]  # not in Compare yet: scored all the same
            n = len(todo) + (self.base_scores is None)
            done = 0

            def step(what):
                nonlocal done
                if progress:
                    progress(done / max(n, 1), f"tasks: {what} ({done + 1} of {n})")
                done += 1

            if self.base_scores is None:
                step("the original")
                self.base_scores = evaluate_tasks(self.model, self.tok, cfgs, limit=limit)["tasks"]
            for e in todo:
                step(e["name"])
                if e.get("distilled"):
                    d = self.students.get(_key(Plan.from_dict(e["plan"])))
                    if d is None:
                        continue
                    row = summary_row(evaluate_tasks(d.student, self.tok, cfgs, limit=limit))
                else:
                    with previewing(self.model, self.view, Plan.from_dict(e["plan"]), self.stats):
                        row = summary_row(evaluate_tasks(self.model, self.tok, cfgs, limit=limit))
                for t in self.tried:  # the entry as stored (compared() hands out copies)
                    if t["plan"] == e["plan"] and bool(t.get("distilled")) == bool(e.get("distilled")):
                        t["tasks"] = row
                if not e.get("distilled"):
                    self.plan_tasks[Plan.from_dict(e["plan"]).to_json()] = row
        finally:
            self.lock.release()
        return self.compared()

    def side_by_side(self, prompts: str | list[str], max_new_tokens: int = 32) -> list[dict]:
        """The original's and the current plan's greedy continuations of each prompt (one per line when a string)."""
        from .tasks import DEMO_PROMPTS, side_by_side

        self.require()
        if isinstance(prompts, str):
            prompts = [p.replace("\\n", "\n") for p in prompts.splitlines() if p.strip()]
        prompts = prompts or DEMO_PROMPTS
        if not 1 <= int(max_new_tokens) <= 256:
            raise SessionError("continuations are 1 to 256 tokens long")
        if not self.lock.acquire(blocking=False):
            raise SessionError("a distillation or another long job is running in this session: generation waits "
                               "until it ends")
        try:
            return side_by_side(self.model, self.view, self.plan, self.tok, prompts, self.stats, int(max_new_tokens))
        finally:
            self.lock.release()

    def plan_task_markdown(self) -> str:
        """The plan in force against the original, task by task, with the noise flag (after ``score_tasks``)."""
        from .tasks import compare_rows

        row = self.plan_tasks.get(self.plan.to_json())
        if not self.base_scores or not row:
            return ""
        return compare_rows(self.base_tasks, row, {t: v["stderr"] for t, v in self.base_scores.items()})

    @property
    def base_tasks(self) -> dict[str, float]:
        """The original's accuracy per task, as the Compare columns show it ({} before any scoring)."""
        return {t: v["value"] for t, v in (self.base_scores or {}).items()}

    def task_names(self) -> list[str]:
        return list(self.base_tasks)

    def comparable(self) -> list[dict]:
        """The plans tried on the current evaluation text: what may stand beside the original's perplexity."""
        return [e for e in self.compared() if not e["stale"]]

    def remeasure(self) -> list[dict]:
        """Preview again every stale plan on the current evaluation text (one evaluation pass each)."""
        for e in [e for e in self.compared() if e["stale"] and not e.get("distilled")]:
            self.preview(Plan.from_dict(e["plan"]), name=e["name"])
        return self.compared()

    # ---- distillation -----------------------------------------------------------------------------------
    def distill(self, config: DistillConfig, plan: Plan | None = None):
        """Generator of DistillEvents for the current plan. ``stop_distill`` ends it; calling again resumes a stopped
        run toward its target, or continues a finished one for ``config.steps`` more steps."""
        self.require()
        plan = plan or self.plan
        if plan.is_empty():
            raise SessionError("the plan is empty: choose experts or layers to cut first")
        if not self.lock.acquire(timeout=120):  # waits for a preview to finish; two runs at once are refused
            raise SessionError("another job in this session is still running; stop it or wait for it")
        try:
            d = self.students.get(_key(plan))
            same_settings = d is not None and {**d.config.__dict__, "steps": 0} == {**config.__dict__, "steps": 0}
            if d is None or not same_settings:
                # a new plan or new settings (learning rate, KL, temperature, ...): a new run from the cut model
                d = Distiller.from_plan(self.model, self.view, plan, self.data.calib, self.data.eval, config,
                                        stats=self.stats)
                self.students[_key(plan)] = d
                while len(self.students) > MAX_STUDENTS:  # each holds a copy of the cut model
                    self.students.pop(next(iter(self.students)))
            elif d.step >= d.config.steps:  # finished: Start again distills ``config.steps`` more steps
                d.config.steps = d.step + config.steps
            self.distiller = d
            yield from d.run()
        finally:
            self.lock.release()
        self._record_distilled()

    def _record_distilled(self) -> None:
        """The distilled student stands in Compare beside the plans (its best evaluation, on the same tokens)."""
        d = self.distiller
        if d is None or d.best_step == 0 or d.best_ppl is None:
            return
        rep = d.plan.report(self.view)
        entry = {"name": f"{d.plan.describe()} + distilled ({d.step} steps)", "params": rep["params_after"],
                 "bytes": rep["bytes_after"], "active": rep["active_after"], "ppl": d.best_ppl, "plan": d.plan.to_dict(),
                 "data": self.data_key, "distilled": True}
        self.tried = [e for e in self.tried if not (e.get("distilled") and e["plan"] == entry["plan"])] + [entry]

    def student(self, plan: Plan | None = None) -> Distiller | None:
        """The distillation run of ``plan`` (default: the current plan) that improved its student, if any."""
        d = self.students.get(_key(plan or self.plan))
        return d if d is not None and d.best_step > 0 else None

    def kept_note(self) -> str:
        """When the plan in force is not a distilled one: which distilled students are kept, and how to return."""
        others = [d for k, d in self.students.items() if k != _key(self.plan) and d.best_step > 0]
        if not others:
            return ""
        names = "; ".join(f"{d.plan.describe()} (perplexity {fmt_ppl(d.best_ppl)})" for d in others)
        return (f"ℹ️ Distilled students are kept for: {names}. Pick a plan's row in Compare to make it the plan "
                "again and export its student.")

    def use_tried(self, index: int) -> Plan:
        """Make a plan tried earlier (a Compare row) the current plan again; its distilled student comes with it."""
        if not 0 <= index < len(self.tried):
            raise SessionError(f"there is no plan number {index + 1} in Compare")
        return self.set_plan(self.tried[index]["plan"])

    def export_what(self) -> str:
        """In words, which model ``export`` would write for the current plan."""
        d = self.student()
        if d is not None:
            return (f"the distilled student (step {d.best_step} of {d.step}, perplexity {fmt_ppl(d.best_ppl)} against "
                    f"{fmt_ppl(d.initial_ppl)} undistilled)")
        return "the cut model, not distilled"

    def stop_distill(self) -> None:
        if self.distiller is not None:
            self.distiller.stop()

    # ---- export -----------------------------------------------------------------------------------------
    def allowed(self, path: str | Path) -> bool:
        """Whether a server path may be read or written by this session: always in a private app; in a shared
        one only inside a folder the owner listed (``--allow-paths``)."""
        if not self.untrusted:
            return True
        p = Path(path).expanduser().resolve()
        return any(p == a or a in p.parents for a in self.allow_paths)

    def check_source(self, source: str | None, what: str = "model") -> None:
        """A model or data field in a shared app: the demo, a hub id or an uploaded file; a server path only
        inside an allowed folder. The refusal says nothing about whether the path exists."""
        if not self.untrusted or source in (None, "", "demo") or str(source).startswith("hf:"):
            return
        text = str(source).strip()
        looks_local = text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or Path(text).exists()
        if looks_local and not self.allowed(text):
            raise SessionError(f"this app is shared: {what} paths on the server are not read unless its owner "
                               "allowed them (--allow-paths); " + ("upload the text instead" if what == "data" else
                                                                    "use the demo or a hub id"))

    def export_path(self, out_dir: str | Path | None) -> Path:
        """Where an export goes: an empty or relative path under ``out_root`` (never climbing out of it); an
        absolute one as given in a private app, and in a shared one only inside an allowed folder."""
        text = "" if out_dir is None else str(out_dir).strip()
        p = Path(text or "compressed").expanduser()
        if self.out_root is None:
            return p
        if p.is_absolute():
            if not self.allowed(p):
                raise SessionError("this app is shared: exports go to a folder name under your session's own folder "
                                   "(an absolute path needs the owner's --allow-paths)")
            return p
        root = self.out_root.resolve()
        target = (self.out_root / p).resolve()
        if target != root and root not in target.parents:
            raise SessionError(f"the export folder {text!r} climbs out of your session's folder; give a folder name "
                               "inside it")
        return self.out_root / p

    def export(self, out_dir: str | Path | None, use_distilled: bool = True, overwrite: bool = False,
               trusted_target: bool = False) -> Path:
        """``trusted_target``: ``out_dir`` is a folder the app made for this session (a download), not typed."""
        self.require()
        if self.plan.is_empty():
            raise SessionError("the plan is empty: nothing to export")
        where = Path(out_dir) if trusted_target else self.export_path(out_dir)
        target = check_export_dir(where, source=self.source, overwrite=overwrite)  # before work
        d = self.student()
        if use_distilled and d is not None:
            d.restore_best()
            model, layout = d.student, d.layout
            extra = {"distilled_steps": d.step, "distilled_best_ppl": d.best_ppl, "kept_step": d.best_step}
        else:
            model, _, layout = apply_plan(self.model, self.view, self.plan, stats=self.stats)
            extra = {}
        summary = {"source": self.source, "report": self.plan.report(self.view),
                   "perplexity_before": self.baseline().to_dict(),
                   "perplexity_after": perplexity(model, self.data.eval).to_dict(), **extra}
        return export(model, self.tok, self.plan, target, layout=layout, summary=summary, source=self.source,
                      overwrite=overwrite)

    def eval_text(self, text: str) -> dict:
        self.require()
        res = perplexity(self.model, text_blocks(self.tok, text, self.block_len))
        return res.to_dict()
