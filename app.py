"""MoE Compression Explorer: the Gradio app. It arranges controls; ``explorer`` computes.

    python app.py                      # the bundled demo model on http://127.0.0.1:7860
    python app.py --model PATH_OR_HUB_ID --host 0.0.0.0 --port 8000 --share
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from types import SimpleNamespace
import functools
import html
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from explorer import figures
from explorer.distill import KL_KINDS, TRAINABLE, DistillConfig, recovered
from explorer.errors import ExplorerError
from explorer.perplexity import fmt_ppl, fmt_ppl_se
from explorer.plan import Plan
from explorer.report import preview_report
from explorer.saliency import CRITERIA, SIMILARITIES
from explorer.session import METHODS, PRESETS, TABLE_SORTS, TABLE_VIEWS, Session, SessionError
from explorer.tasks import DEMO_PROMPTS

USER_ERRORS = (ExplorerError, ValueError, FileNotFoundError,
               KeyError, FloatingPointError)
DEFAULT_MODEL = "demo"
DEFAULTS = DistillConfig()  # the Distill tab's defaults are the library's
# a session lives in the page: reloading or closing it loses the plans tried, so the browser asks first
# a clicked table cell shows its plan colour at once (red = dropped), not the selection's white
CSS = '.body-cell[aria-selected="true"] * { background: transparent !important; }'
LEAVE_WARNING = ("<script>window.addEventListener('beforeunload', (e) => { e.preventDefault(); e.returnValue = ''; });"
                 "</script>")


def friendly(fn):
    """Show problems as a message in the page, never a traceback; the session stays usable."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as err:
            raise gr.Error(str(err).strip("'\""), duration=12) from None
        except Exception as err:  # noqa: BLE001 - anything else is still reported, not dumped
            raise gr.Error(f"{type(err).__name__}: {err}", duration=12) from None
    return wrapper


def friendly_gen(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as err:
            raise gr.Error(str(err).strip("'\""), duration=12) from None
        except Exception as err:  # noqa: BLE001
            raise gr.Error(f"{type(err).__name__}: {err}", duration=12) from None
    return wrapper


SPREAD = "spread over GPUs, CPU and disk"
DEVICES = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else []) + [SPREAD]
OUT_ROOT = Path(os.environ.get("MOE_EXPLORER_OUT") or Path(tempfile.gettempdir()) / "moe-explorer")


# Who may name server paths: in a private app (loopback, no --share) the person at the page owns the machine; in a
# shared one every field comes from a stranger (see Session.allowed). Set by build() from main()'s flags.
POLICY = {"untrusted": False, "allow_paths": []}
SHARED_UPLOAD_MB = 64  # a shared app's largest upload: text for statistics, a plan; a model comes by hub id


def _sess(s: Session | None) -> Session:
    """This browser session's state; its files live under a folder of its own that no other session can name."""
    return s if s is not None else Session(out_root=OUT_ROOT / uuid.uuid4().hex, untrusted=POLICY["untrusted"],
                                           allow_paths=POLICY["allow_paths"], deny_paths=_stranger_folders())


def _stranger_folders() -> list[Path]:
    """Where strangers' files land (gradio's uploads, the sessions' folders): never read as task files."""
    return [Path(gr.utils.get_upload_folder()), OUT_ROOT]


def _forget(s: Session | None) -> None:
    """A session is gone: stop its job and remove the files only it could download."""
    if s is None:
        return
    with contextlib.suppress(Exception):
        s.stop_distill()
    for kind in ("plan", "uploads", "archive"):
        if s.out_root is not None:
            shutil.rmtree(s.out_root / f".{kind}", ignore_errors=True)


def user_message(err: Exception) -> str:
    """An error as one line of Markdown, safe to show (a parser's ``<stream end>`` is text, not a tag)."""
    text = str(err).strip("'\"") if isinstance(err, USER_ERRORS) else f"{type(err).__name__}: {err}"
    return f"⚠️ {html.escape(text)}"


def plan_guard(fn):
    """Plan-tab handlers (they return {view name: value}): a problem becomes the message; every other component
    keeps its value, the user's JSON text included, and stays usable."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - reported in the page
            return {"msg": user_message(err)}
    return wrapper


def bind(fn, views: dict):
    """(handler, outputs) for Gradio: ``fn`` returns {view name: value}, Gradio gets {component: value} for the
    views this wiring shows (a component the handler does not name keeps its value). No tuple is counted by hand."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        return {views[k]: v for k, v in fn(*args, **kwargs).items() if k in views}
    return run, list(views.values())


# ---- views of the session (pure: session -> component values) ----------------------------------------------
def summary_md(s: Session) -> str:
    if not s.loaded:
        return "No model loaded."
    m = s.summary()
    lines = [f"**{m['architecture']}** (`{m['model_type']}`) from `{m['source']}` on {m['device']} ({m['dtype']})",
             f"{m['moe_layers']} MoE layers of {m['decoder_layers']} · experts per layer {m['experts'][0]}"
             f"{'' if len(set(m['experts'])) == 1 else ' (varies)'} · top-{m['top_k']} · gating `{m['gating']}`"
             f" · shared experts: {'yes' if m['shared_experts'] else 'no'}",
             f"{m['params_total']:,} parameters, {m['params_active']:,} active per token"]
    if m.get("dequantised"):
        lines.append(f"Weights: {m['dequantised']}; exports are written dequantised ({m['dtype']})")
    if s.data is not None:
        d = s.data
        lines.append(f"Data `{s.data_source}`: domains {', '.join(d.eval.domains)} · calibration {d.calib.tokens:,}"
                     f" tokens · evaluation {d.eval.tokens:,} tokens (blocks of {d.eval.block_len})")
    if s.base is not None:
        lines.append(f"Perplexity (evaluation): **{fmt_ppl_se(s.base.ppl, s.base.se)}**, {s.base.bpb:.3f} bits/byte")
        if s.untrained_note():
            lines.append(f"⚠️ **{s.untrained_note()}.**")
    return "\n\n".join(lines)


