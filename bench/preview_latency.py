"""Time from a plan to its preview perplexity, against a plain evaluation pass of the same tokens, one run.

Prints both and the ratio (preview / plain) last. Bar: at most 1.2.
  python bench/preview_latency.py [--fraction 0.25] [--criterion reap]
"""
from __future__ import annotations

import argparse

import torch

from _common import timed

from explorer import collect_stats, load_data, load_model, perplexity, planners
from explorer.preview import preview_perplexity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--criterion", default="reap")
    ap.add_argument("--block-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens per domain")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model, tok, view = load_model(device="cuda" if torch.cuda.is_available() else "cpu")
    data = load_data(tok, "demo", block_len=args.block_len, max_tokens=args.max_tokens)
    stats = collect_stats(model, view, data.calib)
    ev = data.eval

    def plain():
        perplexity(model, ev)

    def plan_to_preview():  # the user's click: write the plan, validate it, evaluate it
        plan = planners.drop_experts(stats, args.fraction, args.criterion)
        return preview_perplexity(model, view, plan, ev)

    tp, tv = [], []
    for _ in range(args.repeats):  # interleaved against drifting machine load
        tp.append(timed(plain, 1))
        tv.append(timed(plan_to_preview, 1))
    p, v = min(tp), min(tv)  # best of N each: the least disturbed runs (shared machines are noisy)
    res = plan_to_preview()
    print(f"demo model, {ev.tokens:,} evaluation tokens, drop {args.fraction:.0%} by {args.criterion}: "
          f"perplexity {perplexity(model, ev).ppl:.3f} -> {res.ppl:.3f}")
    print(f"plain evaluation pass   {p * 1000:8.1f} ms")
    print(f"plan -> preview ppl     {v * 1000:8.1f} ms")
    print(f"ratio (preview / plain): {v / p:.3f}")


if __name__ == "__main__":
    main()
