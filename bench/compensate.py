"""Error-compensating rounding and pruning against the methods they refine, on the bundled demo (docs/RESULTS.md).

    python bench/compensate.py

GPTQ against round-to-nearest at 3 and 4 bits (groups of 64), and SparseGPT against Wanda and MoE-Pruner at 50%
unstructured and 2:4, every plan previewed on the evaluation split. Each perplexity carries its standard error over
blocks; each change is paired block by block (against the original, and between the two methods of a row), with one
standard error. Statistics and each expert's input Hessians from 8,192 calibration tokens per domain.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer import load_data, load_model, perplexity  # noqa: E402
from explorer.hessians import add_hessians  # noqa: E402
from explorer.perplexity import change, fmt_ppl_se  # noqa: E402
from explorer.planners.prune import prune_weights  # noqa: E402
from explorer.planners.quantise import quantise_plan  # noqa: E402
from explorer.preview import preview_perplexity  # noqa: E402
from explorer.stats import collect_stats  # noqa: E402

GROUP = 64


def _pct(c) -> str:
    return f"{c.ratio:+.2%} ± {c.se:.2%}" if c.se == c.se else f"{c.ratio:+.2%}"


def main() -> None:
    model, tok, view = load_model(None, device="cpu")
    ds = load_data(tok, "demo", block_len=256, max_tokens=8192)
    stats = collect_stats(model, view, ds.calib)
    t = time.perf_counter()
    add_hessians(stats, model, view, ds.calib)
    print(f"Hessians of {sum(view.num_experts)} experts on {ds.calib.tokens:,} calibration tokens: "
          f"{time.perf_counter() - t:.1f}s")
    base = perplexity(model, ds.eval)
    print(f"original: perplexity {fmt_ppl_se(base.ppl, base.se)} on {base.tokens:,} evaluation tokens\n")
    print("| cut | baseline method | its perplexity | change | refined method | its perplexity | change | "
          "refined vs baseline (paired) |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    rows = [(f"experts to {b}-bit (g{GROUP})", "round-to-nearest", quantise_plan(stats, view, bits=b, group_size=GROUP),
             "GPTQ", quantise_plan(stats, view, bits=b, group_size=GROUP, method="gptq")) for b in (3, 4)]
    for nm, what in ((None, "50% of expert weights"), ([2, 4], "2:4 in expert weights")):
        sgpt = prune_weights(stats, 0.5, "sparsegpt", nm)
        rows += [(what, m, prune_weights(stats, 0.5, m, nm), "SparseGPT", sgpt) for m in ("wanda", "moe-pruner")]
    for cut, a_name, a_plan, b_name, b_plan in rows:
        a = preview_perplexity(model, view, a_plan, ds.eval, stats=stats)
        b = preview_perplexity(model, view, b_plan, ds.eval, stats=stats)
        print(f"| {cut} | {a_name} | {fmt_ppl_se(a.ppl, a.se)} | {_pct(change(base, a))} | {b_name} | "
              f"{fmt_ppl_se(b.ppl, b.se)} | {_pct(change(base, b))} | {_pct(change(a, b))} |")


if __name__ == "__main__":
    main()