def load_table(s: Session):
    """The load heatmap as a clickable table (click a cell to drop / keep that expert): every layer, one cell per
    expert; or, on models with more experts than a row can show, one layer, a row per expert in a chosen order."""
    if s.stats is None:
        return pd.DataFrame()
    if s.one_layer_table():
        df = pd.DataFrame(s.expert_rows())
        colour = {"dropped": "#ff8a80", "picked": "#ffe082", "kept": ""}

        def row_style(row):
            bg = colour.get(row["plan"], "#a5d6a7")
            return [f"background-color:{bg}" if bg else ""] * len(row)

        return df.style.apply(row_style, axis=1).format({"load (x uniform)": "{:.2f}", "REAP": "{:.4g}",
                                                          "tokens": "{:,}"})
    m = s.stats.load_vs_uniform()
    df = pd.DataFrame(m.round(2), columns=[f"e{e}" for e in range(m.shape[1])])
    df.insert(0, "layer", [f"L{i}" for i in range(m.shape[0])])
    drops = s.plan.drop_experts
    merged = {(i, e) for i, gs in s.plan.merge.items() for g in gs for e in g}
    picked = {(s.pending[0], e) for e in s.pending[1]} if s.pending else set()

    def style(row):
        i = int(row["layer"][1:])
        out = [""]
        for e in range(m.shape[1]):
            v = m[i, e]
            shade = int(255 - min(1.0, v / 2.5) * 160)
            bg = (f"rgb({shade},{shade},255)" if (i, e) not in merged else "#a5d6a7")
            bg = "#ff8a80" if e in drops.get(i, []) else "#ffe082" if (i, e) in picked else bg
            out.append(f"background-color:{bg}")
        return out

    return df.style.apply(style, axis=1).format({c: "{:.2f}" for c in df.columns[1:]})


def plan_md(s: Session, res: dict | None) -> str:
    if not s.loaded:
        return ""
    if s.plan.is_empty():
        base = s.baseline()
        return f"Empty plan. Original perplexity **{base.ppl:.3f}** on {base.tokens:,} tokens."
    mark = "✅" if res["loadable_by_transformers"] else "ℹ️"
    return "### " + preview_report(res, "markdown").replace("preview perplexity", "Preview perplexity", 1) \
        .replace("experts per MoE layer", f"{mark} experts per MoE layer", 1)


COMPARE_COLUMNS = ["plan", "parameters", "active/token", "size (MiB)", "perplexity", "± (1 s.e.)", "vs original",
                   "speed: prefill · decode (x orig)", "memory (x orig)", "loads in", "measured on"]


def tried_table(s: Session) -> pd.DataFrame:
    """One row per plan tried; one column per scored task (accuracy in %, the original's in the header)."""
    tasks = s.task_names() if s.loaded else []
    base_se = {t: v["stderr"] for t, v in (s.base_scores or {}).items()} if s.loaded else {}
    task_cols = [f"{t} (orig {100 * s.base_tasks[t]:.1f} ± {100 * base_se.get(t, float('nan')):.1f})" for t in tasks]
    cols = COMPARE_COLUMNS[:-1] + [c for tc, t in zip(task_cols, tasks) for c in (tc, f"{t} ± (1 s.e.)")] + \
        COMPARE_COLUMNS[-1:]
    rows = []
    for e in s.compared():
        row = {"plan": e["name"], "parameters": f"{e['params']:,}", "active/token": f"{e['active']:,}",
               "size (MiB)": round(e.get("bytes", 2 * e["params"]) / 2**20, 2), "perplexity": round(e["ppl"], 3),
               "± (1 s.e.)": None if e.get("ppl_se") is None else round(e["ppl_se"], 3),
               "vs original": e.get("change", ""), **figures.speed_cells(e.get("speed")),
               "loads in": e.get("serves", ""),
               "measured on": "earlier text: stale, re-measure" if e["stale"] else "current text"}
        for t, c in zip(tasks, task_cols):
            v, se = (e.get("tasks") or {}).get(t), (e.get("tasks_se") or {}).get(t)
            row[c] = None if v is None else round(100 * v, 1)
            row[f"{t} ± (1 s.e.)"] = None if se is None else round(100 * se, 1)
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def pareto(s: Session):
    """Only plans measured on the same tokens as the original's perplexity are compared."""
    base = s.pareto_baseline() if s.loaded else None
    y = s.pareto_y if s.loaded and (s.pareto_y == "ppl" or s.pareto_y[5:] in s.task_names()) else "ppl"
    return figures.pareto_figure(s.comparable() if s.loaded else [], base, s.pareto_x, y)


def pareto_y_choices(s: Session):
    choices = [("perplexity", "ppl")] + [(f"{t} accuracy", f"task:{t}") for t in (s.task_names() if s.loaded else [])]
    value = s.pareto_y if s.loaded and s.pareto_y in [c[1] for c in choices] else "ppl"
    return gr.update(choices=choices, value=value)


def plan_file(s: Session) -> str | None:
    """The current plan as a file for the download button (one file per plan content, so never a stale one)."""
    if not s.loaded:
        return None
    return s.plan_file(s.private_dir("plan"))  # under the session's own folder, never a shared one


# ---- layout: one builder per tab, each returns its components ------------------------------------------------
def model_tab(default_model: str) -> SimpleNamespace:
    with gr.Tab("Model", id="model"):
        with gr.Row():
            src = gr.Textbox(value=default_model, label="Model: 'demo', a local folder or a hub id", scale=3)
            device = gr.Dropdown(DEVICES, value="auto", label="device", scale=1)
            dtype = gr.Dropdown(["auto", "float32", "bf16", "fp16"], value="auto", scale=1,
                                label="dtype (auto: the checkpoint's own; float32 for the demo)")
        with gr.Row():
            data_src = gr.Dropdown(["demo"], value="demo", allow_custom_value=True, scale=3,
                                   label="Calibration/evaluation text: 'demo' (4 domains) or a .txt path")
            upload = gr.File(label="…or upload .txt files (one domain each)", file_count="multiple",
                             file_types=[".txt"], scale=2)
            max_tok = gr.Number(value=2048, precision=0, label="tokens per domain and split", scale=1)
        with gr.Row():
            load_btn = gr.Button("Load model", variant="primary")
            stats_btn = gr.Button("Collect statistics")
        summary = gr.Markdown(loading_words(default_model))
    return SimpleNamespace(**locals())


