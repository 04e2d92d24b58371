"""The experiments behind docs/RESULTS.md, on the bundled demo model (CPU, about 20 minutes on 2 cores).

  python bench/experiments.py compression   # criteria x drop ratios, merging, slimming, layer drop, Spearman
  python bench/experiments.py distill       # recovery curve, one-shot vs progressive, distilled vs from scratch
Each writes its tables (markdown) and figures to docs/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import _common  # noqa: F401  (puts the repository on sys.path)

from explorer import collect_stats, load_data, load_model, perplexity, planners
from explorer.distill import DistillConfig, Distiller, drop_schedule, progressive
from explorer.preview import preview_perplexity
from explorer.saliency import expert_scores, spearman

DOCS = Path(__file__).resolve().parent.parent / "docs"


def compression() -> str:
    model, tok, view = load_model(device="cpu")
    data = load_data(tok, "demo", block_len=256, max_tokens=8192)
    stats = collect_stats(model, view, data.calib)
    ev = data.eval
    base = perplexity(model, ev)
    rows = []

    def add(name, plan, group):
        rep = plan.report(view)
        ppl = preview_perplexity(model, view, plan, ev, stats=stats).ppl
        rows.append((group, name, rep["params_after"], rep["active_after"], ppl))
        print(f"{group:>10} {name:<36} {rep['params_after']:>10,} {ppl:8.3f}", flush=True)

    crits = ["frequency", "gate-mass", "reap", "reconstruction", "ablation"]
    t = time.time()
    scores = {c: expert_scores(stats, c, model=model, view=view, blocks=data.calib, max_tokens=4096) for c in crits}
    score_s = time.time() - t
    for frac in (0.25, 0.5):
        g = f"{frac:.0%} experts"
        for c in crits:
            add(f"drop by {c}", planners.drop_experts(stats, frac, c, scores=scores[c]), g)
        rnd = []
        for seed in range(3):
            p = planners.drop_experts(stats, frac, "random", seed=seed)
            rnd.append(preview_perplexity(model, view, p, ev).ppl)
        rep = p.report(view)
        rows.append((g, "drop at random (mean of 3 seeds)", rep["params_after"], rep["active_after"], float(np.mean(rnd))))
        add("drop by REAP, global (non-uniform)", planners.drop_experts(stats, frac, "reap", mode="global"), g)
        m = round(8 * (1 - frac))
        for method in ("mc-smoe", "hc-smoe"):
            add(f"merge to {m} by {method}", planners.merge_experts(stats, m, method), g)
            add(f"merge to {m} by {method} + neuron alignment", planners.merge_experts(stats, m, method, align=True), g)
        add(f"slim experts to {1 - frac:.0%} of neurons", planners.slim_experts(stats, 1 - frac), g)
        add(f"drop {round(4 * frac)} MoE sub-layers (Layer Drop)", planners.drop_layers(stats, round(4 * frac)), g)
    corr = {c: [spearman(scores[c][i], scores["ablation"][i]) for i in range(len(view))] for c in crits[:-1]}
    rs = np.random.default_rng(0)
    corr["random"] = [float(np.mean([spearman(rs.random(8), scores["ablation"][i]) for _ in range(200)]))
                      for i in range(len(view))]
    lines = [f"Demo model, evaluation split capped at 8,192 tokens per domain ({ev.tokens:,} tokens in blocks of 256), "
             f"statistics from {stats.info['tokens']:,} calibration tokens. Original perplexity **{base.ppl:.3f}** with "
             f"{sum(p.numel() for p in model.parameters()):,} parameters. Reconstruction and ablation scores took "
             f"{score_s:.0f} s together on 4,096 calibration tokens.", "",
             "| budget | plan | parameters | active / token | perplexity | vs original |", "|---|---|---|---|---|---|"]
    for g, name, p, a, ppl in rows:
        lines.append(f"| {g} | {name} | {p:,} | {a:,} | {ppl:.3f} | {ppl / base.ppl - 1:+.1%} |")
    lines += ["", "Spearman rank correlation of each cheap criterion with ablation Δloss (per layer, then mean):", "",
              "| criterion | " + " | ".join(f"layer {i}" for i in range(len(view))) + " | mean |",
              "|---|" + "---|" * (len(view) + 1)]
    for c, v in corr.items():
        lines.append(f"| {c} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {np.mean(v):.2f} |")
    text = "\n".join(lines)
    (DOCS / "compression_table.md").write_text(text + "\n")
    (DOCS / "compression_table.json").write_text(json.dumps({"rows": rows, "corr": corr, "base": base.ppl}, indent=1))
    return text


def distill(budget_s: float = 290.0) -> str:
    model, tok, view = load_model(device="cpu")
    data = load_data(tok, "demo", block_len=256)
    ev = data.eval.limit(4096)
    calib = data.calib
    stats = collect_stats(model, view, calib.limit(8192))
    plan = planners.drop_experts(stats, 0.5, "reap")
    teacher = perplexity(model, ev).ppl
    cfg = DistillConfig(steps=10_000, eval_every=10, lr=1e-3, batch_size=8, warmup=5, seed=0)
    d = Distiller.from_plan(model, view, plan, calib, ev, cfg)
    t0 = time.time()
    curve = []
    for e in d.run():
        if e.ppl is not None:
            curve.append((e.step, round(e.elapsed, 1), e.ppl))
            print(f"step {e.step:4d} {e.elapsed:6.1f}s ppl {e.ppl:.3f}", flush=True)
        if time.time() - t0 > budget_s and e.kind in ("step", "eval"):
            d.stop()
    rec = (d.initial_ppl - d.best_ppl) / (d.initial_ppl - teacher)
    steps_done = d.step
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot([c[1] for c in curve], [c[2] for c in curve], marker="o", label="student (50% experts dropped, REAP)")
        ax.axhline(teacher, color="k", ls="--", label=f"teacher {teacher:.2f}")
        ax.set_xlabel("seconds of distillation (2 CPU cores)")
        ax.set_ylabel("held-out perplexity")
        ax.legend()
        fig.tight_layout()
        fig.savefig(DOCS / "distill_curve.png", dpi=100)
    except ImportError:
        pass
    # one-shot against progressive, and distilled against from scratch, at equal token budgets
    n = 60
    small = DistillConfig(steps=2 * n, eval_every=n, lr=1e-3, batch_size=8, warmup=5, seed=0)
    one = Distiller.from_plan(model, view, plan, calib, ev, small)
    list(one.run())
    prog = list(progressive(model, view, drop_schedule([0.75, 0.5], "reap"), [n, n], calib, ev,
                            DistillConfig(eval_every=n, lr=1e-3, batch_size=8, warmup=5, seed=0)))
    prog_best = min(e.ppl for e in prog if e.ppl is not None and e.stage == 1)
    scratch = _from_scratch(one.student, calib, ev, 2 * n, tok)
    tokens = 2 * n * 8 * 255
    text = "\n".join([
        f"Demo model with 50% of its experts dropped by REAP in every layer (8 → 4), then distilled from the original "
        f"(forward KL on logits, τ = 1, AdamW lr 1e-3, batch 8 × 256, all parameters trained) on the calibration "
        f"split; perplexity on {ev.tokens:,} held-out evaluation tokens.", "",
        "| | perplexity |", "|---|---|",
        f"| teacher (original) | {teacher:.3f} |",
        f"| after the cut, before distillation | {d.initial_ppl:.3f} |",
        f"| after {steps_done} steps ({d.elapsed:.0f} s on 2 CPU cores) | {d.best_ppl:.3f} |",
        f"| share of the lost perplexity recovered | **{rec:.0%}** |", "",
        "![distillation curve](distill_curve.png)", "",
        f"Equal token budget of {tokens:,} tokens ({2 * n} steps of 8 × 256):", "",
        "| method | perplexity |", "|---|---|",
        f"| one-shot: drop to 50%, distill {2 * n} steps | {one.best_ppl:.3f} |",
        f"| progressive: drop to 75%, distill {n}; drop to 50%, distill {n} | {prog_best:.3f} |",
        f"| same 4-expert architecture trained from scratch (LM loss) | {scratch:.3f} |",
    ])
    (DOCS / "distill_table.md").write_text(text + "\n")
    (DOCS / "distill_curve.json").write_text(json.dumps({"curve": curve, "teacher": teacher, "initial": d.initial_ppl,
                                                         "best": d.best_ppl, "recovered": rec}, indent=1))
    return text


def _from_scratch(student, calib, ev, steps: int, tok) -> float:
    """The student's architecture, freshly initialised, trained with the LM loss on the same tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(student.config)
    opt = torch.optim.AdamW(fresh.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    fresh.train()
    for s in range(steps):
        rows = torch.randint(0, len(calib), (8,), generator=g)
        b = calib.subset(rows)
        out = fresh(input_ids=b.input_ids, labels=b.input_ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    fresh.eval()
    return perplexity(fresh, ev).ppl


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["compression", "distill"])
    a = ap.parse_args()
    DOCS.mkdir(exist_ok=True)
    print(compression() if a.which == "compression" else distill())
