"""How closely a preview matches the applied model in bfloat16, against the same comparison in float32.

    python bench/bf16_agreement.py            # the bundled demo, three plans, 4,096 evaluation tokens per domain

The preview runs the unmodified model with the plan's edits; the applied model is plain transformers on the smaller
weights. In float32 they agree to about 1e-6. In bfloat16 their matrix products differ in shape (a router with
fewer rows, merged experts), so rounding differs; where a token's top-k is nearly tied, the two may route it to
different experts and that token's logits differ by whole units, while perplexity over many tokens barely moves.
Printed per plan and dtype: relative perplexity difference, the largest logit difference, the share of positions
whose logits differ by more than 0.25 (bf16 spacing near 4 is 0.03), and the share whose most likely next token differs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer import load_data, load_model, perplexity  # noqa: E402
from explorer import planners  # noqa: E402
from explorer.apply import apply_plan  # noqa: E402
from explorer.preview import preview_perplexity, previewing  # noqa: E402
from explorer.stats import collect_stats  # noqa: E402


def agreement(model, view, plan, blocks, stats) -> dict:
    prev = preview_perplexity(model, view, plan, blocks, stats=stats)
    new, _, _ = apply_plan(model, view, plan, stats=stats)
    applied = perplexity(new, blocks)
    few = blocks.subset(range(min(8, len(blocks))))
    mask = few.attention_mask().bool()
    with torch.inference_mode():
        with previewing(model, view, plan, stats):
            a = model(input_ids=few.input_ids, attention_mask=few.attention_mask()).logits.float()[mask]
        b = new(input_ids=few.input_ids, attention_mask=few.attention_mask()).logits.float()[mask]
    d = (a - b).abs().amax(-1)
    return {"ppl_rel": abs(prev.ppl / applied.ppl - 1), "max_logit": float(d.max()),
            "share_over": float((d > 0.25).float().mean()),
            "argmax_differs": float((a.argmax(-1) != b.argmax(-1)).float().mean()), "positions": int(d.numel())}


def main() -> None:
    rows = []
    for dtype in ("float32", "bf16"):
        model, tok, view = load_model(None, dtype=dtype, device="cpu")
        ds = load_data(tok, "demo", block_len=256, max_tokens=4096)
        stats = collect_stats(model, view, ds.calib)
        plans = {"drop 25% (reap)": planners.drop_experts(stats, 0.25, "reap"),
                 "merge to 6 (mc-smoe)": planners.merge_experts(stats, 6, "mc-smoe"),
                 "slim to 50%": planners.slim_experts(stats, 0.5)}
        for name, plan in plans.items():
            r = agreement(model, view, plan, ds.eval, stats)
            rows.append((dtype, name, r))
            print(f"{dtype:8} {name:22} perplexity rel. diff {r['ppl_rel']:.1e}  max |logit diff| {r['max_logit']:.3f}  "
                  f"positions > 0.25: {r['share_over']:.2%}  argmax differs: {r['argmax_differs']:.2%}  "
                  f"({r['positions']} positions)", flush=True)


if __name__ == "__main__":
    main()