def routing_tab() -> SimpleNamespace:
    with gr.Tab("Routing", id="routing") as tab:
        heat = gr.Plot(label="load heatmap")
        layer = gr.Slider(0, 3, value=0, step=1, label="MoE layer")
        with gr.Row():
            coact = gr.Plot(label="co-activation")
            domain = gr.Plot(label="domain specialisation")
        balance = gr.Plot(label="entropy and balance")
        vocab = gr.Plot(label="vocabulary specialisation")
        with gr.Row():
            text = gr.Textbox(value="def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + "
                              "fibonacci(n - 2)\n\nTo be, or not to be, that is the question.",
                              lines=4, label="Type a text to see each token's expert", scale=3)
            strip_layer = gr.Slider(0, 3, value=0, step=1, label="layer for the token colours", scale=1)
        route_btn = gr.Button("Show routing")
        strip = gr.HTML()
    return SimpleNamespace(**locals())


def saliency_tab() -> SimpleNamespace:
    with gr.Tab("Saliency", id="saliency"):
        with gr.Row():
            crits = gr.CheckboxGroup(list(CRITERIA), value=["frequency", "gate-mass", "reap"],
                                     label="criteria (reconstruction and ablation run the model)", scale=3)
            layer = gr.Slider(0, 3, value=0, step=1, label="MoE layer", scale=1)
        with gr.Row():
            btn = gr.Button("Score experts", scale=3)
            model_halves = gr.Checkbox(False, label="rank stability of reconstruction and ablation too (runs them "
                                              "on each calibration half)", scale=2)
        bars = gr.Plot(label="expert scores by criterion")
        stability = gr.Markdown(elem_id="rank-stability")
        with gr.Row():
            sim_kind = gr.Dropdown(list(SIMILARITIES), value="router-logits", label="expert similarity")
        sim = gr.Plot(label="similarity and dendrogram (merge candidates)")
        importance = gr.Plot(label="layer and block importance")
        with gr.Accordion("Why: one expert or one layer, everything the statistics say about it", open=False):
            with gr.Row():
                why_layer = gr.Number(value=0, precision=0, minimum=0, label="MoE layer", scale=1)
                why_expert = gr.Number(value=0, precision=0, minimum=0, label="expert", scale=1)
                why_btn = gr.Button("Why this expert", scale=1)
                why_layer_btn = gr.Button("Why this layer (previews dropping it)", scale=1)
            why_md = gr.Markdown(elem_id="why")
    return SimpleNamespace(**locals())


def plan_tab() -> SimpleNamespace:
    with gr.Tab("Plan", id="plan"):
        gr.Markdown("Click a cell to drop or keep that expert (red = dropped), or switch the click to pick a merge "
                    "group (yellow = picked, green = merged); or write a plan with a preset. Every change updates "
                    "the preview at once.")
        with gr.Row():
            click_mode = gr.Radio(["drop / keep", "pick for a merge group"], value="drop / keep",
                                  label="a click on a cell does", scale=2)
            merge_btn = gr.Button("Merge the picked experts", scale=1)
            picked = gr.Markdown(scale=2)
        with gr.Row():
            table_view = gr.Radio(list(TABLE_VIEWS), value="auto", scale=2, label="table: every layer (a cell per "
                                  "expert) or one layer (a row per expert); auto: one layer beyond 32 experts")
            table_layer = gr.Number(value=0, precision=0, minimum=0, scale=1, label="MoE layer (one layer)")
            table_sort = gr.Dropdown(list(TABLE_SORTS), value="expert id", scale=1, label="order (one layer)")
        table = gr.Dataframe(interactive=False, label="expert load (x uniform): click a cell", max_height=600)
        with gr.Row():
            preset = gr.Dropdown(list(PRESETS), value="drop-experts", label="preset")
            amount = gr.Number(value=0.25, label="share of experts to drop (0.05 to 0.95)")
            crit = gr.Dropdown(list(CRITERIA), value="reap", label="criterion")
            method = gr.Dropdown(list(METHODS), value=METHODS[0],
                                 label="method (merge / prune / quantise)")
            mode = gr.Dropdown(["uniform", "global"], value="uniform", label="per layer")
            protect = gr.Checkbox(label="protect super experts")
        with gr.Row():
            preset_btn = gr.Button("Make plan", variant="primary")
            clear_btn = gr.Button("Clear plan")
        with gr.Row():
            depth_layers = gr.CheckboxGroup([], label="drop MoE sub-layers (Layer Drop)")
            depth_blocks = gr.CheckboxGroup([], label="drop decoder blocks (Block Drop)")
            slim_keep = gr.Slider(0.1, 1.0, value=1.0, step=0.05,
                                  label="keep this fraction of every expert's neurons (1 = no slimming)")
        msg = gr.Markdown()
        preview = gr.Markdown()
        plan_json = gr.Code(language="json", label="plan (editable)", interactive=True)
        with gr.Row():
            json_btn = gr.Button("Use edited JSON")
            download = gr.DownloadButton("Download plan.json")
            upload = gr.UploadButton("Upload a plan", file_types=[".json", ".yaml", ".yml"])
        with gr.Accordion("Task accuracy of this plan (lm-evaluation-harness; minutes)", open=False):
            with gr.Row():
                plan_tasks = gr.Textbox(value="demo", scale=3, label="tasks: `demo`, lm-eval names, or a folder")
                plan_task_limit = gr.Number(value=200, precision=0, minimum=0, scale=1, label="items per task (0: all)")
                plan_tasks_btn = gr.Button("Score the original and this plan", scale=1)
            plan_tasks_out = gr.Markdown()
        with gr.Accordion("What does the cut model say? Greedy continuations, original beside preview", open=False):
            with gr.Row():
                gen_prompts = gr.Textbox("\n".join(x.replace("\n", "\\n") for x in DEMO_PROMPTS), lines=4, scale=3,
                                         label="prompts, one per line (write \\n for a line break inside one)")
                gen_tokens = gr.Slider(4, 128, value=32, step=4, scale=1, label="new tokens")
                gen_btn = gr.Button("Generate both", scale=1)
            gen_out = gr.HTML()
    return SimpleNamespace(**locals())


