"""Tokens/s of a distillation step (teacher forward + student forward/backward) against a plain training step of
the student alone, same batch, one run. Prints both, the ratio and peak memory.
  python bench/distill_throughput.py                        # demo model, half its experts dropped, CPU
  python bench/distill_throughput.py --olmoe --device cuda  # OLMoE-1B-7B-shaped, bf16, half the experts dropped
"""
from __future__ import annotations

import resource

import torch

from _common import bench_args, model_and_blocks, timed

from explorer.distill import DistillConfig, Distiller
from explorer.plan import Plan


def main() -> None:
    args = bench_args(repeats=(int, 5))
    teacher, view, blocks, _ = model_and_blocks(args, 64 if not args.olmoe else args.batch * 2)
    plan = Plan(drop_experts={i: list(range(0, n, 2)) for i, n in enumerate(view.num_experts)})
    d = Distiller.from_plan(teacher, view, plan, blocks, blocks.subset([0]),
                            DistillConfig(steps=10**6, batch_size=args.batch, lr=1e-4, eval_every=10**6))
    student = d.student
    dev = next(student.parameters()).device
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    rows = torch.arange(args.batch)
    b = blocks.subset(rows)
    ids, am = b.input_ids.to(dev), b.attention_mask().to(dev)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)

    def plain_step():
        out = student(input_ids=ids, attention_mask=am, labels=ids, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def distill_step():
        loss, *_ = d._losses(rows)
        d.opt.zero_grad(set_to_none=True)
        loss.backward()
        d.opt.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tp, td = [], []
    for _ in range(args.repeats):
        tp.append(timed(plain_step, 1, sync))
        if cuda:
            peak_plain = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        td.append(timed(distill_step, 1, sync))
    p, q = sorted(tp)[len(tp) // 2], sorted(td)[len(td) // 2]
    n = int(am[:, 1:].sum())
    print(f"{'OLMoE-1B-7B-shaped (bf16)' if args.olmoe else 'demo model'} on {dev}, half the experts dropped, "
          f"batch {args.batch} x {args.seq}")
    print(f"plain student training step  {n / p:10,.0f} tokens/s")
    print(f"distillation step            {n / q:10,.0f} tokens/s")
    if cuda:
        print(f"peak GPU memory: plain {peak_plain / 2**30:.2f} GiB, distillation "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        print(f"peak process memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"ratio (distillation / plain step time): {q / p:.3f}")


if __name__ == "__main__":
    main()
