"""Plotly figure builders: pure functions of results, shared by the Gradio app and the notebook widgets."""
from __future__ import annotations

import html
import math

import numpy as np
import plotly.colors as pc
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .distill import recovered
from .errors import ExplorerError
from .stats import RouterStats

PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6", "#9D755D",
           "#BAB0AC", "#1F77B4", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#17BECF"]
LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), height=380)


def _fig(**kw) -> go.Figure:
    f = go.Figure()
    f.update_layout(**{**LAYOUT, **kw})
    return f


def expert_color(e: int) -> str:
    return PALETTE[e % len(PALETTE)]


EVERY_TICK = 32  # up to this many experts or layers an axis labels each one; beyond, plotly spaces the labels


def _dtick(n: int) -> int | None:
    return 1 if n <= EVERY_TICK else None


# Viridis for any load above zero; exactly zero (an expert no token reached) in a quiet grey, not the scale's
# darkest, most prominent colour
DEAD_GREY = "#d9d9d9"
_VIRIDIS = pc.sequential.Viridis
DEAD_GREY_VIRIDIS = ([[0.0, DEAD_GREY], [1e-9, DEAD_GREY], [2e-9, _VIRIDIS[0]]]
                     + [[i / (len(_VIRIDIS) - 1), c] for i, c in enumerate(_VIRIDIS)][1:])


def load_heatmap(stats: RouterStats, selected: dict[int, list[int]] | None = None) -> go.Figure:
    """Layers x experts: share of routing slots, as a multiple of the uniform share k/E. Selected cells marked.
    One cell per expert at every size (a 61 x 256 map is a texture one reads by hover and zoom); rows keep a
    readable height as layers grow."""
    m = stats.load_vs_uniform()
    L, E = m.shape
    counts = np.full((L, E), np.nan)
    for i in range(L):
        counts[i, : stats.num_experts[i]] = stats.layers[i]["count"]
    f = _fig(title="Expert load (x uniform share k/E); x = selected to drop; grey = no tokens (dead expert)",
             height=max(420, 12 * L + 160))
    f.add_trace(go.Heatmap(z=m, x=list(range(E)), y=list(range(L)), colorscale=DEAD_GREY_VIRIDIS, zmin=0,
                           customdata=counts, colorbar=dict(title="x uniform"),
                           hovertemplate="layer %{y} expert %{x}<br>load %{z:.2f}x uniform<br>tokens "
                                         "%{customdata:,.0f}<extra></extra>"))
    # always two traces (the marker trace may be empty), so a widget updates in place and keeps its click handler
    sel = selected or {}
    xs = [e for i, es in sel.items() for e in es]
    ys = [i for i, es in sel.items() for _ in es]
    f.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="selected", showlegend=False,
                           marker=dict(symbol="x", size=14, color="red", line=dict(width=2))))
    f.update_xaxes(title="expert", dtick=_dtick(E))
    f.update_yaxes(title="MoE layer", dtick=_dtick(L), autorange="reversed")
    return f


def coactivation_heatmap(stats: RouterStats, layer: int) -> go.Figure:
    """How often two experts are chosen together against chance (independent choices at their loads): the raw
    share mostly says how busy the two are. 1 = as often as chance (white), red above, blue below, 0 = never."""
    lift = stats.coactivation_lift(layer)
    share = stats.coactivation(layer)
    E = lift.shape[0]
    top = float(np.nanmax(lift)) if np.isfinite(lift).any() else 2.0
    f = _fig(title=f"Co-activation, layer {layer}<br><sup>chosen together, against chance (1 = independent "
                   "choices)</sup>")  # one line was cut off at the app's half-width column
    f.add_trace(go.Heatmap(z=lift, x=list(range(E)), y=list(range(E)), customdata=share,
                           colorscale="RdBu_r", zmin=0, zmid=1, zmax=max(2.0, top),
                           colorbar=dict(title="× chance"),
                           hovertemplate="experts %{y} & %{x}: %{z:.2f}x chance (%{customdata:.3f} of tokens)"
                                         "<extra></extra>"))
    f.update_xaxes(title="expert j", dtick=_dtick(E))
    f.update_yaxes(title="expert i", dtick=_dtick(E), autorange="reversed")
    f.update_layout(height=420, width=None)
    return f