def distill_tab() -> SimpleNamespace:
    with gr.Tab("Distill", id="distill"):
        with gr.Row():
            steps = gr.Number(value=DEFAULTS.steps, precision=0, label="steps")
            lr = gr.Number(value=DEFAULTS.lr, label="learning rate")
            temp = gr.Number(value=DEFAULTS.temperature, label="temperature")
            kl = gr.Dropdown(list(KL_KINDS), value=DEFAULTS.kl, label="KL")
            train_what = gr.Dropdown(list(TRAINABLE), value=DEFAULTS.train, label="train")
            every = gr.Number(value=DEFAULTS.eval_every, precision=0, label="evaluate every")
        with gr.Row():
            start_btn = gr.Button("Start distillation", variant="primary")
            stop_btn = gr.Button("Stop", variant="stop")
        status = gr.Markdown()
        chart = gr.Plot(label="distillation: loss and held-out perplexity")
    return SimpleNamespace(**locals())


def compare_tab() -> SimpleNamespace:
    with gr.Tab("Compare & export", id="export") as tab:
        tried = gr.Dataframe(label="plans tried this session: click a row to make it the plan again", interactive=False)
        with gr.Row():
            remove_btn = gr.Button("Remove the plan in force (click its row) from Compare", scale=2)
            clear_tried_btn = gr.Button("Clear Compare", scale=1)
        with gr.Row():
            remeasure_btn = gr.Button("Re-measure stale plans on the current text", scale=3)
            pareto_x = gr.Radio([("parameters", "params"), ("bytes", "bytes"), ("decode time", "time")],
                                value="params", scale=1, label="Pareto chart and sweep: size as")
            pareto_y = gr.Dropdown([("perplexity", "ppl")], value="ppl", scale=1, label="Pareto chart: quality as")
        with gr.Accordion("Task accuracy (lm-evaluation-harness; minutes, so off until asked)", open=False):
            with gr.Row():
                tasks = gr.Textbox(value="demo", scale=3, label="tasks: `demo` (offline), lm-eval names "
                                   "(arc_easy,hellaswag: need the hub), or a folder of task YAMLs")
                task_limit = gr.Number(value=200, precision=0, minimum=0, scale=1,
                                       label="items per task (0: all)")
                tasks_btn = gr.Button("Score tasks: original and every plan", scale=1)
        with gr.Row():
            speed_btn = gr.Button("Measure speed and memory: original and every plan (seconds each)", scale=3)
            speed_md = gr.Markdown(elem_id="speed-note")
        pareto = gr.Plot(label="size against perplexity")
        with gr.Accordion("Sweep: perplexity against size for every criterion and amount, in one click", open=False):
            with gr.Row():
                sweep_ops = gr.CheckboxGroup(["drop", "merge", "slim", "quantise"],
                                             value=["drop", "merge", "slim", "quantise"], scale=3,
                                             label="operations (drop by reap, frequency and random at 12-50%; merge "
                                                   "and slim at matching sizes; quantise to 8, 4, 3, 2 bits)")
                sweep_btn = gr.Button("Run sweep", scale=1)
            sweep_plot = gr.Plot(label="sweep: perplexity against size, ± one standard error")
            sweep_file = gr.File(label="the grid as CSV")
        with gr.Row():
            out_dir = gr.Textbox(value="compressed", scale=3,
                                 label="export folder (a relative name goes under this session's own output folder)")
            overwrite = gr.Checkbox(label="replace a previous export there", scale=1)
        form = gr.Radio([("per layer: transformers and lm-eval load it (trust_remote_code)", "per-layer"),
                         ("padded: a stock model vLLM, SGLang and llama.cpp load (selection-bias routers)",
                          "padded")], value="per-layer",
                        label="export form of a plan with different expert counts or widths per layer")
        engines = gr.Markdown(elem_id="engine-line")
        with gr.Row():
            export_btn = gr.Button("Export to folder", variant="primary")
            zip_btn = gr.Button("Export as download")
        with gr.Row():
            save_btn = gr.Button("Save this session to a file", scale=1)
            open_btn = gr.UploadButton("Open a saved session", file_types=[".zip"], scale=1)
        msg = gr.Markdown()
        file = gr.File(label="download")
    return SimpleNamespace(**locals())


# ---- handlers (module level: session in, component values out) -----------------------------------------------
def plan_outputs(s: Session, measure: bool = True) -> dict:
    """Every Plan-tab view of the session by name (``plan_views`` says which component shows each). ``measure=False``
    is what a click shows at once (table, heatmap, JSON): the preview and what depends on it are left for
    ``on_refresh``."""
    p = s.plan
    out = {"state": s, "msg": s.kept_note(), "plan_json": p.to_json(), "table": load_table(s),
           "heat": figures.load_heatmap(s.stats, p.drop_experts) if s.stats else None, "download": plan_file(s)}
    if not measure:
        if not p.is_empty():
            out["preview"] = "⏳ measuring the preview…"
        return out
    out.update(preview=plan_md(s, None if p.is_empty() else s.preview()), tried=tried_table(s), pareto=pareto(s),
               depth_layers=gr.update(choices=[(f"L{i}", i) for i in range(len(s.view))], value=list(p.drop_layers)),
               depth_blocks=gr.update(choices=[(f"B{i}", i) for i in range(len(s.view.decoder_layers))],
                                      value=list(p.drop_blocks)),
               slim_keep=gr.update(value=1.0 if p.slim is None else p.slim))
    return out


def picked_text(s: Session) -> str:
    if not s.pending or not s.pending[1]:
        return ""
    return f"Picked in layer {s.pending[0]}: experts {', '.join(map(str, s.pending[1]))}"


def loading_words(source: str | None) -> str:
    """What the summary says while a model loads: the model asked for, not always the demo."""
    name = (source or "").strip()
    return "Loading the demo model…" if name in ("", "demo") else f"Loading `{name}`…"


def on_loading(source):
    """The moment Load is pressed: say which model is loading and take the previous model's charts off the screen."""
    return (loading_words(source),) + (None,) * len(LOADING_CLEARS)


LOADING_CLEARS = ("heat", "coact", "domain", "balance", "vocab", "importance", "pareto")  # charts of one model


@friendly
def on_load(s, source, device, dtype, data_source, files, max_tokens, progress=gr.Progress()):
    s = _sess(s)
    progress(0.1, desc="loading model")
    s.load(source, None if device in ("auto", SPREAD) else device, dtype,
           device_map="auto" if device == SPREAD else None)
    s, text = on_data(s, data_source, files, max_tokens)
    return s, (f"{s.load_note}\n\n{text}" if s.load_note else text)


