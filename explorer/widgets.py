"""Notebook widgets (ipywidgets + plotly FigureWidget): the app's views, interactive in JupyterLab.

    from explorer.widgets import explore
    explore()                      # the demo model, every view in tabs
    explore(session).routing       # or one view alone: .routing, .tokens, .saliency, .plan, .distill

Figures come from ``explorer.figures`` (the same builders as the app) and update in place. Only the clickable load
heatmap is a plotly ``FigureWidget`` (it needs ``anywidget``, and its widget state carries plotly.js, about 5 MB);
every other chart is a ``FigureView``, drawn from its data by JupyterLab's plotly renderer, so a notebook saved with
widget state does not hold a copy of plotly.js per chart.
"""
from __future__ import annotations

import dataclasses
import html
import json
import threading

import ipywidgets as W
import plotly.graph_objects as go
import plotly.io as pio

from . import figures
from .distill import DistillConfig
from .perplexity import fmt_ppl
from .report import preview_report
from .plan import Plan
from .saliency import CRITERIA, SIMILARITIES
from .session import METHODS, PRESETS, Session


class FigureView(W.Output):
    """A chart shown as its plotly data in an Output widget: no plotly.js in the widget state, and safe to update
    from a background thread (the outputs are set, not captured). ``figure`` is the figure shown."""

    def __init__(self, fig: go.Figure):
        super().__init__()
        self.show(fig)

    def show(self, fig: go.Figure) -> None:
        self.figure = fig
        title = fig.layout.title.text or "chart"
        self.outputs = ({"output_type": "display_data", "metadata": {},
                         "data": {"application/vnd.plotly.v1+json": json.loads(pio.to_json(fig, validate=False)),
                                  "text/plain": f"<plotly figure: {title}>"}},)

    @property
    def data(self):
        return self.figure.data

    @property
    def layout(self):
        return self.figure.layout


def _fw(fig: go.Figure) -> go.FigureWidget:
    """The clickable kind of chart (the load heatmap): a plotly FigureWidget."""
    return go.FigureWidget(fig)


def refresh(fw: go.FigureWidget | FigureView, fig: go.Figure) -> None:
    """Put ``fig``'s data and layout into an existing chart, in place. In a FigureWidget click handlers stay
    attached: traces that keep their place are updated, and when the traces change the handlers move to them."""
    if isinstance(fw, FigureView):
        fw.show(fig)
        return
    with fw.batch_update():
        same = len(fw.data) == len(fig.data) and all(a.type == b.type for a, b in zip(fw.data, fig.data))
        if same:
            for a, b in zip(fw.data, fig.data):
                a.update(b.to_plotly_json(), overwrite=True)
        else:
            handlers = [list(getattr(t, "_click_callbacks", [])) for t in fw.data]
            fw.data = ()
            fw.add_traces(list(fig.data))
            for t, cbs in zip(fw.data, handlers):
                for cb in cbs:
                    t.on_click(cb, append=True)
        fw.layout = fig.layout


def _error_box() -> W.HTML:
    return W.HTML()


def _show_error(box: W.HTML, err: Exception | None) -> None:
    box.value = "" if err is None else f'<div style="color:#b00020">⚠ {html.escape(str(err))}</div>'