def balance_chart(stats: RouterStats) -> go.Figure:
    """Per layer: mean router entropy and load balance (coefficient of variation, max/mean)."""
    L = len(stats.layers)
    b = [stats.balance(i) for i in range(L)]
    f = make_subplots(rows=1, cols=2, subplot_titles=("router entropy per token (nats)", "load balance"))
    f.add_trace(go.Bar(x=list(range(L)), y=[stats.mean_entropy(i) for i in range(L)], name="mean entropy",
                       marker_color=PALETTE[0]), 1, 1)
    f.add_trace(go.Scatter(x=list(range(L)), y=[math.log(e) for e in stats.num_experts], name="log E (uniform)",
                           mode="lines+markers", line=dict(dash="dash", color="gray")), 1, 1)
    f.add_trace(go.Bar(x=list(range(L)), y=[x["cv"] for x in b], name="CV of load", marker_color=PALETTE[1]), 1, 2)
    f.add_trace(go.Bar(x=list(range(L)), y=[x["max_over_mean"] for x in b], name="max / mean",
                       marker_color=PALETTE[2]), 1, 2)
    f.update_layout(**LAYOUT, title="Router confidence and balance per MoE layer")
    f.update_xaxes(title="MoE layer", dtick=_dtick(L))
    f.update_yaxes(title="entropy (nats)", row=1, col=1)
    f.update_yaxes(title="CV, max / mean (0 and 1 = even)", row=1, col=2)
    return f


def domain_heatmap(stats: RouterStats, layer: int) -> go.Figure:
    """Domains x experts: an expert's share of a domain's slots over its share of all slots (1 = no preference).
    Relative to the expert's own load, so a busy generalist does not look like a specialist."""
    r = stats.specialisation(layer)
    load = stats.domain_load(layer) * stats.num_experts[layer]
    f = _fig(title=f"Domain specialisation, layer {layer}<br><sup>an expert's share of the domain / its overall share"
                   "</sup>")
    z = np.log2(np.maximum(r, 1 / 16))
    lim = max(1.0, float(np.abs(z).max()))  # symmetric, so x2 and x1/2 always have their ticks
    ticks = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 2 / 3, 1, 1.5, 2, 4, 8, 16]
    f.add_trace(go.Heatmap(z=z, x=list(range(r.shape[1])), y=stats.domains, zmin=-lim, zmax=lim,
                           colorscale="RdBu_r", customdata=np.stack([r, load], -1),
                           colorbar=dict(title="x the expert's<br>own share", tickvals=[math.log2(t) for t in ticks],
                                         ticktext=["1/16", "1/8", "1/4", "1/2", "2/3", "1", "1.5", "2", "4", "8",
                                                   "16"]),
                           hovertemplate="%{y} -> expert %{x}: %{customdata[0]:.2f}x its overall share "
                                         "(%{customdata[1]:.2f}x uniform)<extra></extra>"))
    f.update_xaxes(title="expert", dtick=_dtick(r.shape[1]))
    f.update_yaxes(title="domain")
    return f


