"""Shared set-up for the benchmark scripts: a model to time and reproducible token blocks."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer.data import TokenBlocks  # noqa: E402


def olmoe_1b7b_shaped(dtype=torch.bfloat16, device="cuda", experts_implementation="grouped_mm"):
    """OLMoE-1B-7B's shape (16 layers, 64 experts, top-8, hidden 2048) with random weights."""
    from transformers import AutoModelForCausalLM, OlmoeConfig

    cfg = OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
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
