"""How a plan's preview reads, in one place for the app (Markdown), the widgets (HTML) and the CLI (text)."""
from __future__ import annotations

from .perplexity import change, fmt_ppl, fmt_ppl_se

_BOLD = {"markdown": ("**", "**"), "html": ("<b>", "</b>"), "text": ("", "")}
_SEP = {"markdown": "\n\n", "html": "<br>", "text": "\n"}


def preview_result(res, base, report: dict, seconds: float) -> dict:
    """A preview's perplexity (``res``, against the original's ``base``) and the plan's size report, as one dict."""
    c = change(base, res)
    return {"ppl": res.ppl, "ppl_se": res.se, "base_ppl": base.ppl, "base_ppl_se": base.se, "delta": c.ratio,
            "delta_se": c.se, "within_noise": c.noise, "change": str(c), "bpb": res.bpb, "tokens": res.tokens,
            "blocks": res.blocks, "per_domain": {k: v["ppl"] for k, v in res.per_domain.items()},
            "seconds": seconds, **report}


def size_lines(r: dict, markup: str = "text") -> list[str]:
    """Parameters, active parameters, bytes as written and experts per layer before and after a plan."""
    b0, b1 = _BOLD[markup]
    zeroed = r["params_after"] - r.get("params_nonzero_after", r["params_after"])
    pruned = f", {r['params_nonzero_after']:,} non-zero after pruning ({zeroed:,} weights zeroed)" if zeroed else ""
    return [f"parameters {r['params_before']:,} → {b0}{r['params_after']:,}{b1}{pruned} "
            f"({r['params_after'] / r['params_before']:.1%}) · active/token {r['active_before']:,} → "
            f"{r['active_after']:,} · " + _bytes(r, b0, b1),
            f"experts per MoE layer {r['experts_after']}", engine_summary(r, markup)]


def engine_summary(r: dict, markup: str = "text") -> str:
    """Which engines load the export (``explorer.engines``), one per line, before it is written."""
    vs = r.get("engines")
    if not vs:
        return r.get("loader_note", "")
    sep = {"markdown": "  \n", "html": "<br>", "text": "\n  "}[markup]
    mark = {True: "✓" if markup != "text" else "yes", False: "✗" if markup != "text" else "no "}
    form = r.get("form", "stock")
    head = "engines that load this export" + ("" if form == "stock" else f" ({form} form)") + ":"
    return head + sep + sep.join(f"{mark[v['loads']]} {v['engine']}: {v['how']}" for v in vs)


def _bytes(r: dict, b0: str, b1: str) -> str:
    """What the export writes, in the model's dtype (packed experts at their size), and a bf16 copy beside it."""
    dtype = r.get("dtype", "bfloat16")
    after, before = r["bytes_after"], r["bytes_before"]
    packed = " with packed experts" if after < r["params_after"] * (before / max(r["params_before"], 1)) else ""
    text = (f"{b0}{after / 2**20:.1f} MiB{b1} written in {dtype}{packed} ({after / before:.1%} of the original's "
            f"{before / 2**20:.1f} MiB)")
    if dtype != "bfloat16":
        text += f", {r['bytes_bf16_after'] / 2**20:.1f} MiB in bf16"
    return text


def preview_report(r: dict, markup: str = "text") -> str:
    """The preview in words: perplexity against the original, per domain, size, and how long it took."""
    b0, b1 = _BOLD[markup]
    lines = [f"preview perplexity {b0}{fmt_ppl_se(r['ppl'], r.get('ppl_se'))}{b1} ({r['change']} vs original "
             f"{fmt_ppl_se(r['base_ppl'], r.get('base_ppl_se'))}; {r['tokens']:,} tokens in {r.get('blocks', '?')} "
             "blocks, ± one standard error, the change paired block by block)",
             "per domain: " + " · ".join(f"{k} {fmt_ppl(v)}" for k, v in r["per_domain"].items()),
             *size_lines(r, markup)]
    if r.get("seconds") is not None:
        lines.append(f"preview took {r['seconds']:.2f}s")
    return _SEP[markup].join(lines)


def why_expert(d: dict, markup: str = "text") -> str:
    """``explorer.why.explain_expert`` in words: each figure beside the baseline it is judged against."""
    b0, b1 = _BOLD[markup]
    e, L, E = d["expert"], d["layer"], d["experts"]
    ranks = " · ".join(f"{c} {r} of {E}" for c, (r, _) in d["ranks"].items())
    doms = sorted(d["domains"].items(), key=lambda kv: -kv[1])
    lines = [f"{b0}Expert {e} of MoE layer {L}{b1}: load {d['load']:.2f}x the fair share k/E"
             + (" · a super expert (REAP's rule: never dropped with protect)" if d["super"] else ""),
             f"rank in its layer (1 = most important): {ranks}",
             "domains, against its overall share (1 = as much as the text as a whole): "
             + " · ".join(f"{k} {v:.2f}x" for k, v in doms),
             "chosen together with, against chance (1 = independent): "
             + " · ".join(f"e{j} {v:.2f}x" for j, v in d["partners"])]
    if d["tokens"]:
        lines.append("its most reliable tokens (share of the token's occurrences routed to it): "
                     + " · ".join(f"{t} {s:.0%} ({n}x)" for t, s, n in d["tokens"]))
    return _SEP[markup].join(lines)


def why_layer(d: dict, markup: str = "text") -> str:
    """``explorer.why.explain_layer`` in words."""
    b0, b1 = _BOLD[markup]
    return _SEP[markup].join([
        f"{b0}MoE layer {d['layer']}{b1} (decoder layer {d['decoder_layer']}): its MoE sub-layer turns the residual "
        f"stream by {d['turn']:.4f} (1 - cos), rank {d['turn_rank']} of {d['layers']} (1 = turns it most); its "
        f"decoder block by {d['block_turn']:.4f}",
        f"dropping its MoE sub-layer (Layer Drop): perplexity {fmt_ppl_se(d['drop_ppl'], d['drop_se'])}, "
        f"{d['drop_change']} against the original {fmt_ppl(d['base_ppl'])} (paired over the same blocks)"])