def vocab_figure(vr, tokenizer, layer: int, per_expert: int = 3, min_count: int = 4,
                 max_experts: int = EVERY_TICK) -> go.Figure:
    """For each expert, the token ids that go to it most reliably (share of the id's occurrences), OLMoE-style;
    the title compares the layer's id-concentration with the shuffled-ids baseline. Beyond ``max_experts``
    experts, the rows are those of the ``max_experts`` experts whose most reliable token is most reliable."""
    ids, share, occ = vr.token_share(layer, min_count)
    E = share.shape[1] if len(ids) else vr.num_experts[layer]
    shown = list(range(E))
    if E > max_experts and len(ids):
        best = share.max(0)
        shown = sorted(np.argsort(-best, kind="stable")[:max_experts].tolist())
    rows, labels = [], []
    for e in shown:
        for j in np.argsort(-share[:, e], kind="stable")[:per_expert] if len(ids) else []:
            if share[j, e] <= 0 or int(ids[j]) in [r[0] for r in rows]:
                continue
            rows.append((int(ids[j]), share[j], int(occ[j])))
            labels.append(f"{token_label(tokenizer, int(ids[j]))} ({int(occ[j])}x) → e{e}")
    try:
        c, base = vr.concentration(layer, min_count), vr.concentration(layer, min_count, shuffled=True)
        title = (f"Vocabulary specialisation, layer {layer}: each expert's most reliable tokens; a token goes to "
                 f"its favourite expert {c:.0%} of the time (shuffled ids: {base:.0%})")
    except ValueError:
        title = f"Vocabulary specialisation, layer {layer}: too little text"
    if len(shown) < E:
        title += f"<br><sup>the {len(shown)} of {E} experts whose most reliable token is most reliable</sup>"
    f = _fig(title=title, height=max(320, 22 * len(rows) + 120))
    if rows:
        z = np.array([r[1] for r in rows])
        f.add_trace(go.Heatmap(z=z, x=list(range(E)), y=labels, colorscale="Blues", zmin=0, zmax=1,
                               colorbar=dict(title="share of the<br>token's occurrences"),
                               hovertemplate="%{y}: %{z:.0%} of its occurrences to expert %{x}<extra></extra>"))
    f.update_xaxes(title="expert", dtick=_dtick(E))
    f.update_yaxes(title=f"expert's top tokens (occurrences) → expert; seen ≥ {min_count} times", autorange="reversed")
    return f


def _byte_level_inverse() -> dict[str, int]:
    """GPT-2's byte-level alphabet read back: the printable character each byte is stored as -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_LEVEL = _byte_level_inverse()


def token_label(tokenizer, token_id: int) -> str:
    """A token as a reader can see it: its text, or, for a piece of a multi-byte character (which decodes to the
    replacement character alone), its bytes (b'\\xe2\\x80')."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return repr(text)
    raw = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(raw, str) and raw and all(ch in _BYTE_LEVEL for ch in raw):
        return repr(bytes(_BYTE_LEVEL[ch] for ch in raw))
    return repr(raw)


def token_strip_html(routes: dict, layer: int, rank: int = 0) -> str:
    """Each token coloured by its top-(rank+1) expert in ``layer``; hover shows every layer's choice."""
    parts = []
    for t, tok in enumerate(routes["tokens"]):
        e = routes["routes"][layer][t][rank]
        g = routes["gates"][layer][t][rank]
        title = "; ".join(f"L{i}: " + ",".join(str(x) for x in r[t]) for i, r in enumerate(routes["routes"]))
        shown = html.escape(tok).replace("\n", "⏎<br>") or "&nbsp;"
        parts.append(f'<span title="{html.escape(title)} (gate {g:.2f})" style="background:{expert_color(e)};'
                     f'opacity:{0.45 + 0.55 * min(1.0, g):.2f};color:#fff;padding:1px 2px;margin:1px;border-radius:3px;'
                     f'font-family:monospace;white-space:pre-wrap">{shown}</span>')
    E = 1 + max(max(r[rank] for r in routes["routes"][layer]), 0)
    legend = " ".join(f'<span style="background:{expert_color(e)};color:#fff;padding:1px 6px;border-radius:3px">'
                      f'{e}</span>' for e in range(E))
    return (f'<div class="token-strip"><div style="margin-bottom:6px">layer {layer}, expert rank {rank + 1}: '
            f'{legend}</div><div style="line-height:1.9">{"".join(parts)}</div></div>')