class RoutingView(W.VBox):
    """Load heatmap (click a cell to drop/keep that expert), co-activation and domain maps with a layer slider."""

    def __init__(self, session: Session, on_plan=None):
        self.s, self.on_plan = session, on_plan
        st = session.stats
        self.heat = _fw(figures.load_heatmap(st, session.plan.drop_experts))
        self.heat.data[0].on_click(self._click)
        self.layer = W.IntSlider(0, 0, len(st.layers) - 1, description="MoE layer")
        self.coact = FigureView(figures.coactivation_heatmap(st, 0).update_layout(width=480))
        self.domain = FigureView(figures.domain_heatmap(st, 0).update_layout(width=480))  # side by side
        self.balance = FigureView(figures.balance_chart(st))
        self.err = _error_box()
        self.mode = W.ToggleButtons(options=["drop / keep", "pick for a merge group"], description="click")
        merge = W.Button(description="Merge picked")
        merge.on_click(lambda _: self._run(self.s.merge_pending))
        self.picked = W.HTML()
        # standalone (no PlanView beside it), the view says what the selection costs: the preview perplexity
        self.result = W.HTML() if on_plan is None else None
        self.layer.observe(lambda ch: self.show_layer(ch["new"]), names="value")
        self._show_result()
        super().__init__([W.HBox([self.mode, merge, self.picked]), self.heat, *([self.result] if self.result else []),
                          self.err, self.layer,
                          W.HBox([self.coact, self.domain]), self.balance])

    def show_layer(self, layer: int) -> None:
        for fw, fig in ((self.coact, figures.coactivation_heatmap(self.s.stats, layer)),
                        (self.domain, figures.domain_heatmap(self.s.stats, layer))):
            fig.update_layout(width=480)
            refresh(fw, fig)

    def _click(self, trace, points, state):
        for x, y in zip(points.xs, points.ys):
            self.toggle(int(y), int(x))

    def toggle(self, layer: int, expert: int) -> None:
        """What a click on cell (expert, layer) does: drop/keep it, or pick it for a merge group."""
        if self.mode.value == "pick for a merge group":
            layer_, members = self.s.pick_for_merge(layer, expert)
            self.picked.value = f"picked in layer {layer_}: {members}" if members else ""
            return
        self._run(lambda: self.s.toggle_expert(layer, expert))

    def _run(self, fn) -> None:
        try:
            fn()
            _show_error(self.err, None)
            self.picked.value = ""
        except Exception as err:  # noqa: BLE001 - shown in the widget
            _show_error(self.err, err)
        self.redraw()
        self._show_result()
        if self.on_plan:
            self.on_plan()

    def _show_result(self) -> None:
        if self.result is None:
            return
        s = self.s
        if s.plan.is_empty():
            self.result.value = (f"Nothing selected: perplexity {fmt_ppl(s.baseline().ppl)}. Click cells to drop "
                                 "experts and see what it costs.")
        else:
            self.result.value = preview_report(s.preview(), "html")

    def redraw(self) -> None:
        refresh(self.heat, figures.load_heatmap(self.s.stats, self.s.plan.drop_experts))


class TokenView(W.VBox):
    def __init__(self, session: Session, text: str = "To be, or not to be: def f(x): return x"):
        self.s = session
        self.text = W.Textarea(text, layout=W.Layout(width="100%", height="80px"))
        self.layer = W.IntSlider(0, 0, len(session.view) - 1, description="layer")
        self.out = W.HTML()
        self.err = _error_box()
        btn = W.Button(description="Show routing")
        btn.on_click(lambda _: self.show())
        self.layer.observe(lambda ch: self.show(), names="value")
        super().__init__([self.text, W.HBox([self.layer, btn]), self.err, self.out])
        self.show()

    def show(self) -> None:
        try:
            r = self.s.routes(self.text.value)
            self.out.value = figures.token_strip_html(r, self.layer.value)
            _show_error(self.err, None)
        except Exception as err:  # noqa: BLE001
            _show_error(self.err, err)


class SaliencyView(W.VBox):
    def __init__(self, session: Session):
        self.s = session
        self.crits = W.SelectMultiple(options=list(CRITERIA), value=("frequency", "gate-mass", "reap"),
                                      description="criteria", rows=6)
        self.layer = W.IntSlider(0, 0, len(session.view) - 1, description="MoE layer")
        self.sim = W.Dropdown(options=list(SIMILARITIES), value="router-logits", description="similarity")
        self.stability = W.HTML()
        self.bars = FigureView(self._bars())
        self.simfig = FigureView(figures.similarity_figure(session.similarity(0, "router-logits"), "similarity"))
        self.importance = FigureView(figures.importance_chart(session.stats))
        for w in (self.crits, self.layer, self.sim):
            w.observe(lambda ch: self.update(), names="value")
        super().__init__([W.HBox([self.crits, W.VBox([self.layer, self.sim])]), self.bars, self.stability,
                          self.simfig, self.importance])

    def _bars(self):
        crits = list(self.crits.value)
        stab = self.s.stabilities(crits)
        self.stability.value = self.s.stability_text(crits, stab, html=True)
        return figures.saliency_bars({c: self.s.scores(c) for c in crits}, self.layer.value, stability=stab)

    def update(self) -> None:
        refresh(self.bars, self._bars())
        lay = self.layer.value
        refresh(self.simfig, figures.similarity_figure(self.s.similarity(lay, self.sim.value),
                                                        f"Expert similarity ({self.sim.value}), layer {lay}"))


