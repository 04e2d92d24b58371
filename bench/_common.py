"""Shared set-up for the benchmark scripts: a model to time and reproducible token blocks."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer.data import TokenBlocks  # noqa: E402


def olmoe_1b7b_shaped(dtype=torch.bfloat16, device="cuda", experts_implementation="grouped_mm", layers: int = 16):
    """OLMoE-1B-7B's shape (16 layers, 64 experts, top-8, hidden 2048) with random weights; ``layers`` cuts it
    shorter (a CPU check of the per-layer costs)."""
    from transformers import AutoModelForCausalLM, OlmoeConfig

    cfg = OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, experts_implementation=experts_implementation)
    return model.eval()


def random_blocks(n: int, seq: int, vocab: int, seed: int = 0) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    lengths = torch.full((n,), seq)
    return TokenBlocks(ids, lengths, torch.zeros(n, dtype=torch.long), ["random"], (lengths - 1).double(), seq)


def timed(fn, repeats: int, sync=None) -> float:
    """Median wall time of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_args(**extra):
    """The options every benchmark shares (model choice, device, batch shape, repeats), plus ``extra``."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--olmoe", action="store_true", help="OLMoE-1B-7B-shaped random model (bf16 unless --dtype)")
    ap.add_argument("--layers", type=int, default=16, help="with --olmoe: this many of its decoder layers")
    ap.add_argument("--dtype", default="bfloat16", help="with --olmoe: its dtype (float32 on a CPU without bf16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    for name, (typ, default) in extra.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=typ, default=default)
    return ap.parse_args()


def model_and_blocks(args, n_blocks: int):
    """(model, view, blocks, label): the OLMoE-shaped model on random tokens, or the demo on its calibration text."""
    from explorer import load_data, load_model
    from explorer.moe import MoEModel

    if args.olmoe:
        model = olmoe_1b7b_shaped(getattr(torch, args.dtype), args.device, layers=args.layers)
        return (model, MoEModel(model), random_blocks(n_blocks, args.seq, model.config.vocab_size),
                f"OLMoE-1B-7B-shaped ({args.layers} layers, random, {args.dtype}, grouped_mm)")
    model, tok, view = load_model(device=args.device)
    blocks = load_data(tok, "demo", block_len=args.seq).calib.subset(range(n_blocks))
    return model, view, blocks, f"demo model ({model.config._experts_implementation})"
