"""What each cut of docs/RESULTS.md §1 buys at inference on this machine: prefill and decode speed and memory of the
applied plan against the original, in the same run (docs/RESULTS.md §6).

    python bench/plan_speed.py [--repeats 7] [--device cpu|cuda]

Each figure is the median ratio of interleaved runs (original, plan, original, plan, ...) ± half the range of the
pairs; > 1 is faster. Prefill: 8 blocks of 256 tokens, one forward, no cache. Decode: 32 greedy tokens after a
16-token prompt, at batch 1 and batch 8, with the KV cache. Memory: the weights held plus what decoding at batch 8
adds at its peak. What transformers' kernels cannot turn into speed is said in the last column.

The bound beside each figure: a cut cannot make a token faster than the share of its work it removes, the active
parameters per token before over after (the matrix products a token runs; attention's terms that grow with the
sequence aside). Dropping or merging experts removes none (top-k still runs k experts): its bound is 1.00x, and
its weights ratio is its memory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer import load_data, load_model, planners  # noqa: E402
from explorer.plan import Plan  # noqa: E402
from explorer.speed import speed_of_plan  # noqa: E402
from explorer.stats import collect_stats  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model, tok, view = load_model(None, device=args.device)
    ds = load_data(tok, "demo", block_len=256, max_tokens=8192)
    stats = collect_stats(model, view, ds.calib)
    cuts = []
    for frac in (0.25, 0.5):
        m = round(8 * (1 - frac))
        cuts += [
            (f"drop {frac:.0%} of experts by REAP (uniform)", planners.drop_experts(stats, frac, "reap")),
            (f"drop {frac:.0%} of experts by REAP (global)", planners.drop_experts(stats, frac, "reap", mode="global")),
            (f"merge to {m} by mc-smoe + alignment", planners.merge_experts(stats, m, "mc-smoe", align=True)),
            (f"slim experts to {1 - frac:.0%} of neurons", planners.slim_experts(stats, 1 - frac)),
            (f"Layer Drop: {round(4 * frac)} MoE sub-layers", planners.drop_layers(stats, round(4 * frac))),
        ]
    cuts += [("Block Drop: 1 decoder block", Plan(drop_blocks=[2])),
             ("quantise experts to 4-bit (g64)", Plan.loads('{"quantise": {"bits": 4, "group_size": 64}}')),
             ("prune 50% (moe-pruner)", planners.make("prune_weights", stats, view, sparsity=0.5)),
             ("prune 2:4 (moe-pruner)", planners.make("prune_weights", stats, view, sparsity=0.5, nm=[2, 4]))]
    print("| cut | weights | bound (active params) | prefill | decode, batch 1 | decode, batch 8 | peak memory | "
          "what the kernels cannot speed up |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    first = None
    for name, plan in cuts:
        r = speed_of_plan(model, view, plan, ds.eval, stats=stats, repeats=args.repeats)
        first = first or r
        s = r.spread
        rep = plan.report(view)
        bound = rep["active_before"] / rep["active_after"]
        print(f"| {name} | {r.weights:.2f}x | {bound:.2f}x | {r.prefill:.2f}x ± {s['prefill']:.2f} | {r.decode_1:.2f}x ± "
              f"{s['decode_1']:.2f} | {r.decode_b:.2f}x ± {s['decode_b']:.2f} | {r.peak:.2f}x ± {s['peak']:.2f} | "
              f"{'; '.join(r.limits)} |", flush=True)
    o = first.original
    print(f"\noriginal on {first.device}: prefill {o['prefill']:,.0f} tokens/s, decode {o['decode_1']:,.0f} tokens/s "
          f"(batch 1), {o['decode_b']:,.0f} tokens/s (batch {o['batch']}), weights {o['weight_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
