"""SlimQwen's findings at demo scale (docs/RESULTS.md §7), two experiments on the bundled demo (CPU, ~20 minutes):

    python bench/seed_findings.py converge      # (a) drop, merge and slim at one budget, each distilled alike
    python bench/seed_findings.py progressive   # (b) one-shot against progressive at three token budgets

(a) Half the experts' parameters removed three ways (drop 4 of 8 by REAP, merge to 4 by MC-SMoE with neuron
alignment, slim every expert to 50% of its neurons), each distilled from the original for the same steps and tokens
with two seeds (the seed draws the batches). Printed: held-out perplexity before and after, the spread between the
three methods before and after, and the noise band (the largest difference between a method's two seeds).
(b) One-shot (drop to 50% by REAP, distil 2n steps) against progressive (drop to 75%, distil n; drop to 50%, distil
n) at n = 20, 60 and 180: the same tokens each, seed 0; the noise band of (a) is the yardstick.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer import collect_stats, load_data, load_model, perplexity, planners  # noqa: E402
from explorer.distill import DistillConfig, Distiller, drop_schedule, progressive  # noqa: E402
from explorer.perplexity import fmt_ppl_se  # noqa: E402

CFG = dict(lr=1e-3, batch_size=8, warmup=5)
OUT = Path(__file__).resolve().parent.parent / "docs" / "seed_findings.json"  # read by lesson 4


def _record(key: str, value) -> None:
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data.pop("source", None)  # a transcribed file's provenance line: this run writes its own figures
    data[key] = value
    OUT.write_text(json.dumps(data, indent=1) + "\n")


def _setup():
    model, tok, view = load_model(device="cpu")
    data = load_data(tok, "demo", block_len=256)
    ev = data.eval.limit(4096)
    stats = collect_stats(model, view, data.calib.limit(8192))
    return model, view, data.calib, ev, stats


def converge(steps: int = 150) -> None:
    model, view, calib, ev, stats = _setup()
    teacher = perplexity(model, ev)
    plans = {"drop 4 of 8 (REAP)": planners.drop_experts(stats, 0.5, "reap"),
             "merge to 4 (MC-SMoE + alignment)": planners.merge_experts(stats, 4, "mc-smoe", align=True),
             "slim to 50% of neurons": planners.slim_experts(stats, 0.5)}
    print(f"teacher {fmt_ppl_se(teacher.ppl, teacher.se)} on {ev.tokens:,} held-out tokens; {steps} steps of "
          f"{CFG['batch_size']} x 256 each ({steps * CFG['batch_size'] * 255:,} tokens)")
    print("| method | parameters | before | after, seed 0 | after, seed 1 |")
    print("|---|---:|---:|---:|---:|")
    before, after = {}, {}
    for name, plan in plans.items():
        runs = []
        for seed in (0, 1):
            t = time.time()
            d = Distiller.from_plan(model, view, plan, calib, ev, DistillConfig(steps=steps, eval_every=steps // 3,
                                                                               seed=seed, **CFG), stats=stats)
            list(d.run())
            runs.append(d.best_ppl)
            before[name] = d.initial_ppl
            print(f"  ({name}, seed {seed}: {time.time() - t:.0f}s)", file=sys.stderr)
        after[name] = runs
        print(f"| {name} | {plan.report(view)['params_after']:,} | {before[name]:.3f} | {runs[0]:.3f} | "
              f"{runs[1]:.3f} |", flush=True)
    mean_after = {k: sum(v) / 2 for k, v in after.items()}
    noise = max(abs(v[0] - v[1]) for v in after.values())
    print(f"\nspread between methods: before {max(before.values()) - min(before.values()):.3f}, after (mean of seeds) "
          f"{max(mean_after.values()) - min(mean_after.values()):.3f}; noise band (largest seed difference) "
          f"{noise:.3f}")
    _record("converge", {"steps": steps, "tokens": steps * CFG["batch_size"] * 255, "teacher": teacher.ppl,
                         "before": before, "after": after, "noise": noise})


def progressive_vs_one_shot(ns=(20, 60, 180)) -> None:
    model, view, calib, ev, stats = _setup()
    plan = planners.drop_experts(stats, 0.5, "reap")
    print("| steps (tokens) | one-shot | progressive | progressive - one-shot |")
    print("|---|---:|---:|---:|")
    rows = []
    for n in ns:
        one = Distiller.from_plan(model, view, plan, calib, ev,
                                  DistillConfig(steps=2 * n, eval_every=max(n // 2, 1), seed=0, **CFG), stats=stats)
        list(one.run())
        prog = list(progressive(model, view, drop_schedule([0.75, 0.5], "reap"), [n, n], calib, ev,
                                DistillConfig(eval_every=max(n // 2, 1), seed=0, **CFG)))
        best = min(e.ppl for e in prog if e.ppl is not None and e.stage == 1)
        print(f"| {2 * n} ({2 * n * CFG['batch_size'] * 255:,}) | {one.best_ppl:.3f} | {best:.3f} | "
              f"{best - one.best_ppl:+.3f} |", flush=True)
        rows.append({"steps": 2 * n, "tokens": 2 * n * CFG["batch_size"] * 255, "one_shot": one.best_ppl,
                     "progressive": best})
    _record("progressive", rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["converge", "progressive"])
    a = ap.parse_args()
    converge() if a.which == "converge" else progressive_vs_one_shot()
