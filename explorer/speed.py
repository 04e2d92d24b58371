"""What a plan buys at inference, measured: prefill and decode speed and memory of the applied model against the
original, in the same run.

Unified-MoE-Compression reports its cuts in speed and memory as much as in quality; the explorer measures the same
three figures with transformers' own kernels on the machine it runs on: prefill tokens/s (a batch of full blocks,
no cache), decode tokens/s at batch 1 and at a larger batch (greedy generation with the KV cache), and memory: the
weights held (exact) plus what decoding at the larger batch adds at its peak (on CUDA the allocator's peak; on a
CPU the resident set sampled every half millisecond, above what it was before the run). Each figure of a plan is a ratio to the original's,
from interleaved runs (original, plan, original, plan, ...): the median of the per-pair ratios, with the spread of
the pairs as its uncertainty, since timings on a shared machine drift.

What transformers' kernels cannot turn into speed is said beside the figure rather than shown as a win
(``limits``): a dropped or merged expert saves memory, not FLOPs per token (every token still runs top-k experts);
quantised experts compute dequantised; pruned weights are multiplied like any other.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from .devices import input_device

PROMPT = 16  # prompt tokens for the decode runs
NEW = 32  # tokens generated per decode run


@dataclass
class Speed:
    """One model's figures (``tokens/s``, bytes)."""

    prefill: float  # prompt tokens/s: ``batch`` blocks of ``block_len`` tokens, one forward, no cache
    decode_1: float  # generated tokens/s at batch 1
    decode_b: float  # generated tokens/s at batch ``batch`` (all rows together)
    weight_bytes: int  # parameters and buffers held
    peak_bytes: int  # weights + what decoding at ``batch`` adds at its peak (KV cache, activations)
    batch: int
    block_len: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SpeedRatio:
    """A plan's figures as ratios to the original's (> 1: faster, or more memory), each with the spread of the
    interleaved pairs (half the range of the pair ratios)."""

    prefill: float
    decode_1: float
    decode_b: float
    weights: float
    peak: float
    spread: dict = field(default_factory=dict)  # figure -> half-range of its pair ratios
    original: dict = field(default_factory=dict)  # the original's Speed (median run), as a dict
    plan: dict = field(default_factory=dict)
    limits: list[str] = field(default_factory=list)
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        """'prefill 1.32x ± 0.03, decode 1.05x ± 0.04 (batch 1) / 1.10x ± 0.02 (batch 8), weights 0.75x'."""
        s = self.spread
        return (f"prefill {self.prefill:.2f}x ± {s.get('prefill', 0):.2f}, decode {self.decode_1:.2f}x ± "
                f"{s.get('decode_1', 0):.2f} (batch 1) / {self.decode_b:.2f}x ± {s.get('decode_b', 0):.2f} "
                f"(batch {self.original.get('batch', '?')}), weights {self.weights:.2f}x, peak memory "
                f"{self.peak:.2f}x ± {s.get('peak', 0):.2f}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _peak_added(fn, device) -> int:
    """Bytes ``fn`` adds at its peak: CUDA's allocator peak above what was allocated before; on a CPU the resident
    set, sampled every half millisecond by a thread, above its level before (0 where /proc is absent)."""
    import threading

    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    try:
        before = _rss()
    except OSError:
        fn()
        return 0
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(0, max(peak[0], _rss()) - before)


def _timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def measure(model, blocks, batch: int = 8, new_tokens: int = NEW) -> Speed:
    """One run of the three figures on ``model`` with token ids from ``blocks`` (real text)."""
    device = input_device(model)
    ids = blocks.input_ids[:batch].to(device)
    if ids.shape[0] < batch:
        ids = ids.repeat(-(-batch // ids.shape[0]), 1)[:batch]
    prompt = ids[:, :PROMPT]
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else 0
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    with torch.inference_mode():
        t_pre = _timed(lambda: model(input_ids=ids, use_cache=False), device)
        t_1 = _timed(lambda: model.generate(prompt[:1], attention_mask=torch.ones_like(prompt[:1]), **gen), device)
        t_b = _timed(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), **gen), device)
        added = _peak_added(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), **gen), device)
    weights = _weight_bytes(model)
    return Speed(prefill=ids.numel() / t_pre, decode_1=new_tokens / t_1, decode_b=batch * new_tokens / t_b,
                 weight_bytes=weights, peak_bytes=weights + added, batch=batch, block_len=ids.shape[1])


def compare(original, cut, blocks, repeats: int = 5, batch: int = 8, new_tokens: int = NEW,
            limits: list[str] | None = None) -> SpeedRatio:
    """``cut``'s figures against ``original``'s, interleaved ``repeats`` times after one warm-up run of each."""
    measure(original, blocks, batch, 4), measure(cut, blocks, batch, 4)  # warm-up: first-call costs, caches
    pairs = [(measure(original, blocks, batch, new_tokens), measure(cut, blocks, batch, new_tokens))
             for _ in range(repeats)]
    out, spread = {}, {}
    for k in ("prefill", "decode_1", "decode_b", "peak_bytes"):
        r = [getattr(b, k) / getattr(a, k) for a, b in pairs]
        out[k], spread[k.replace("_bytes", "")] = statistics.median(r), (max(r) - min(r)) / 2
    a0, b0 = pairs[0]
    mid = sorted(range(repeats), key=lambda i: pairs[i][0].decode_1)[repeats // 2]
    return SpeedRatio(prefill=out["prefill"], decode_1=out["decode_1"], decode_b=out["decode_b"],
                      weights=b0.weight_bytes / a0.weight_bytes, peak=out["peak_bytes"], spread=spread,
                      original=pairs[mid][0].to_dict(), plan=pairs[mid][1].to_dict(), limits=list(limits or []),
                      device=str(input_device(original)))


def limits(plan, view) -> list[str]:
    """What this plan cannot buy in transformers' kernels, in words, as each of its operations says
    (``Operation.speed_limit``); shown beside its measured figures."""
    from .ops import OPS

    out = []
    for name, spec in plan.ops.items():
        said = OPS[name].speed_limit(spec)
        if said and said not in out:
            out.append(said)
    return out


def speed_of_plan(model, view, plan, blocks, stats=None, repeats: int = 5, batch: int = 8) -> SpeedRatio:
    """The applied ``plan`` (in memory) against ``model``; the applied copy is freed afterwards."""
    from .apply import apply_plan

    cut, _, _ = apply_plan(model, view, plan, stats=stats)
    cut.eval()
    try:
        return compare(model, cut, blocks, repeats=repeats, batch=batch, limits=limits(plan, view))
    finally:
        del cut