@friendly
def on_data(s, data_source, files, max_tokens):
    s = _sess(s)
    s.require()
    source = data_source or "demo"
    uploaded = bool(files)
    if files:
        folder = s.private_dir("uploads")
        for i, f in enumerate(files):  # the uploaded names are never used as paths: one domain per file, numbered
            shutil.copy(getattr(f, "name", f), folder / f"domain-{i + 1}.txt")
            with contextlib.suppress(OSError):
                os.remove(getattr(f, "name", f))  # gradio's own copy of the upload
        source = str(folder)
    s.max_tokens = int(max_tokens) if max_tokens else None
    s.set_data(source, uploaded=uploaded)
    return s, summary_md(s) + "\n\nCollecting router statistics…"


@friendly
def on_stats(s, progress=gr.Progress()):
    s = _sess(s)
    s.require()
    s.collect(progress=lambda d, t: progress(d / t, desc="collecting router statistics"))
    st = s.stats
    slider = gr.update(maximum=max(0, len(s.view) - 1), value=0)
    return {**plan_outputs(s), "summary": summary_md(s), "coact": figures.coactivation_heatmap(st, 0),
            "domain": figures.domain_heatmap(st, 0), "balance": figures.balance_chart(st),
            "vocab": figures.vocab_figure(s.vocab(), s.tok, 0), "layer": slider, "sa_layer": slider,
            "strip_layer": slider, "importance": figures.importance_chart(st)}


@friendly
def on_layer(s, layer):
    s = _sess(s)
    s.require(stats=True)
    lay = int(layer)
    return (figures.coactivation_heatmap(s.stats, lay), figures.domain_heatmap(s.stats, lay),
            figures.vocab_figure(s.vocab(), s.tok, lay))


@friendly
def on_route(s, text, layer):
    r = _sess(s).routes(text)
    return figures.token_strip_html(r, min(int(layer), len(r["routes"]) - 1))


@friendly
def on_saliency(s, criteria, layer, kind, model_halves=False, progress=gr.Progress()):
    s = _sess(s)
    s.require(stats=True)
    if not criteria:
        raise SessionError("choose at least one criterion")
    sc = {c: s.scores(c, progress=lambda d, t: progress(d / t, desc=f"scoring by {c}")) for c in criteria}
    lay = int(layer)
    progress(1.0, desc="ranking on each calibration half")
    stab = s.stabilities(criteria, model_running=bool(model_halves))
    return (figures.saliency_bars(sc, lay, stability=stab), s.stability_text(criteria, stab),
            figures.similarity_figure(s.similarity(lay, kind), f"Expert similarity ({kind}), layer {lay}"),
            figures.importance_chart(s.stats))


@plan_guard
def on_depth(s, layers, blocks, keep):
    s = _sess(s)
    s.set_depth(layers or [], blocks or [], keep)
    return plan_outputs(s)


@plan_guard
def on_cell(s, click_mode, evt: gr.SelectData):
    s = _sess(s)
    s.require(stats=True)
    row, col = evt.index
    if s.one_layer_table():  # a row per expert of one layer: any cell of the row is that expert
        layer, expert = s.table_layer, int(evt.row_value[0])
    elif col == 0:
        return {**plan_outputs(s), "picked": picked_text(s)}
    else:
        layer, expert = int(row), int(col) - 1
    if click_mode == "pick for a merge group":
        s.pick_for_merge(layer, expert)
        return {"state": s, "msg": "", "table": load_table(s), "picked": picked_text(s)}
    s.toggle_expert(layer, expert)
    return {**plan_outputs(s, measure=False), "picked": picked_text(s)}  # red now; on_refresh measures the preview


@friendly
def on_table(s, view, layer, sort):
    s = _sess(s)
    s.set_table(view, None if layer is None else int(layer), sort)
    return load_table(s), ""


PREVIEW_VIEWS = ("preview", "tried", "pareto")  # what a click's preview writes (the Plan tab's controls are not)


@plan_guard
def on_refresh(s):
    """After a click: the preview, the Compare rows and the chart; the click's own message stays."""
    s = _sess(s)
    s.require()
    out = plan_outputs(s)
    del out["msg"]
    return out


@plan_guard
def on_merge(s):
    s = _sess(s)
    s.merge_pending()
    return {**plan_outputs(s), "picked": picked_text(s)}


@plan_guard
def on_preset(s, kind, amount, criterion, method, mode, protect, progress=gr.Progress()):
    s = _sess(s)
    progress(0.2, desc="writing the plan")
    before = s.plan
    uses = s.preset_controls(kind)["uses"]  # a hidden control's value is not the user's choice
    s.preset(kind, amount, criterion if "criterion" in uses else "reap", method if "method" in uses else None,
             mode if "mode" in uses else "uniform", bool(protect) and "protect_super" in uses)
    out = plan_outputs(s)
    if not before.is_empty():
        out["msg"] = (f"ℹ️ The preset replaced your earlier plan ({html.escape(before.describe())}); it is still in "
                      "Compare: pick its row there to bring it back. " + out["msg"])
    return out


@friendly
def on_why_expert(s, layer, expert):
    from explorer.report import why_expert

    s = _sess(s)
    return why_expert(s.why_expert(int(layer or 0), int(expert or 0)), "markdown")


@friendly
def on_why_layer(s, layer, progress=gr.Progress()):
    from explorer.report import why_layer

    s = _sess(s)
    progress(0.3, desc="previewing the layer dropped")
    return why_layer(s.why_layer(int(layer or 0)), "markdown")


def on_preset_kind(s, kind):
    """The chosen preset's own controls: its amount's meaning, range and default on this model, its methods, and
    only the shared controls it reads."""
    if s is None or not s.loaded:
        return (gr.update(),) * 5
    c = s.preset_controls(kind)
    shown = lambda k: gr.update(visible=k in c["uses"])  # noqa: E731
    method = gr.update(visible="method" in c["uses"], choices=list(c["methods"]) or None,
                       value=c["methods"][0] if c["methods"] else None)
    # the range is said, and refused in words outside it (a Number's own bounds are checked against its first
    # settings on the server, which are the drop preset's)
    amount = gr.update(label=f"{c['label']} ({c['minimum']:g} to {c['maximum']:g})", value=c["value"])
    return amount, shown("criterion"), method, shown("mode"), shown("protect_super")


