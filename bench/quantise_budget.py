"""Bits by importance against uniform bits at the same bytes, on the bundled demo (docs/RESULTS.md).

    python bench/quantise_budget.py

For each uniform width (2, 3, 4 bits, groups of 64), the budget planner gets exactly the bytes the uniform plan's
experts take and chooses 2, 3, 4 or 8 bits per expert (MC-MoE's allocation: Σ importance × measured error under
the budget, importance by REAP or by frequency). Printed: preview perplexity of each on the evaluation split, bytes
of the routed experts, and the average bits per weight (scales included).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer import load_data, load_model, perplexity  # noqa: E402
from explorer.ops.quantise import bits_per_weight  # noqa: E402
from explorer.planners.quantise import quantise_plan  # noqa: E402
from explorer.preview import preview_perplexity  # noqa: E402
from explorer.stats import collect_stats  # noqa: E402

GROUP = 64


def main() -> None:
    model, tok, view = load_model(None, device="cpu")
    ds = load_data(tok, "demo", block_len=256, max_tokens=8192)
    stats = collect_stats(model, view, ds.calib)
    base = perplexity(model, ds.eval)
    weights = sum(lay.expert_weight_params() * lay.num_experts for lay in view)
    print(f"demo: perplexity {base.ppl:.3f} on {base.tokens:,} evaluation tokens; routed expert weights {weights:,} "
          f"({2 * weights / 2**20:.2f} MiB in bf16)")
    print(f"{'experts at':<28} {'MiB':>6} {'bits/w':>7} {'perplexity':>11}")
    for bits in (2, 3, 4):
        budget = weights * bits_per_weight(bits, GROUP) / 8
        rows = [(f"uniform {bits}-bit", quantise_plan(stats, view, bits=bits, group_size=GROUP))]
        for crit in ("reap", "frequency"):
            rows.append((f"budget, by {crit}", quantise_plan(stats, view, bits=8, group_size=GROUP,
                                                              budget_bytes=budget, criterion=crit)))
        for name, plan in rows:
            spec = plan.op("quantise")
            used = sum(lay.expert_weight_params() * bits_per_weight(
                spec["per_expert"].get(lay.index, {}).get(e, spec["bits"]), GROUP) / 8
                for lay in view for e in range(lay.num_experts))
            ppl = preview_perplexity(model, view, plan, ds.eval).ppl
            print(f"{name:<28} {used / 2**20:6.3f} {8 * used / weights:7.2f} {ppl:11.3f}", flush=True)


if __name__ == "__main__":
    main()
