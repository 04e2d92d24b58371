"""MTP distillation (SlimQwen) measured on a tiny DeepSeek-V3-family model trained here with its MTP head
(docs/RESULTS.md §7c). About 10 minutes on 2 CPU cores.

    python bench/mtp_distill.py

A DeepSeek-V3-shaped model at a tiny width (3 decoder layers, the first dense, 8 routed experts in 2 groups, one
shared expert, one MTP module) is trained from scratch on the demo corpus with DeepSeek-V3's objective (next token +
0.3 x the MTP head's t+2 loss). Half its routed experts are then dropped by REAP and the student distilled from it
for the same steps, two ways, two seeds each: the main model alone (its MTP head copied from the teacher and left as
it is), and the main model plus its MTP head distilled from the teacher's head. Printed: held-out perplexity of the
main model, and of the MTP head its draft accuracy (top-1 of t+2, what a speculative decoder accepts one draft deep,
± its binomial standard error) and its t+2 perplexity.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoTokenizer  # noqa: E402

from explorer import mtp, planners  # noqa: E402
from explorer.apply import apply_plan  # noqa: E402
from explorer.assets import DEMO_MODEL  # noqa: E402
from explorer.data import load_data  # noqa: E402
from explorer.moe import MoEModel  # noqa: E402
from explorer.perplexity import perplexity  # noqa: E402
from explorer.stats import collect_stats  # noqa: E402
from explorer.tiny import tiny_model  # noqa: E402

TRAIN_STEPS, DISTIL_STEPS = 400, 150


def main() -> None:
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = tiny_model("deepseek_v3", seed=0, vocab_size=len(tok), num_nextn_predict_layers=1).float()
    data = load_data(tok, "demo", block_len=128, max_tokens=16384)
    ev = data.eval.limit(2048)
    head = mtp.new_head(model)
    losses = mtp.train_with_head(model, head, data.calib, steps=TRAIN_STEPS)
    print(f"teacher trained {TRAIN_STEPS} steps of 8 x 128 (loss {losses[0]:.2f} -> {losses[-1]:.2f}): perplexity "
          f"{perplexity(model, ev).ppl:.2f}, MTP head {mtp.head_quality(model, head, ev)}")
    view = MoEModel(model)
    plan = planners.drop_experts(collect_stats(model, view, data.calib.limit(4096)), 0.5, "reap")
    cut, _, _ = apply_plan(model, view, plan)
    print(f"cut ({plan.describe()}): perplexity {perplexity(cut, ev).ppl:.2f}, MTP head "
          f"{mtp.head_quality(cut, mtp.student_head(head, cut), ev)}")
    print(f"\n| distilled ({DISTIL_STEPS} steps) | seed | perplexity | MTP draft accuracy | MTP perplexity |")
    print("|---|---:|---:|---:|---:|")
    for name, w in (("main model only", 0.0), ("main model + MTP head", 1.0)):
        for seed in (0, 1):
            student, _, _ = apply_plan(model, view, plan)
            sh = mtp.student_head(head, student)
            mtp.distil(model, head, student, sh, data.calib, steps=DISTIL_STEPS, seed=seed, mtp_weight=w)
            q = mtp.head_quality(student, sh, ev)
            print(f"| {name} | {seed} | {perplexity(student, ev).ppl:.2f} | {q.accuracy:.2%} ± {q.accuracy_se:.2%} | "
                  f"{q.ppl:.2f} |", flush=True)


if __name__ == "__main__":
    main()