@plan_guard
def on_pick_tried(s, evt: gr.SelectData):
    """A click on a Compare row makes that plan the current one again (with its distilled student, if any)."""
    s = _sess(s)
    plan = s.use_tried(int(evt.index[0]))
    out = plan_outputs(s)
    d = s.student()
    out["msg"] = (f"ℹ️ '{html.escape(plan.describe())}' is the plan again" +
                  (f"; its distilled student (perplexity {fmt_ppl(d.best_ppl)}) is what an export writes." if d
                   else ".") + (" " + out["msg"] if out["msg"] else ""))
    return out


@plan_guard
def on_clear(s):
    s = _sess(s)
    s.require()
    s.set_plan(Plan())
    return plan_outputs(s)


@plan_guard
def on_json(s, text):
    s = _sess(s)
    s.set_plan(text)
    return plan_outputs(s)


@plan_guard
def on_upload(s, file):
    s = _sess(s)
    s.set_plan(Path(getattr(file, "name", file)).read_text())
    return plan_outputs(s)


@friendly_gen
def on_distill(s, steps, lr, temperature, kl, train, eval_every):
    s = _sess(s)
    cfg = dataclasses.replace(DEFAULTS, steps=int(steps), lr=float(lr), temperature=float(temperature), kl=kl,
                              train=train, eval_every=int(eval_every)).validate()
    hist = []
    last = time.perf_counter()
    for e in s.distill(cfg):
        hist = s.distiller.history
        if e.kind == "step" and time.perf_counter() - last < 0.5:
            continue
        last = time.perf_counter()
        yield s, distill_md(e, s), figures.distill_figure(hist, s.baseline().ppl), gr.update(), gr.update()
    # the distilled student now stands in Compare and on the Pareto chart
    yield (s, distill_md(hist[-1] if hist else None, s), figures.distill_figure(hist, s.baseline().ppl),
           tried_table(s), pareto(s))


def on_stop(s):
    if s is not None:
        s.stop_distill()
    return "Stopping after the current step… (press Start to go on from there)"


def on_export(s, folder, overwrite, form="per-layer"):
    """A problem replaces the message (an earlier 'Written to' line never stays beside a new error)."""
    try:
        s = _sess(s)
        what = s.export_what()
        out = s.export(folder, overwrite=bool(overwrite), form=form or "per-layer")
    except Exception as err:  # noqa: BLE001 - reported in the page
        return s, user_message(err), None
    return s, (f"Written to `{out}`: {what}, with its tokenizer, plan.json and summary.json "
               f"({html.escape(s.export_note(out))})."), None


def on_zip(s, form="per-layer"):
    try:
        s = _sess(s)
        tmp = s.private_dir("archive")  # the previous archive of this session goes
        out = s.export(tmp / "compressed", trusted_target=True, form=form or "per-layer")
        archive = shutil.make_archive(str(tmp / "compressed"), "zip", out)
        shutil.rmtree(out, ignore_errors=True)  # the zip is what is downloaded; the folder was only its source
    except Exception as err:  # noqa: BLE001
        return s, user_message(err), None
    return s, f"Archive ready: {Path(archive).name}", archive


@friendly
def on_pareto_x(s, x):
    s = _sess(s)
    s.pareto_x = x
    return pareto(s)


@friendly
def on_generate(s, prompts, tokens):
    s = _sess(s)
    return figures.side_by_side_html(s.side_by_side(prompts or "", int(tokens)))


def _with_eta(progress):
    """Gradio's progress bar for a job that reports (fraction done, what): the time left is extrapolated."""
    t0 = time.perf_counter()

    def step(frac, what):
        left = "" if frac <= 0 else f", about {(time.perf_counter() - t0) * (1 - frac) / frac:.0f}s left"
        progress(frac, desc=f"{what}{left}")
    return step


@friendly
def on_score_plan_tasks(s, tasks, limit, progress=gr.Progress()):
    s = _sess(s)
    s.require()
    if s.plan.is_empty():
        raise SessionError("the plan is empty: make or click a plan first, then score it")
    s.score_tasks(str(tasks or "").strip(), int(limit) if limit else None, progress=_with_eta(progress),
                  only_current=True)
    return s.plan_task_markdown()


@friendly
def on_pareto_y(s, y):
    s = _sess(s)
    s.pareto_y = y or "ppl"
    return pareto(s)


@friendly
def on_score_tasks(s, tasks, limit, progress=gr.Progress()):
    s = _sess(s)
    s.require()
    s.score_tasks(str(tasks or "").strip(), int(limit) if limit else None, progress=_with_eta(progress))
    return tried_table(s), pareto_y_choices(s), pareto(s)


@friendly
def on_remeasure(s, progress=gr.Progress()):
    s = _sess(s)
    s.require()
    progress(0.1, desc="re-measuring stale plans")
    s.remeasure()
    return tried_table(s), pareto(s)


def on_routing_tab(s):
    """Plots drawn while their tab was hidden come out half as wide: draw them again when it shows."""
    if s is None or s.stats is None:
        return gr.update(), gr.update()
    return figures.load_heatmap(s.stats, s.plan.drop_experts), figures.balance_chart(s.stats)


def on_compare_tab(s, form="per-layer"):
    if s is None or not s.loaded:
        return gr.update(), gr.update(), gr.update()
    return tried_table(s), pareto(s), engines_md(s, form)


def engines_md(s: Session, form: str = "per-layer") -> str:
    """Which engines load the export of the plan in force, in the chosen form: said before the button is pressed."""
    if s is None or not s.loaded or s.plan.is_empty():
        return ""
    try:
        return s.engines(form or "per-layer")
    except Exception as err:  # noqa: BLE001 - a plan the model cannot take is said by the Plan tab
        return user_message(err)


@friendly
def on_sweep(s, ops, x="params", progress=gr.Progress()):
    """Every point of the grid previewed from this session's statistics; the curves and the grid as CSV."""
    from explorer.sweep import csv_text

    s = _sess(s)
    s.require(stats=True)
    if not ops:
        raise SessionError("choose at least one operation to sweep")
    eta = _with_eta(progress)
    points = s.sweep(list(ops), progress=lambda i, n, plan: eta(i / max(n, 1), f"previewing {plan}"))
    f = s.private_dir("sweep") / "sweep.csv"
    f.write_text(csv_text(points), encoding="utf-8")
    return figures.sweep_figure(points, x=x if x in figures.SWEEP_AXES else "params"), str(f)


