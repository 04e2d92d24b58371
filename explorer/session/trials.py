"""Plans tried and students: every previewed plan's perplexity and size (the Compare table and Pareto chart), task
accuracy beside them, side-by-side generations, the distillation runs kept per plan, and the export."""
from __future__ import annotations

import time
from pathlib import Path

from ..apply import apply_plan, export, padded_copy
from ..engines import serving
from ..distill import DistillConfig, Distiller
from ..outputs import check_export_dir
from ..perplexity import fmt_ppl, perplexity
from ..plan import Plan
from ..preview import preview_perplexity
from ..report import preview_result
from .common import MAX_STUDENTS, SessionError, cut_key

# what one generation request may ask of a shared app: a stranger's prompt holds a worker for its whole length
SHARED_GENERATION = {"prompts": 8, "prompt_tokens": 512, "seconds": 60.0}


class Trials:
    def _init_trials(self) -> None:
        self.tried: list[dict] = []
        self._previews: dict[tuple, dict] = {}
        self.distiller: Distiller | None = None  # the latest run (the Distill tab shows it)
        self.students: dict[str, Distiller] = {}  # every distilled plan's run, kept when the plan changes
        self.pareto_x = "params"  # the Pareto chart's size axis: params or bytes
        self.pareto_y = "ppl"  # the Pareto chart's quality axis: ppl, or "task:NAME" once tasks are scored
        self.task_key: tuple | None = None  # (tasks, limit) the Compare table's task columns were scored with
        self.base_scores: dict | None = None  # the original's task scores under task_key (evaluate_tasks' "tasks")
        self.plan_tasks: dict[str, dict] = {}  # plan JSON -> its task scores under task_key

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
                res = preview_perplexity(self.model, self.view, plan, self.data.eval, stats=self.stats_for(plan))
            finally:
                self.lock.release()
            out = self._previews[key] = preview_result(res, base, plan.report(self.view), time.perf_counter() - t)
        if not plan.is_empty():
            entry = {"name": name or plan.describe(), "params": out["params_after"], "bytes": out["bytes_after"],
                     "active": out["active_after"], "ppl": out["ppl"], "ppl_se": out["ppl_se"],
                     "change": out["change"], "within_noise": out["within_noise"], "plan": plan.to_dict(),
                     "serves": serving(plan, self.view),
                     "data": self.data_key}
            same = [i for i, e in enumerate(self.tried) if e["plan"] == entry["plan"] and not e.get("distilled")]
            if same:  # measured again: the row keeps its place in Compare, and its measured speed
                old = self.tried[same[0]]
                entry.update({k: old[k] for k in ("speed", "time", "time_se") if k in old})
                self.tried[same[0]] = entry
            else:
                self.tried.append(entry)
        return out

    def compared(self) -> list[dict]:
        """The plans tried, each marked ``stale`` when measured on other evaluation text than the current one."""
        return [{**e, "stale": e.get("data") != self.data_key} for e in self.tried]

    def pareto_baseline(self) -> dict:
        """The original model as a point of the Pareto chart: parameters, bytes as written (the plans' measure),
        perplexity."""
        n = self.view.summary()["params_total"]
        base = self.baseline()
        return {"params": n, "bytes": Plan().report(self.view)["bytes_before"], "ppl": base.ppl, "ppl_se": base.se,
                "time": 1.0,
                "tasks": self.base_tasks, "tasks_se": {t: v["stderr"] for t, v in (self.base_scores or {}).items()}}

    def measure_speed(self, only_current: bool = False, repeats: int = 5, batch: int = 8, progress=None) -> list[dict]:
        """Prefill and decode speed and memory of every comparable plan (or the plan in force) as ratios to the
        original, measured in the same run (``explorer.speed``): the applied plan in memory, a distilled student as
        it is. Kept on the Compare rows (``speed``, and ``time`` for the Pareto chart's time axis)."""
        from ..speed import compare, limits, speed_of_plan

        self.require(stats=True)
        if only_current:
            self.preview()  # its Compare row (a redraw when it has one)
        todo = [e for e in self.tried if e.get("data") == self.data_key and not (only_current and (
            e["plan"] != self.plan.to_dict() or e.get("distilled")))]
        if not self.lock.acquire(blocking=False):
            raise SessionError("a distillation or another long job is running in this session: measuring speed waits "
                               "until it ends (stop it on the Distill tab)")
        try:
            for i, e in enumerate(todo):
                if progress:
                    progress(i, len(todo), e["name"])
                plan = Plan.from_dict(e["plan"])
                d = self.students.get(cut_key(plan)) if e.get("distilled") else None
                if d is not None:
                    r = compare(self.model, d.final_model().eval(), self.data.eval, repeats=repeats, batch=batch,
                                limits=limits(plan, self.view))
                else:
                    r = speed_of_plan(self.model, self.view, plan, self.data.eval, stats=self.stats_for(plan),
                                      repeats=repeats, batch=batch)
                e["speed"] = r.to_dict()
                e["time"] = 1.0 / r.decode_1
                e["time_se"] = r.spread.get("decode_1", 0.0) / r.decode_1 ** 2
        finally:
            self.lock.release()
        return todo

    def sweep(self, operations=None, criteria=None, fractions=None, progress=None) -> list:
        """A criterion x amount grid of plans (``explorer.sweep``) from this session's statistics, each previewed
        on the evaluation text: the curves of perplexity against size. ``progress(i, n, plan)`` before each point.
        The points are kept (``last_sweep``) for the figure and the CSV download."""
        from ..sweep import CRITERIA, DROP_FRACTIONS, OPERATIONS, run_sweep, sweep_plans

        self.require(stats=True)
        plans = sweep_plans(self.stats, self.view, operations or OPERATIONS, criteria or CRITERIA,
                            fractions or DROP_FRACTIONS)
        if not self.lock.acquire(blocking=False):
            raise SessionError("a distillation or another long job is running in this session: the sweep waits until "
                               "it ends (stop it on the Distill tab)")
        try:
            self.last_sweep = run_sweep(self.model, self.view, self.stats, self.data.eval, plans,
                                        base=self.baseline(), progress=progress)
        finally:
            self.lock.release()
        return self.last_sweep

    def score_tasks(self, tasks: str, limit: int | None = 200, progress=None, only_current: bool = False) -> list[dict]:
        """Task accuracy (lm-eval) of the original and of every comparable plan tried, previews scored through
        their masks and edits and distilled students as they are; one column per task in Compare. Minutes on the
        demo: off until asked. ``limit``: items per task (None: all). ``only_current``: the plan in force only,
        with or without a Compare row (the Plan tab's button)."""
        from ..preview import previewing
        from ..tasks import check, evaluate_tasks, resolve, summary_row

        self.check_tasks(tasks)  # a shared app: only tasks a stranger cannot have written
        self.require()
        if limit is not None and not (isinstance(limit, int) and limit >= 1):
            raise SessionError(f"items per task is a whole number of at least 1 (or none: all), got {limit!r}")
        cfgs = resolve(tasks, self.task_roots())
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
                    d = self.students.get(cut_key(Plan.from_dict(e["plan"])))
                    if d is None:
                        continue
                    res = evaluate_tasks(d.student, self.tok, cfgs, limit=limit)
                else:
                    cut = Plan.from_dict(e["plan"])
                    with previewing(self.model, self.view, cut, self.stats_for(cut)):
                        res = evaluate_tasks(self.model, self.tok, cfgs, limit=limit)
                row, row_se = summary_row(res), {t: s["stderr"] for t, s in res["tasks"].items()}
                for t in self.tried:  # the entry as stored (compared() hands out copies)
                    if t["plan"] == e["plan"] and bool(t.get("distilled")) == bool(e.get("distilled")):
                        t["tasks"], t["tasks_se"] = row, row_se
                if not e.get("distilled"):
                    self.plan_tasks[Plan.from_dict(e["plan"]).to_json()] = row
        finally:
            self.lock.release()
        return self.compared()

    def side_by_side(self, prompts: str | list[str], max_new_tokens: int = 32) -> list[dict]:
        """The original's and the current plan's greedy continuations of each prompt (one per line when a string)."""
        from ..tasks import DEMO_PROMPTS, side_by_side

        self.require()
        if isinstance(prompts, str):
            prompts = [p.replace("\\n", "\n") for p in prompts.splitlines() if p.strip()]
        prompts = prompts or DEMO_PROMPTS
        if not 1 <= int(max_new_tokens) <= 256:
            raise SessionError("continuations are 1 to 256 tokens long")
        bound = SHARED_GENERATION if self.untrusted else {}
        if bound and len(prompts) > bound["prompts"]:
            raise SessionError(f"this app is shared: at most {bound['prompts']} prompts at a time "
                               f"({len(prompts)} given)")
        if not self.lock.acquire(blocking=False):
            raise SessionError("a distillation or another long job is running in this session: generation waits "
                               "until it ends")
        try:
            return side_by_side(self.model, self.view, self.plan, self.tok, prompts, self.stats_for(self.plan),
                                int(max_new_tokens),
                                bound.get("prompt_tokens"), bound.get("seconds"))
        finally:
            self.lock.release()

    @staticmethod
    def export_note(out: str | Path) -> str:
        """What an export holds, from its summary: the bytes of weights written and, where it differs from the
        plain model's, the format they are in (packed, or dequantised and why)."""
        import json

        summary = json.loads((Path(out) / "summary.json").read_text())
        note = f"{summary['bytes_written'] / 2**20:.1f} MiB of weights"
        if summary.get("weight_format"):
            note += f"; {summary['weight_format']}"
        return note

    def plan_task_markdown(self) -> str:
        """The plan in force against the original, task by task, with the noise flag (after ``score_tasks``)."""
        from ..tasks import compare_rows

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
            d = self.students.get(cut_key(plan))
            same_settings = d is not None and {**d.config.__dict__, "steps": 0} == {**config.__dict__, "steps": 0}
            if d is None or not same_settings:
                # a new plan or new settings (learning rate, KL, temperature, ...): a new run from the cut model
                d = Distiller.from_plan(self.model, self.view, plan, self.data.calib, self.data.eval, config,
                                        stats=self.stats_for(plan))
                self.students[cut_key(plan)] = d
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
                 "data": self.data_key, "distilled": True, "serves": serving(d.plan, self.view)}
        self.tried = [e for e in self.tried if not (e.get("distilled") and e["plan"] == entry["plan"])] + [entry]

    def student(self, plan: Plan | None = None) -> Distiller | None:
        """The distillation run of ``plan`` (default: the current plan) that improved its student, if any."""
        d = self.students.get(cut_key(plan or self.plan))
        return d if d is not None and d.best_step > 0 else None

    def kept_note(self) -> str:
        """When the plan in force is not a distilled one: which distilled students are kept, and how to return."""
        others = [d for k, d in self.students.items() if k != cut_key(self.plan) and d.best_step > 0]
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

    def remove_tried(self, which: int | str | None = None) -> int:
        """Take plans out of Compare: the row at index ``which``, every row of the plan in force (None), or all
        ("all"). Their distilled students go with them. Returns how many rows went."""
        if which == "all":
            gone = list(self.tried)
        elif which is None:
            cur = self.plan.to_dict()
            gone = [e for e in self.tried if e["plan"] == cur]
            if not gone:
                raise SessionError("the plan in force is not in Compare: click its row first")
        else:
            if not 0 <= int(which) < len(self.tried):
                raise SessionError(f"there is no plan number {int(which) + 1} in Compare")
            gone = [self.tried[int(which)]]
        for e in gone:
            if e.get("distilled"):
                self.students.pop(cut_key(Plan.from_dict(e["plan"])), None)
        self.tried = [e for e in self.tried if all(e is not g for g in gone)]
        return len(gone)

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

    def engines(self, form: str = "per-layer") -> str:
        """Which engines load an export of the plan in force in ``form`` (``explorer.engines``), in Markdown: said
        before the export button is pressed."""
        from ..engines import padding_problem, uniformity
        from ..report import engine_summary

        self.require()
        if self.plan.is_empty():
            return ""
        why = padding_problem(self.plan, self.view) if form == "padded" and uniformity(self.plan, self.view) else None
        if why:
            return f"The padded form cannot hold this plan exactly: {why}."
        return engine_summary(self.plan.report(self.view, form=form), "markdown")

    def export(self, out_dir: str | Path | None, use_distilled: bool = True, overwrite: bool = False,
               trusted_target: bool = False, form: str = "per-layer") -> Path:
        """``trusted_target``: ``out_dir`` is a folder the app made for this session (a download), not typed.
        ``form``: per-layer or padded, for a plan a stock config cannot say (``explorer.engines``)."""
        self.require()
        if self.plan.is_empty():
            raise SessionError("the plan is empty: nothing to export")
        where = Path(out_dir) if trusted_target else self.export_path(out_dir)
        target = check_export_dir(where, source=self.source, overwrite=overwrite)  # before work
        d = self.student()
        if use_distilled and d is not None:
            model, layout = d.final_model(), d.layout  # a quantise plan's student on its grid, as measured
            if form == "padded" and layout is not None:
                model, layout = padded_copy(model, self.view, self.plan), None
            extra = {"distilled_steps": d.step, "distilled_best_ppl": d.best_ppl, "kept_step": d.best_step}
        else:
            model, _, layout = apply_plan(self.model, self.view, self.plan, stats=self.stats_for(self.plan),
                                          form=form)
            extra = {}
        summary = {"source": self.source, "report": self.plan.report(self.view, form=form),
                   "perplexity_before": self.baseline().to_dict(),
                   "perplexity_after": perplexity(model, self.data.eval).to_dict(), **extra}
        return export(model, self.tok, self.plan, target, layout=layout, summary=summary, source=self.source,
                      overwrite=overwrite, view=self.view)