class PlanView(W.VBox):
    """Presets, the plan as JSON, and the preview perplexity and size, updated on every change."""

    def __init__(self, session: Session):
        self.s = session
        self.preset = W.Dropdown(options=list(PRESETS),
                                 value="drop-experts", description="preset")
        self.amount = W.BoundedFloatText(0.25, min=0.05, max=0.95, step=0.05, description="amount")
        self.amount_help = W.HTML()
        self.crit = W.Dropdown(options=list(CRITERIA), value="reap", description="criterion")
        self.method = W.Dropdown(options=list(METHODS), description="method")
        self.preset.observe(lambda _: self.show_controls(), names="value")
        make = W.Button(description="Make plan", button_style="primary")
        clear = W.Button(description="Clear")
        self.json = W.Textarea(layout=W.Layout(width="100%", height="160px"))
        use = W.Button(description="Use JSON")
        self.result = W.HTML()
        self.err = _error_box()
        self.pareto = FigureView(figures.pareto_figure([]))
        self.pareto_x = W.ToggleButtons(options=[("parameters", "params"), ("bytes", "bytes"), ("decode time", "time")],
                                        value="params", description="size as")
        self.pareto_x.observe(lambda _: self.update(), names="value")
        speed = W.Button(description="Measure speed and memory", layout=W.Layout(width="auto"))
        self.speed_note = W.HTML()
        speed.on_click(lambda _: self.measure_speed())
        make.on_click(lambda _: self.make_plan())
        clear.on_click(lambda _: self._run(lambda: self.s.set_plan(Plan())))
        use.on_click(lambda _: self._run(lambda: self.s.set_plan(self.json.value)))
        self.listeners: list = []
        super().__init__([W.HBox([self.preset, self.amount, self.amount_help]), W.HBox([self.crit, self.method]),
                          W.HBox([make, clear]),
                          self.err, self.result, self.json, use, W.HBox([self.pareto_x, speed]), self.speed_note,
                          self.pareto])
        if self.s.model is not None:
            self.show_controls()
        self.update()

    def show_controls(self) -> None:
        """The chosen preset's own controls: its amount's range and meaning, its methods on this model, and only
        the shared controls it reads (``Session.preset_controls``, the same as the app's)."""
        c = self.s.preset_controls(self.preset.value)
        self.amount.min, self.amount.max = -1e9, 1e9  # widen first: min above the old max is refused by the widget
        self.amount.value = c["value"]
        self.amount.min, self.amount.max, self.amount.step = c["minimum"], c["maximum"], c["step"]
        self.amount_help.value = f"{html.escape(c['label'])} ({c['minimum']:g} to {c['maximum']:g})"
        self.crit.layout.display = None if "criterion" in c["uses"] else "none"
        self.method.layout.display = None if "method" in c["uses"] else "none"
        if c["methods"]:
            self.method.options, self.method.value = list(c["methods"]), c["methods"][0]

    def make_plan(self) -> None:
        """What the Make plan button does: the chosen preset's plan, previewed and added to the chart."""
        uses = self.s.preset_controls(self.preset.value)["uses"]
        self._run(lambda: self.s.preset(self.preset.value, self.amount.value, self.crit.value,
                                        self.method.value if "method" in uses else None))
        self.update()

    def measure_speed(self) -> None:
        """Prefill and decode speed and memory of every plan tried, against the original (``Session.measure_speed``)."""
        def run():
            done = self.s.measure_speed()
            note = figures.speed_note(done)
            self.speed_note.value = "<br>".join(html.escape(x) for x in note.split("\n"))
        self._run(run)

    def _run(self, fn) -> None:
        try:
            fn()
            _show_error(self.err, None)
        except Exception as err:  # noqa: BLE001
            _show_error(self.err, err)
        self.update()
        for f in self.listeners:
            f()

    def update(self) -> None:
        s = self.s
        self.json.value = s.plan.to_json()
        if s.plan.is_empty():
            self.result.value = f"Empty plan: perplexity {s.baseline().ppl:.3f}"
        else:
            self.result.value = preview_report(s.preview(), "html")
        refresh(self.pareto, figures.pareto_figure(s.comparable(), s.pareto_baseline(), self.pareto_x.value))