def saliency_bars(scores: dict[str, list[np.ndarray]], layer: int, normalise: bool = True,
                  stability: dict | None = None) -> go.Figure:
    """Scores of each expert in ``layer`` by several criteria, side by side (each scaled to max 1). With
    ``stability`` (criterion -> :class:`~explorer.saliency.RankStability`), each bar's error bar spans the scores of
    the two calibration halves and the legend gives the layer's Spearman ρ between them."""
    f = _fig(title=f"Expert saliency, layer {layer} (higher = more important)", barmode="group")
    stability = stability or {}

    def scaled(v):
        v = np.asarray(v, dtype=float)
        return v / np.abs(v).max() if normalise and np.abs(v).max() > 0 else v

    for j, (name, s) in enumerate(scores.items()):
        v = scaled(s[layer])
        st, err, label = stability.get(name), None, name
        if st is not None:
            a, b = scaled(st.halves[0][layer]), scaled(st.halves[1][layer])
            err = dict(type="data", array=np.clip(np.maximum(a, b) - v, 0, None),
                       arrayminus=np.clip(v - np.minimum(a, b), 0, None), thickness=1, width=2, color="#333")
            rho = st.rho[layer]
            label = f"{name} (halves ρ {rho:.2f})" if np.isfinite(rho) else f"{name} (halves: no ranking)"
        f.add_trace(go.Bar(x=list(range(len(v))), y=v, name=label, marker_color=PALETTE[j % len(PALETTE)],
                           error_y=err))
    f.update_xaxes(title="expert", dtick=_dtick(len(v)))
    f.update_yaxes(title="score / max" if normalise else "score")
    if stability:
        f.update_layout(title=f"Expert saliency, layer {layer} (higher = more important; bars span the two "
                              "calibration halves)")
    return f


def similarity_figure(sim: np.ndarray, title: str) -> go.Figure:
    """Similarity heatmap ordered by average-linkage clustering, with the dendrogram above it."""
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    E = sim.shape[0]
    d = np.clip(1 - sim, 0, None)
    np.fill_diagonal(d, 0)
    d = (d + d.T) / 2
    z = linkage(squareform(d, checks=False), method="average")
    dn = dendrogram(z, no_plot=True)
    order = [int(i) for i in dn["ivl"]]
    f = make_subplots(rows=2, cols=1, row_heights=[0.3, 0.7], shared_xaxes=False, vertical_spacing=0.04)
    for xs, ys in zip(dn["icoord"], dn["dcoord"]):
        f.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="#555"), hoverinfo="skip",
                               showlegend=False), 1, 1)
    f.update_xaxes(showticklabels=False, range=[0, 10 * E], row=1, col=1)
    f.update_yaxes(title="1 - cos", row=1, col=1)
    s = sim[np.ix_(order, order)]
    pos = [5 + 10 * i for i in range(E)]  # the dendrogram's leaf positions, so columns sit under their leaves
    labels = [[f"experts {a} & {b}" for b in order] for a in order]
    f.add_trace(go.Heatmap(z=s, x=pos, y=[str(o) for o in order], colorscale="Viridis", zmin=-1, zmax=1,
                           colorbar=dict(title="cosine", len=0.7, y=0.35), text=labels,
                           hovertemplate="%{text}: cos %{z:.3f}<extra></extra>"), 2, 1)
    f.update_xaxes(range=[0, 10 * E], tickvals=pos, ticktext=[str(o) for o in order], title="expert", row=2, col=1,
                   showticklabels=E <= EVERY_TICK)  # beyond, the leaves' ids are read by hover
    f.update_yaxes(autorange="reversed", title="expert", row=2, col=1, showticklabels=E <= EVERY_TICK)
    f.update_layout(**{**LAYOUT, "height": 520}, title=title)
    return f