def on_save_session(s):
    """The session as one file (model source, text, statistics, plans, measurements, students) to download."""
    try:
        s = _sess(s)
        f = s.save(s.private_dir("session") / "explorer.moe-session.zip")
    except Exception as err:  # noqa: BLE001 - reported in the page
        return user_message(err), None
    note = f" Note: {s.save_note}." if s.save_note else ""
    return (f"Saved: {len(s.tried)} plan(s) tried, {len(s.students)} student(s). Open it here later, or in a "
            f"notebook with `Session.open(path)`.{note}"), str(f)


def on_open_session(s, upload):
    """A saved session replaces this one, only once it has opened whole (a file that does not open changes
    nothing)."""
    try:
        old = _sess(s)
        new = Session(out_root=old.out_root, untrusted=old.untrusted, allow_paths=old.allow_paths,
                      deny_paths=old.deny_paths)
        info = new.restore(upload if isinstance(upload, str) else upload.name)
    except Exception as err:  # noqa: BLE001
        return s, user_message(err), gr.update(), gr.update()
    return new, (f"Opened a session of {Path(info['source']).name}: {info['plans']} plan(s) tried, "
                 f"{info['students']} student(s), the plan in force: {new.plan.describe() or 'empty'}. "
                 "The other tabs show it as you open them."), tried_table(new), pareto(new)


@friendly
def on_remove_tried(s, which=None):
    s = _sess(s)
    s.remove_tried("all" if which == "all" else None)
    return tried_table(s), pareto(s)


def on_sweep_x(s, x):
    """The sweep drawn again against the size the Compare tab's radio chose (parameters where it chose time)."""
    if s is None or not getattr(s, "last_sweep", None):
        return gr.update()
    return figures.sweep_figure(s.last_sweep, x=x if x in figures.SWEEP_AXES else "params")


@friendly
def on_speed(s, progress=gr.Progress()):
    s = _sess(s)
    done = s.measure_speed(progress=lambda i, n, name: progress(i / max(n, 1), desc=f"timing {name}"))
    return tried_table(s), pareto(s), figures.speed_note(done)


@friendly
def on_form(s, form):
    return engines_md(_sess(s), form)


# ---- wiring ----------------------------------------------------------------------------------------------------
def wire_loading(demo: gr.Blocks, state, m, r, sa, p, c) -> None:
    stats_fn, stat_outputs = bind(on_stats, {
        "state": state, "summary": m.summary, "coact": r.coact, "domain": r.domain, "balance": r.balance,
        "vocab": r.vocab, "layer": r.layer, "sa_layer": sa.layer, "strip_layer": r.strip_layer,
        "importance": sa.importance, **plan_views(p, r, c)})
    # the summary shows as soon as the model is in; the plots follow when the statistics are collected
    charts = {"heat": r.heat, "coact": r.coact, "domain": r.domain, "balance": r.balance, "vocab": r.vocab,
              "importance": sa.importance, "pareto": c.pareto}
    gr.on([m.load_btn.click, demo.load], on_loading, [m.src], [m.summary] + [charts[k] for k in LOADING_CLEARS]).then(
        on_load, [state, m.src, m.device, m.dtype, m.data_src, m.upload, m.max_tok], [state, m.summary]).success(
        stats_fn, [state], stat_outputs)
    m.stats_btn.click(on_data, [state, m.data_src, m.upload, m.max_tok], [state, m.summary]).success(
        stats_fn, [state], stat_outputs)


def plan_views(p, r, c, state=None) -> dict:
    """The component that shows each Plan-tab view (``plan_outputs``'s names)."""
    views = {} if state is None else {"state": state}
    views.update(msg=p.msg, preview=p.preview, plan_json=p.plan_json, table=p.table, heat=r.heat, tried=c.tried,
                 pareto=c.pareto, depth_layers=p.depth_layers, depth_blocks=p.depth_blocks, slim_keep=p.slim_keep,
                 download=p.download)
    return views


def wire_routing(state, r) -> None:
    r.layer.change(on_layer, [state, r.layer], [r.coact, r.domain, r.vocab])
    gr.on([r.route_btn.click, r.strip_layer.change], on_route, [state, r.text, r.strip_layer], r.strip)
    r.tab.select(on_routing_tab, [state], [r.heat, r.balance])


def wire_saliency(state, sa) -> None:
    gr.on([sa.btn.click, sa.layer.change, sa.sim_kind.change], on_saliency,
          [state, sa.crits, sa.layer, sa.sim_kind, sa.model_halves], [sa.bars, sa.stability, sa.sim, sa.importance])
    sa.why_btn.click(on_why_expert, [state, sa.why_layer, sa.why_expert], sa.why_md)
    sa.why_layer_btn.click(on_why_layer, [state, sa.why_layer], sa.why_md)


def wire_plan(state, p, r, c) -> None:
    views = plan_views(p, r, c, state)
    with_picked = {**views, "picked": p.picked}
    depth, depth_out = bind(on_depth, views)
    gr.on([p.depth_layers.input, p.depth_blocks.input, p.slim_keep.release], depth,
          [state, p.depth_layers, p.depth_blocks, p.slim_keep], depth_out)
    cell, cell_out = bind(on_cell, with_picked)
    # the preview after a click shows only what it measures: the table, heatmap and controls stay live while it
    # runs (a component an event writes to is locked until it ends), and a newer click cancels a stale preview
    refresh, refresh_out = bind(on_refresh, {k: views[k] for k in PREVIEW_VIEWS})
    measured = p.table.select(cell, [state, p.click_mode], cell_out).then(refresh, [state], refresh_out)
    p.table.select(None, None, None, cancels=[measured])
    gr.on([p.table_view.change, p.table_layer.change, p.table_sort.change], on_table,
          [state, p.table_view, p.table_layer, p.table_sort], [p.table, p.msg])
    merge, merge_out = bind(on_merge, with_picked)
    p.merge_btn.click(merge, [state], merge_out)
    preset, preset_out = bind(on_preset, views)
    p.preset_btn.click(preset, [state, p.preset, p.amount, p.crit, p.method, p.mode, p.protect], preset_out)
    p.preset.change(on_preset_kind, [state, p.preset], [p.amount, p.crit, p.method, p.mode, p.protect])
    clear, clear_out = bind(on_clear, views)
    p.clear_btn.click(clear, [state], clear_out)
    json_fn, json_out = bind(on_json, views)
    p.json_btn.click(json_fn, [state, p.plan_json], json_out)
    p.gen_btn.click(on_generate, [state, p.gen_prompts, p.gen_tokens], p.gen_out)
    p.plan_tasks_btn.click(on_score_plan_tasks, [state, p.plan_tasks, p.plan_task_limit], p.plan_tasks_out)
    upload, upload_out = bind(on_upload, views)
    p.upload.upload(upload, [state, p.upload], upload_out)


