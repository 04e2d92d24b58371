"""Task accuracy (lm-eval) on the demo: speed of scoring a preview, and accuracy beside perplexity for cuts.

  python bench/task_eval.py              # speed: a 50% expert drop scored as a preview against the model without a
                                         # plan, same tasks, same run (interleaved); ratio preview / plain (bar 1.1)
  python bench/task_eval.py --table      # docs/RESULTS.md §4: criteria and drop / merge / slim at equal size,
                                         # perplexity and each task's accuracy (± standard error)
--limit N items per task (default 200 for speed, all for --table unless given).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer import collect_stats, load_data, load_model, planners  # noqa: E402
from explorer.preview import preview_perplexity, previewing  # noqa: E402
from explorer.saliency import expert_scores  # noqa: E402
from explorer.tasks import evaluate_tasks  # noqa: E402


def speed(model, tok, view, plan, limit: int, repeats: int) -> None:
    t_plain, t_prev, req = [], [], None
    for _ in range(repeats):
        r = evaluate_tasks(model, tok, "demo", limit=limit)
        t_plain.append(r["seconds"])
        req = r["requests"]
        with previewing(model, view, plan):
            t_prev.append(evaluate_tasks(model, tok, "demo", limit=limit)["seconds"])
    p, v = min(t_plain), min(t_prev)
    print(f"demo tasks, {limit} items each ({req:,} requests), best of {repeats}, lm-eval batch 32")
    print(f"no plan  {p:7.1f} s  {req / p:8.1f} requests/s")
    print(f"preview  {v:7.1f} s  {req / v:8.1f} requests/s  (50% of experts dropped by REAP, as masks)")
    print(f"ratio (preview / no plan): {v / p:.3f}")


def table(model, tok, view, limit: int | None) -> None:
    data = load_data(tok, "demo", block_len=256, max_tokens=8192)
    stats = collect_stats(model, view, data.calib)
    crits = ["frequency", "gate-mass", "reap", "reconstruction"]
    scores = {c: expert_scores(stats, c, model=model, view=view, blocks=data.calib, max_tokens=4096) for c in crits}
    plans = [("original", None)]
    plans += [(f"drop 50% by {c}", planners.drop_experts(stats, 0.5, c, scores=scores[c])) for c in crits]
    plans += [("drop 50% at random (seed 0)", planners.drop_experts(stats, 0.5, "random", seed=0)),
              ("merge 8 → 4 by HC-SMoE", planners.merge_experts(stats, 4, "hc-smoe")),
              ("merge 8 → 4 by MC-SMoE", planners.merge_experts(stats, 4, "mc-smoe")),
              ("slim experts to 50% of neurons", planners.slim_experts(stats, 0.5))]
    rows, names = [], None
    for name, plan in plans:
        t = time.time()
        if plan is None:
            from explorer.perplexity import perplexity

            ppl = perplexity(model, data.eval).ppl
            sc = evaluate_tasks(model, tok, "demo", limit=limit)
        else:
            ppl = preview_perplexity(model, view, plan, data.eval, stats=stats).ppl
            with previewing(model, view, plan, stats):
                sc = evaluate_tasks(model, tok, "demo", limit=limit)
        names = names or sorted(sc["tasks"])
        rows.append((name, ppl, sc["tasks"]))
        print(f"{name:<34} ppl {ppl:8.3f} " + " ".join(f"{100 * sc['tasks'][t]['value']:5.1f}" for t in names)
              + f"  ({time.time() - t:.0f}s)", flush=True)
    short = [t.replace("demo_next_line_", "line: ").replace("demo_next_word", "next word") for t in names]
    print("\n| plan | perplexity | " + " | ".join(short) + " |")
    print("|---|---|" + "---|" * len(names))
    for name, ppl, tasks in rows:
        print(f"| {name} | {ppl:.3f} | " + " | ".join(
            f"{100 * tasks[t]['value']:.1f} ± {100 * tasks[t]['stderr']:.1f}" for t in names) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model, tok, view = load_model(device="cpu")
    if args.table:
        table(model, tok, view, args.limit)
        return
    data = load_data(tok, "demo", block_len=256, max_tokens=2048)
    plan = planners.drop_experts(collect_stats(model, view, data.calib), 0.5, "reap")
    speed(model, tok, view, plan, args.limit or 200, args.repeats)


if __name__ == "__main__":
    main()
