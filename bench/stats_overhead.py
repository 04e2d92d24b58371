"""Plain forward pass against the hooked statistics pass, same model, same tokens, one run.

Prints tokens/s of both and the ratio (stats time / plain time) last. Goal: at most 1.05. The statistics read no
logits, so their pass skips the LM head (a quarter of the demo's forward, 2-9% of real MoE models'). Beside it, the
same pass without the observer (same expert kernels, no head): stats / that is what the observer itself costs,
whatever transformers' own expert kernel does on this machine (its CPU grouped_mm runs at one of two speeds from
one process to the next here).
  python bench/stats_overhead.py                      # the demo model on the CPU (its calibration blocks)
  python bench/stats_overhead.py --olmoe --device cuda --seq 2048  # OLMoE-1B-7B-shaped, bf16, 8 x 2048, grouped_mm
  --path loop|grouped forces how the statistics pass runs the experts (default auto: grouped on CUDA, loop on CPU)
"""
from __future__ import annotations

import torch

from _common import bench_args, model_and_blocks, timed

from explorer import collect_stats, planners
from explorer.layerwise import forward_batches
from explorer.preview import previewing
from explorer.kernels import expert_path


def main() -> None:
    args = bench_args(blocks=(int, 32), repeats=(int, 9), dense_sample=(int, 16), path=(str, "auto"))
    model, view, blocks, what = model_and_blocks(args, args.blocks)
    path = expert_path(args.path)  # auto: grouped matmul + segment sums on CUDA, the expert loop on CPU
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else None

    def plain():
        with torch.inference_mode():
            for b in blocks.batches(args.batch):
                model(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask().to(dev), use_cache=False)

    def stats():
        with path:
            collect_stats(model, view, blocks, batch_size=args.batch, dense_sample=args.dense_sample)

    with path:
        plan = planners.drop_experts(collect_stats(model, view, blocks.subset(range(2)), batch_size=args.batch),
                                     0.25, "frequency")

    def through_view():  # what the statistics pass runs, less the observer: the explorer's kernels, no LM head
        with path, torch.inference_mode(), view.patched(lambda lay, hs: lay.forward(hs)):
            for _ in forward_batches(model, blocks.batches(args.batch), logits=False):
                pass

    def preview():  # the same forward with a 25% drop previewed as routing masks (MoELayer.forward)
        with path, previewing(model, view, plan):
            plain()

    tokens = int(blocks.lengths.sum())
    t_plain, t_stats, t_prev, t_view = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all alike
        t_plain.append(timed(plain, 1, sync))
        t_stats.append(timed(stats, 1, sync))
        t_prev.append(timed(preview, 1, sync))
        t_view.append(timed(through_view, 1, sync))
    p, s, v, w = min(t_plain), min(t_stats), min(t_prev), min(t_view)  # best of N: the least disturbed run of each
    pairs = sorted(b / a for a, b in zip(t_plain, t_stats))
    own = sorted(b / a for a, b in zip(t_view, t_stats))
    print(f"{what} on {dev}: {tokens:,} tokens per pass, batch {args.batch} x {args.seq}, best of {args.repeats}, "
          f"expert path {args.path}")
    print(f"plain forward   {tokens / p:12,.0f} tokens/s")
    print(f"statistics pass {tokens / s:12,.0f} tokens/s")
    print(f"preview (25% drop as masks) {tokens / v:12,.0f} tokens/s; ratio preview / plain: {v / p:.3f}")
    print(f"the same pass without the observer (explorer kernels, no LM head) {tokens / w:12,.0f} tokens/s; "
          f"stats / that: {s / w:.3f} best of {args.repeats}, {own[len(own) // 2]:.3f} median pair "
          f"(what the observer costs)")
    print(f"median of the {len(pairs)} interleaved pair ratios: {pairs[len(pairs) // 2]:.3f}")
    print(f"ratio (stats / plain time, best of {args.repeats} each): {s / p:.3f}")


if __name__ == "__main__":
    main()