def wire_compare_rows(state, p, r, c) -> None:
    pick, pick_out = bind(on_pick_tried, plan_views(p, r, c, state))
    c.tried.select(pick, [state], pick_out)


def wire_distill(state, d, c) -> None:
    d.start_btn.click(on_distill, [state, d.steps, d.lr, d.temp, d.kl, d.train_what, d.every],
                      [state, d.status, d.chart, c.tried, c.pareto], concurrency_limit=None)
    d.stop_btn.click(on_stop, [state], d.status, queue=False)


def wire_compare(state, c) -> None:
    c.export_btn.click(on_export, [state, c.out_dir, c.overwrite, c.form], [state, c.msg, c.file])
    c.zip_btn.click(on_zip, [state, c.form], [state, c.msg, c.file])
    c.form.change(on_form, [state, c.form], c.engines)
    c.sweep_btn.click(on_sweep, [state, c.sweep_ops, c.pareto_x], [c.sweep_plot, c.sweep_file])
    c.pareto_x.change(on_sweep_x, [state, c.pareto_x], c.sweep_plot)
    c.save_btn.click(on_save_session, [state], [c.msg, c.file])
    c.remove_btn.click(on_remove_tried, [state], [c.tried, c.pareto])
    c.clear_tried_btn.click(functools.partial(on_remove_tried, which="all"), [state], [c.tried, c.pareto],
                            api_name="on_clear_tried")
    c.open_btn.upload(on_open_session, [state, c.open_btn], [state, c.msg, c.tried, c.pareto])
    c.remeasure_btn.click(on_remeasure, [state], [c.tried, c.pareto])
    c.pareto_x.change(on_pareto_x, [state, c.pareto_x], c.pareto)
    c.speed_btn.click(on_speed, [state], [c.tried, c.pareto, c.speed_md])
    c.pareto_y.change(on_pareto_y, [state, c.pareto_y], c.pareto)
    c.tasks_btn.click(on_score_tasks, [state, c.tasks, c.task_limit], [c.tried, c.pareto_y, c.pareto])
    c.tab.select(on_compare_tab, [state, c.form], [c.tried, c.pareto, c.engines])


def build(default_model: str = DEFAULT_MODEL, untrusted: bool = False, allow_paths: list[str] | None = None
          ) -> gr.Blocks:
    """The app. ``untrusted`` (main() sets it for --share or a non-loopback host): model, data and export fields
    name no server path outside ``allow_paths``."""
    POLICY.update(untrusted=untrusted, allow_paths=list(allow_paths or []))
    # gradio's copies of downloads and uploads go after an hour; a closed session's files and state with them
    with gr.Blocks(title="MoE Compression Explorer", delete_cache=(600, 3600)) as demo:
        state = gr.State(None, time_to_live=3600, delete_callback=_forget)
        gr.Markdown("# MoE Compression Explorer\nSee which experts carry the load, what cutting them costs, and how "
                    "much a short distillation wins back.")
        with gr.Tabs():
            m, r, sa, p, d, c = model_tab(default_model), routing_tab(), saliency_tab(), plan_tab(), distill_tab(), \
                compare_tab()
        wire_loading(demo, state, m, r, sa, p, c)
        wire_routing(state, r)
        wire_saliency(state, sa)
        wire_plan(state, p, r, c)
        wire_distill(state, d, c)
        wire_compare(state, c)
        wire_compare_rows(state, p, r, c)
    return demo


def distill_md(e, s: Session) -> str:
    if e is None:
        return ""
    d = s.distiller
    head = f"step {e.step}/{d.config.steps}" if d else f"step {e.step}"
    parts = []
    if e.loss is not None:
        parts.append(f"loss {e.loss:.4f}")
    if e.tokens_per_s:
        parts.append(f"{e.tokens_per_s:,.0f} tokens/s")
    if e.eta is not None and e.kind in ("step", "eval"):
        parts.append(f"about {e.eta:.0f}s left")
    if d is not None and d.initial_ppl is not None:
        parts.append(f"perplexity {fmt_ppl(d.initial_ppl)} → best {fmt_ppl(d.best_ppl)} (step {d.best_step})")
        r = recovered(s.baseline().ppl, d.initial_ppl, d.best_ppl)
        if r is not None:
            parts.append(f"recovered {max(r, 0):.0%} of the perplexity the cut lost")
    msg = f"\n\n{html.escape(e.message)}" if e.message else ""
    return f"**{e.kind}** · {head} · " + " · ".join(parts) + msg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true")
    ap.add_argument("--allow-paths", action="append", default=[], metavar="FOLDER",
                    help="a server folder that sessions of a shared app may read models and text from and export to "
                    "(repeatable); without it a shared app reads and writes no server path")
    ap.add_argument("--max-upload-mb", type=float, default=None, help="largest upload a shared app takes, in MiB "
                    f"(default {SHARED_UPLOAD_MB:g}; a private app takes any size unless this is given)")
    ap.add_argument("--untrusted", action="store_true", help="treat every session as a stranger even on loopback "
                    "(what --share and a non-loopback --host imply)")
    args = ap.parse_args()
    untrusted = bool(args.share or args.untrusted) or args.host not in ("127.0.0.1", "localhost", "::1")
    demo = build(args.model, untrusted=untrusted, allow_paths=args.allow_paths)
    upload_mb = args.max_upload_mb if args.max_upload_mb is not None else (SHARED_UPLOAD_MB if untrusted else None)
    if upload_mb is not None and not upload_mb > 0:
        ap.error(f"--max-upload-mb must be above 0, got {upload_mb:g}")
    demo.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                   show_error=True, head=LEAVE_WARNING, css=CSS,
                                                   max_file_size=None if upload_mb is None else int(upload_mb * 2**20))


if __name__ == "__main__":
    main()