class DistillView(W.VBox):
    """Start/stop a distillation of the current plan; the charts update in place while it runs (in a thread)."""

    def __init__(self, session: Session):
        self.s = session
        d = DistillConfig()  # the library's defaults
        self.steps = W.IntText(d.steps, description="steps")
        self.lr = W.FloatText(d.lr, description="learning rate")
        self.every = W.IntText(d.eval_every, description="eval every")
        self.start_btn = W.Button(description="Start", button_style="success")
        self.stop_btn = W.Button(description="Stop", button_style="danger")
        self.status = W.HTML()
        self.fig = FigureView(figures.distill_figure([]))
        self.thread: threading.Thread | None = None
        self.start_btn.on_click(lambda _: self.start())
        self.stop_btn.on_click(lambda _: self.s.stop_distill())
        super().__init__([W.HBox([self.steps, self.lr, self.every]), W.HBox([self.start_btn, self.stop_btn]),
                          self.status, self.fig])

    def run(self) -> None:
        """Run in the calling thread (what ``start`` runs in the background)."""
        cfg = dataclasses.replace(DistillConfig(), steps=int(self.steps.value), lr=float(self.lr.value),
                                  eval_every=int(self.every.value))
        try:
            for e in self.s.distill(cfg):
                if e.kind != "step":
                    refresh(self.fig, figures.distill_figure(self.s.distiller.history, self.s.baseline().ppl))
                d = self.s.distiller
                self.status.value = (f"{e.kind} · step {e.step}/{d.config.steps} · {e.tokens_per_s:,.0f} tokens/s"
                                     f" · best perplexity {fmt_ppl(d.best_ppl)} (step {d.best_step})"
                                     + (f" · {html.escape(e.message)}" if e.message else ""))
        except Exception as err:  # noqa: BLE001
            self.status.value = f'<span style="color:#b00020">⚠ {html.escape(str(err))}</span>'

    def start(self) -> threading.Thread:
        if self.thread is not None and self.thread.is_alive():
            self.status.value = "already running"
            return self.thread
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self.thread


class WhyView(W.VBox):
    """Everything the statistics say about one expert, or one layer with what dropping it costs (``Session.why_*``,
    the same panel as the app's Saliency tab)."""

    def __init__(self, session: Session):
        self.s = session
        self.layer = W.BoundedIntText(0, min=0, max=max(len(session.view) - 1, 0) if session.view else 0,
                                      description="MoE layer")
        self.expert = W.BoundedIntText(0, min=0, max=max(session.view.num_experts) - 1 if session.view else 0,
                                       description="expert")
        b1, b2 = W.Button(description="Why this expert"), W.Button(description="Why this layer")
        self.out, self.err = W.HTML(), _error_box()
        b1.on_click(lambda _: self.explain_expert())
        b2.on_click(lambda _: self.explain_layer())
        super().__init__([W.HBox([self.layer, self.expert, b1, b2]), self.err, self.out])

    def explain_expert(self) -> None:
        from .report import why_expert

        try:
            self.out.value = why_expert(self.s.why_expert(self.layer.value, self.expert.value), "html")
            _show_error(self.err, None)
        except Exception as err:  # noqa: BLE001
            _show_error(self.err, err)

    def explain_layer(self) -> None:
        from .report import why_layer

        try:
            self.out.value = why_layer(self.s.why_layer(self.layer.value), "html")
            _show_error(self.err, None)
        except Exception as err:  # noqa: BLE001
            _show_error(self.err, err)


