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


def fmt_ppl_se(ppl: float | None, se: float | None) -> str:
    """'31.400 ± 0.350': a perplexity with its standard error over blocks (the figure alone where it is unknown)."""
    if se is None or ppl is None or not math.isfinite(ppl) or not math.isfinite(se):
        return fmt_ppl(ppl)
    return f"{fmt_ppl(ppl)} ± {se:.3f}" if abs(ppl) < 1e5 else f"{fmt_ppl(ppl)} ± {se:.2g}"


def _mean_se(sums: torch.Tensor, counts: torch.Tensor, strata: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean NLL per token over blocks (a ratio of sums) and its standard error, blocks as the units sampled within
    each stratum (domain: the evaluation text holds a fixed share of each, so only the spread inside a domain is
    sampling noise): the residuals s_b - m_d·n_b of the delta method for a ratio estimator."""
    s, n = sums.double(), counts.double()
    total = float(n.sum())
    m = float(s.sum()) / max(total, 1.0)
    strata = torch.zeros(len(s), dtype=torch.long) if strata is None else torch.as_tensor(strata)
    var, units = 0.0, 0
    for d in strata.unique():
        k = strata == d
        b = int(k.sum())
        if b < 2:
            continue
        md = float(s[k].sum()) / max(float(n[k].sum()), 1.0)
        r = s[k] - md * n[k]
        var += float((r * r).sum()) * b / (b - 1)
        units += b
    if units < 2 or total <= 0:
        return m, float("nan")
    return m, math.sqrt(var) / total


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean NLL per token, nats
    bpb: float  # bits per UTF-8 byte of the scored text
    tokens: int
    block_len: int
    blocks: int
    per_domain: dict[str, dict] = field(default_factory=dict)
    se: float = float("nan")  # standard error of ``ppl`` over the blocks (nan with a single block)
    block_nll: list[float] = field(default_factory=list, repr=False)  # per block: summed NLL and scored tokens,
    block_tokens: list[int] = field(default_factory=list, repr=False)  # for paired comparisons on the same blocks
    block_domain: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"perplexity {fmt_ppl_se(self.ppl, self.se)}  bits/byte {self.bpb:.4f}  ({self.tokens:,} tokens in "
                f"{self.blocks} blocks of {self.block_len}; ± one standard error over blocks)")


@dataclass
class Change:
    """``b`` against ``a`` on the same blocks: the relative change of perplexity and its standard error, paired
    block by block (the blocks' own difficulty cancels, so it is far tighter than either figure's own error)."""

    ratio: float  # b.ppl / a.ppl - 1
    se: float  # its standard error
    noise: bool  # within two standard errors of no change

    def __str__(self) -> str:
        digits = 2 if abs(self.ratio) < 0.01 and not self.se >= 0.01 else 1
        if not math.isfinite(self.se):
            return fmt_change(self.ratio, digits)
        return (f"{fmt_change(self.ratio, digits)} ± {self.se:.{digits}%}"
                + (", within noise" if self.noise else ""))


def change(a: "Perplexity", b: "Perplexity") -> Change:
    """How ``b``'s perplexity differs from ``a``'s, measured on the same blocks (refused otherwise)."""
    ratio = b.ppl / a.ppl - 1 if a.ppl else float("nan")
    if not a.block_tokens or a.block_tokens != b.block_tokens:
        return Change(ratio, float("nan"), False)
    d = torch.tensor(b.block_nll, dtype=torch.float64) - torch.tensor(a.block_nll, dtype=torch.float64)
    diff, se = _mean_se(d, torch.tensor(a.block_tokens), torch.tensor(a.block_domain) if a.block_domain else None)
    return Change(ratio, math.exp(diff) * se, abs(diff) <= 2 * se if math.isfinite(se) else False)


def block_nll(model, blocks: TokenBlocks, batch_size: int = 8,
              progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and scored-token count per block (float64, on the CPU); the model in memory or layer by layer."""
    from .sharding import inference

    sums, counts = [], []
    with inference(model):
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
    domain = torch.as_tensor(blocks.domain, dtype=torch.long)
    _, se_nll = _mean_se(nll, count, domain)
    return Perplexity(tot["ppl"], tot["nll"], tot["bpb"], tot["tokens"], blocks.block_len, len(blocks), per,
                      se=tot["ppl"] * se_nll, block_nll=[float(x) for x in nll], block_tokens=[int(x) for x in count],
                      block_domain=[int(x) for x in domain])


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