def importance_chart(stats: RouterStats) -> go.Figure:
    """Layer Drop (1 − cos(h, h+MoE)) and Block Drop (1 − cos(X_i, X_i+1)) importance."""
    f = make_subplots(rows=1, cols=2, subplot_titles=("MoE sub-layer importance", "decoder block importance"))
    li = stats.layer_importance()
    bi = stats.block_importance()
    f.add_trace(go.Bar(x=[f"L{i}" for i in range(len(li))], y=li, marker_color=PALETTE[3], name="1 - cos(h, h+MoE)"),
                1, 1)
    f.add_trace(go.Bar(x=[f"B{i}" for i in range(len(bi))], y=bi, marker_color=PALETTE[4], name="1 - cos(X_i, X_i+1)"),
                1, 2)
    f.update_layout(**LAYOUT, title="Which layers do little? (lower = safer to drop)")
    f.update_xaxes(title="MoE layer", row=1, col=1)
    f.update_xaxes(title="decoder block", row=1, col=2)
    f.update_yaxes(title="1 - cos(h, h + MoE(h))", row=1, col=1)
    f.update_yaxes(title="1 - cos(input, output)", row=1, col=2)
    return f


def distill_figure(history: list, teacher_ppl: float | None = None) -> go.Figure:
    """Loss parts per step and held-out perplexity at each evaluation, from DistillEvents (or their dicts), with the
    teacher's and the undistilled cut model's perplexity as lines and the share of the lost perplexity won back."""
    ev = [e if isinstance(e, dict) else e.to_dict() for e in history]
    steps = [e for e in ev if e["kind"] in ("step", "eval")]
    evals = [e for e in ev if e["ppl"] is not None and e["kind"] in ("start", "eval")]
    f = make_subplots(rows=1, cols=2, subplot_titles=("distillation loss", "held-out perplexity"))
    keys = sorted({k for e in steps for k in e["parts"]})
    for j, k in enumerate(keys):
        f.add_trace(go.Scatter(x=[e["step"] for e in steps], y=[e["parts"].get(k) for e in steps], mode="lines",
                               name=f"{k}", line=dict(color=PALETTE[j])), 1, 1)
    ppls = [e["ppl"] for e in evals]
    f.add_trace(go.Scatter(x=[e["step"] for e in evals], y=ppls, mode="lines+markers",
                           name="perplexity", line=dict(color=PALETTE[3], width=3)), 1, 2)
    title = "Distillation"
    if evals and teacher_ppl is not None:
        cut, best = evals[0]["ppl"], min(ppls)
        steps_x = [evals[0]["step"], max(e["step"] for e in evals)]
        for y, name, dash in ((teacher_ppl, "teacher (original)", "dash"), (cut, "cut, not distilled", "dot")):
            f.add_trace(go.Scatter(x=steps_x, y=[y, y], mode="lines", name=name, hoverinfo="name+y",
                                   line=dict(color="#555", dash=dash)), 1, 2)
        r = recovered(teacher_ppl, cut, best)
        if r is not None:
            title = f"Distillation: recovered {max(r, 0):.0%} of the perplexity the cut lost"
    f.update_xaxes(title="step")
    f.update_yaxes(title="loss (nats/token)", row=1, col=1)
    f.update_yaxes(title="perplexity (eval)", row=1, col=2)
    if spans_orders(ppls):  # a diverging run: a linear axis would flatten every other point
        f.update_yaxes(type="log", title="perplexity (log scale)", row=1, col=2)
    if any(spans_orders([e["parts"].get(k) for e in steps]) for k in keys):
        f.update_yaxes(type="log", title="loss (log scale)", row=1, col=1)
    f.update_layout(**LAYOUT, title=title)
    return f


PARETO_AXES = {"params": ("parameters", "%{x:,} params"), "bytes": ("bytes (quantised experts at their bits, "
                                                                    "the rest bf16)", "%{x:,} bytes"),
               "time": ("decode time per token (x the original's, batch 1, measured)", "%{x:.2f}x the time")}
SWEEP_AXES = ("params", "bytes")  # the sweep measures no speed


def _quality(e: dict, y: str):
    """An entry's value on the chart's quality axis: perplexity, or accuracy of task NAME for ``task:NAME``."""
    if y == "ppl":
        return e.get("ppl")
    return (e.get("tasks") or {}).get(y.split(":", 1)[1])