class SweepView(W.VBox):
    """A sweep in one click: drop by each criterion, merge, slim and quantise at several amounts, each previewed;
    perplexity against size with error bars (``Session.sweep``, the same grid as the app and ``explorer sweep``)."""

    def __init__(self, session: Session):
        from .sweep import OPERATIONS

        self.s = session
        self.ops = W.SelectMultiple(options=list(OPERATIONS), value=list(OPERATIONS), description="operations",
                                    rows=len(OPERATIONS))
        self.x = W.ToggleButtons(options=[("parameters", "params"), ("bytes", "bytes")], value="params",
                                 description="size as")
        run = W.Button(description="Run sweep", button_style="primary")
        self.status = W.HTML()
        self.err = _error_box()
        self.fig = FigureView(figures.sweep_figure([]))
        run.on_click(lambda _: self.run())
        self.x.observe(lambda _: self.redraw(), names="value")
        super().__init__([W.HBox([self.ops, W.VBox([self.x, run])]), self.status, self.err, self.fig])

    def run(self) -> None:
        try:
            def say(i, n, plan):
                self.status.value = f"sweep: point {i + 1} of {n}: {html.escape(plan)}"
            pts = self.s.sweep(list(self.ops.value), progress=say)
            self.status.value = f"{len(pts) - 1} plans previewed, each with one standard error"
            self.redraw()
            _show_error(self.err, None)
        except Exception as err:  # noqa: BLE001
            _show_error(self.err, err)

    def redraw(self) -> None:
        refresh(self.fig, figures.sweep_figure(getattr(self.s, "last_sweep", None) or [], x=self.x.value))


class GenerateView(W.VBox):
    """What the cut model says: greedy continuations of the original and of the current plan, side by side."""

    def __init__(self, session: Session):
        from .tasks import DEMO_PROMPTS

        self.s = session
        self.prompts = W.Textarea("\n".join(x.replace("\n", "\\n") for x in DEMO_PROMPTS),
                                  description="prompts", layout=W.Layout(width="100%", height="90px"))
        self.tokens = W.IntSlider(32, min=4, max=128, step=4, description="new tokens")
        go_btn = W.Button(description="Generate both", button_style="primary")
        self.out = W.HTML()
        self.err = _error_box()
        go_btn.on_click(lambda _: self.run())
        super().__init__([self.prompts, W.HBox([self.tokens, go_btn]), self.err, self.out])

    def run(self) -> None:
        try:
            self.out.value = figures.side_by_side_html(self.s.side_by_side(self.prompts.value, self.tokens.value))
            _show_error(self.err, None)
        except Exception as err:  # noqa: BLE001
            _show_error(self.err, err)


class Explorer(W.Tab):
    """Every view in tabs, sharing one session."""

    def __init__(self, session: Session):
        self.session = session
        self.plan = PlanView(session)
        self.routing = RoutingView(session, on_plan=self.plan.update)  # the Plan tab shows what a click costs
        self.tokens = TokenView(session)
        self.saliency = SaliencyView(session)
        self.distill = DistillView(session)
        self.generate = GenerateView(session)
        self.sweep = SweepView(session)
        self.why = WhyView(session)
        self.plan.listeners.append(self.routing.redraw)
        super().__init__(children=[self.routing, self.tokens, self.saliency, self.plan, self.distill, self.generate,
                                   self.sweep, self.why])
        for i, t in enumerate(["Routing", "Tokens", "Saliency", "Plan", "Distill", "Generate", "Sweep", "Why"]):
            self.set_title(i, t)


def explore(model_or_session=None, tokenizer=None, data: str = "demo", max_tokens: int = 4096) -> Explorer:
    """One line in a notebook: ``explore()`` (demo model), ``explore("path/or/hub-id")``, or ``explore(session)``."""
    if isinstance(model_or_session, Session):
        s = model_or_session
    else:
        s = Session(max_tokens=max_tokens)
        if model_or_session is None or isinstance(model_or_session, str):
            s.data_source = data
            s.load(model_or_session)
        else:
            from .moe import MoEModel

            s.model, s.tok, s.view = model_or_session.eval(), tokenizer, MoEModel(model_or_session)
            s.source = getattr(model_or_session.config, "_name_or_path", "in-memory model")
            s.set_data(data)
    if s.stats is None:
        s.collect()
    return Explorer(s)
