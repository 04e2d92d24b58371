"""Perplexity over fixed-length blocks: exp(mean NLL), with bits per byte, per domain; padding never scored."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import processes
from .data import DataError, TokenBlocks
from .layerwise import forward_batches


def fmt_ppl(x: float | None) -> str:
    """A perplexity for people: 3 decimals while readable, scientific once a run has exploded."""
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "infinite"
    return f"{x:.3f}" if abs(x) < 1e5 else f"{x:.3g}"


def fmt_change(ratio_minus_one: float, digits: int = 1) -> str:
    """A relative change for people: '+3.1%', '-0.4%', and '±0.0%' rather than '-0.0%'."""
    text = f"{ratio_minus_one:+.{digits}%}"
    return "±" + text[1:] if float(text[1:-1]) == 0 else text


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean NLL per token, nats
    bpb: float  # bits per UTF-8 byte of the scored text
    tokens: int
    block_len: int
    blocks: int
    per_domain: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"perplexity {fmt_ppl(self.ppl)}  bits/byte {self.bpb:.4f}  ({self.tokens:,} tokens in {self.blocks} "
                f"blocks of {self.block_len})")


def block_nll(model, blocks: TokenBlocks, batch_size: int = 8,
              progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and scored-token count per block (float64, on the CPU); the model in memory or layer by layer."""
    sums, counts = [], []
    with torch.inference_mode():
        for _, b, logits in forward_batches(model, blocks.batches(batch_size), progress=progress):
            ids = b.input_ids.to(logits.device)
            am = b.attention_mask().to(logits.device)
            lp = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
            valid = am[:, 1:].bool()
            sums.append((lp * valid).sum(1).double().cpu())
            counts.append(valid.sum(1).cpu())
    return torch.cat(sums), torch.cat(counts)


def summarise(blocks: TokenBlocks, nll: torch.Tensor, count: torch.Tensor) -> Perplexity:
    def one(mask):
        n = int(count[mask].sum())
        s = float(nll[mask].sum())
        nb = float(blocks.n_bytes[mask].sum())
        mean = s / max(n, 1)
        return {"ppl": math.exp(mean), "nll": mean, "bpb": s / math.log(2) / max(nb, 1.0), "tokens": n,
                "blocks": int(mask.sum())}

    allm = torch.ones(len(blocks), dtype=torch.bool)
    tot = one(allm)
    per = {}
    if len(blocks.domains) > 1:
        for d, name in enumerate(blocks.domains):
            m = blocks.domain == d
            if m.any():
                per[name] = one(m)
    return Perplexity(tot["ppl"], tot["nll"], tot["bpb"], tot["tokens"], blocks.block_len, len(blocks), per)


def perplexity(model, blocks: TokenBlocks, batch_size: int = 8, progress=None) -> Perplexity:
    """Perplexity of ``model`` on ``blocks``; compare two models only on the same blocks."""
    if blocks.tokens < 1:
        raise DataError("text too short to evaluate: no token has a preceding token to predict it from")
    if processes.group() is None:
        nll, count = block_nll(model, blocks, batch_size, progress)
    else:  # under torchrun each process scores a contiguous share of the batches; every process gets every block
        mine = processes.share(-(-len(blocks) // batch_size))
        idx = range(mine.start * batch_size, min(mine.stop * batch_size, len(blocks)))
        part = block_nll(model, blocks.subset(idx), batch_size, progress if processes.is_main() else None) \
            if len(idx) else (torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
        parts = processes.gather(part)
        nll, count = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    out = summarise(blocks, nll, count)
    if not math.isfinite(out.nll):
        raise FloatingPointError("the model produced non-finite log-likelihoods (NaN/inf weights?)")
    return out