def pareto_figure(entries: list[dict], baseline: dict | None = None, x: str = "params", y: str = "ppl") -> go.Figure:
    """Every plan tried: size (parameters, or bytes) against perplexity (lower is better) or a task's accuracy
    (``task:NAME``, higher is better), and the Pareto front in red."""
    if x not in PARETO_AXES:
        raise ValueError(f"the Pareto chart's x-axis is one of {', '.join(PARETO_AXES)}, not {x!r}")
    if y != "ppl" and not y.startswith("task:"):
        raise ValueError(f"the Pareto chart's y-axis is ppl or task:NAME, not {y!r}")
    title, hover = PARETO_AXES[x]
    what = "perplexity" if y == "ppl" else f"{y[5:]} accuracy"
    f = _fig(title=f"Plans tried: {title.split(' (')[0]} vs {what} (Pareto front in red)")
    if x == "time" and not any(e.get("time") is not None for e in entries):
        f.add_annotation(text="no plan's speed measured yet: press 'Measure speed and memory'", xref="paper",
                         yref="paper", x=0.5, y=0.5, showarrow=False)
    entries = [{**e, "_y": _quality(e, y)} for e in entries if e.get(x) is not None and _quality(e, y) is not None]
    if baseline and _quality(baseline, y) is not None:
        f.add_trace(go.Scatter(x=[baseline[x]], y=[_quality(baseline, y)], mode="markers",
                               textposition="top center", marker=dict(size=12, symbol="star", color="black"),
                               error_y=_error_bars([baseline], y), name="original"))
    plain = [e for e in entries if not e.get("distilled")]
    distilled = [e for e in entries if e.get("distilled")]
    fmt = "ppl %{y:.3f}" if y == "ppl" else "accuracy %{y:.3f}"
    series: dict[str, list[dict]] = {}  # one colour per kind of cut, so dozens of plans stay told apart
    for e in plain:
        series.setdefault(_series(e), []).append(e)
    groups = [(es, f"{name} · {len(es)}", dict(size=9, color=PALETTE[k % len(PALETTE)], opacity=0.8,
                                                symbol=SYMBOLS[(k // len(PALETTE)) % len(SYMBOLS)]), "plans")
              for k, (name, es) in enumerate(series.items())]
    groups.append((distilled, "distilled", dict(size=13, color=PALETTE[2], symbol="diamond"), "distilled"))
    for group, name, marker, legendgroup in groups:
        if group:
            f.add_trace(go.Scatter(x=[e[x] for e in group], y=[e["_y"] for e in group], mode="markers",
                                   name=name, legendgroup=legendgroup, text=[e["name"] for e in group],
                                   marker=marker, error_y=_error_bars(group, y), error_x=_time_bars(group, x),
                                   hovertemplate="%{text}<br>" + hover + "<br>" + fmt + "<extra></extra>"))
    if entries:
        front = pareto_front(entries, x, key="_y", higher=y != "ppl")
        labelled = len(front) <= 12  # name the front's plans on the chart; beyond, hover
        f.add_trace(go.Scatter(x=[e[x] for e in front], y=[e["_y"] for e in front],
                               mode="lines+markers+text" if labelled else "lines+markers", name="Pareto front",
                               text=[_short(e["name"]) for e in front] if labelled else None,
                               textposition=_label_sides([e[x] for e in front],
                                                         [e[x] for e in entries] + ([baseline[x]] if baseline else [])),
                               textfont=dict(size=10, color="#b00"),
                               line=dict(color="red"), marker=dict(size=12, color="red", symbol="circle-open",
                                                                   line=dict(width=2)),
                               hoverinfo="skip"))
    f.update_xaxes(title=title)
    if y == "ppl":  # a few failed cuts (random drops) would flatten the rest on a linear axis
        ys_all = [e["_y"] for e in entries] + ([baseline["ppl"]] if baseline else [])
        log = spans_orders(ys_all, ratio=3.0)
        f.update_yaxes(title="perplexity (eval)" + (", log scale" if log else ""), type="log" if log else "linear",
                       **({"dtick": "D2"} if log else {}))
    else:
        f.update_yaxes(title=f"{y[5:]} accuracy (lm-eval)")
    f.update_layout(height=480, legend=dict(font=dict(size=11)))
    return f


def sweep_figure(points, x: str = "params") -> go.Figure:
    """A sweep (``explorer.sweep``): perplexity against size, one line per series (drop by each criterion, merge,
    slim, quantise), one standard error as error bars, the original as a star. ``points``: SweepPoints or their
    rows (CSV dicts)."""
    if x not in SWEEP_AXES:
        raise ValueError(f"the sweep's x-axis is one of {', '.join(SWEEP_AXES)}, not {x!r}")
    rows = [p if isinstance(p, dict) else p.to_row() for p in points]
    title, hover = PARETO_AXES[x]
    f = _fig(title=f"Sweep: perplexity against {title.split(' (')[0]}, ± one standard error")
    orig = [r for r in rows if r["series"] == "original"]
    series = list(dict.fromkeys(r["series"] for r in rows if r["series"] != "original"))
    flat = [n for n in series if orig and all(float(r[x]) == float(orig[0][x]) for r in rows if r["series"] == n)]
    if flat:  # quantising keeps every parameter: against parameters its points would all sit on the original
        f.add_annotation(text=f"{', '.join(flat)}: the same parameters, fewer bytes; draw the sweep against bytes",
                         xref="paper", yref="paper", x=0, y=1.02, showarrow=False, xanchor="left", font=dict(size=11))
    for k, name in enumerate(series):
        if name in flat:
            continue
        pts = sorted((r for r in rows if r["series"] == name), key=lambda r: -float(r[x]))
        pts = orig + pts  # every curve starts at the original
        f.add_trace(go.Scatter(
            x=[float(r[x]) for r in pts], y=[float(r["ppl"]) for r in pts], mode="lines+markers", name=name,
            text=[r["plan"] or "original" for r in pts], marker=dict(color=PALETTE[k % len(PALETTE)], size=8),
            line=dict(color=PALETTE[k % len(PALETTE)]),
            error_y=dict(type="data", array=[float(r["ppl_se"]) for r in pts], visible=True, thickness=1, width=3),
            hovertemplate="%{text}<br>" + hover + "<br>ppl %{y:.3f}<extra></extra>"))
    if orig:
        f.add_trace(go.Scatter(x=[float(orig[0][x])], y=[float(orig[0]["ppl"])], mode="markers", name="original",
                               marker=dict(size=14, symbol="star", color="black")))
    ys = [float(r["ppl"]) for r in rows]
    log = spans_orders(ys, ratio=3.0)  # the random control climbs far above the rest: keep the others readable
    f.update_xaxes(title=title, autorange="reversed")  # smaller to the right: the cut grows left to right
    f.update_yaxes(title="perplexity (eval)" + (", log scale" if log else ""), type="log" if log else "linear")
    return f


SYMBOLS = ("circle", "square", "triangle-up", "x")


def _series(e: dict) -> str:
    """The kind of cut of a Compare entry (``Plan.series``)."""
    from .plan import Plan

    try:
        return Plan.from_dict(e["plan"]).series()
    except (KeyError, TypeError, ValueError, ExplorerError):
        return "plans"


def _label_sides(xs: list, all_xs: list) -> list[str]:
    """Where each front point's name goes: above and below in turn, so neighbours do not overlap, and towards the
    middle of the chart, so no name runs off its edge."""
    lo, hi = min(all_xs), max(all_xs)
    mid = (lo + hi) / 2
    return [("top " if i % 2 == 0 else "bottom ") + ("left" if v > mid else "right") for i, v in enumerate(xs)]


def _short(name: str, n: int = 30) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def speed_cells(speed: dict | None) -> dict:
    """A Compare row's speed and memory cells from its measured ``SpeedRatio`` (empty until measured)."""
    if not speed:
        return {"speed: prefill · decode (x orig)": "", "memory (x orig)": ""}
    sp = speed.get("spread", {})
    return {"speed: prefill · decode (x orig)": f"{speed['prefill']:.2f} · {speed['decode_1']:.2f} ± "
                                                f"{sp.get('decode_1', 0):.2f}",
            "memory (x orig)": f"{speed['peak']:.2f}"}


def speed_note(entries: list[dict]) -> str:
    """What was timed, on what, and what the kernels cannot turn into speed, for the plans just measured."""
    if not entries:
        return "No plan measured on the current text to time: preview one first."
    sp = entries[0]["speed"]
    o = sp["original"]
    lines = [f"Timed on {sp['device']}: the original runs prefill at {o['prefill']:,.0f} tokens/s ({o['batch']} blocks "
             f"of {o['block_len']}), decodes {o['decode_1']:,.0f} tokens/s at batch 1 and {o['decode_b']:,.0f} at "
             f"batch {o['batch']}. Each plan's figures are ratios to it (> 1: faster), the median of interleaved "
             "pairs ± half their range."]
    seen = []
    for e in entries:
        for lim in e["speed"].get("limits", []):
            if lim not in seen:
                seen.append(lim)
    lines += [f"- {lim}" for lim in seen]
    return "\n".join(lines)


def _time_bars(entries: list[dict], x: str) -> dict | None:
    """The spread of the interleaved timing pairs, on the time axis only."""
    if x != "time":
        return None
    return dict(type="data", array=[float(e.get("time_se") or 0.0) for e in entries], visible=True, thickness=1,
                width=3)


def _error_bars(entries: list[dict], y: str) -> dict | None:
    """One standard error above and below each point: over the evaluation blocks for perplexity, lm-eval's
    standard error over items for a task's accuracy (none where unknown)."""
    if y == "ppl":
        se = [e.get("ppl_se") for e in entries]
    else:
        se = [(e.get("tasks_se") or {}).get(y.split(":", 1)[1]) for e in entries]
    if not any(v is not None and math.isfinite(v) for v in se):
        return None
    return dict(type="data", array=[v if v is not None and math.isfinite(v) else 0.0 for v in se], visible=True,
                thickness=1, width=3)


def spans_orders(values, ratio: float = 50.0) -> bool:
    """Whether positive values span more than ``ratio`` (or are not finite): draw them on a log axis."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return False
    if any(not math.isfinite(x) for x in v):
        return True
    pos = [x for x in v if x > 0]
    return bool(pos) and max(pos) / min(pos) > ratio


def pareto_front(entries: list[dict], x: str = "params", key: str = "ppl", higher: bool = False) -> list[dict]:
    """The entries no other beats on both size and quality (``key``; ``higher``: larger is better)."""
    sign = -1.0 if higher else 1.0
    front, best = [], math.inf
    for e in sorted(entries, key=lambda e: (e[x], sign * e[key])):
        if sign * e[key] < best:
            front.append(e)
            best = sign * e[key]
    return front


def side_by_side_html(rows: list[dict]) -> str:
    """The original's and the preview's continuations of each prompt, in two columns (app and widgets)."""
    import html as _h

    pre = "<pre style='white-space: pre-wrap; word-break: break-word; margin: 0'>"
    cells = "".join(
        f"<tr><td>{pre}{_h.escape(r['prompt'])}</pre></td><td>{pre}{_h.escape(r['original'])}</pre></td>"
        f"<td>{pre}{_h.escape(r['preview'])}</pre></td></tr>" for r in rows)
    return ("<table class='side-by-side' style='table-layout: fixed; width: 100%'><tr><th style='width: 20%'>prompt"
            "</th><th>original</th><th>preview (the plan)</th></tr>"
            f"{cells}</table>")
