"""Scores per expert, per layer and per block, and expert similarity: pure functions of statistics
(plus, for reconstruction and ablation, the model and calibration text). Higher score = more important.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .devices import forward_hooks
from .moe import MoEModel
from .stats import RouterStats

CRITERIA = ("frequency", "gate-mass", "reap", "reap-softmax", "reconstruction", "ablation", "random")
CHEAP = ("frequency", "gate-mass", "reap", "reap-softmax", "random")
SIMILARITIES = ("router-logits", "mean-output", "weights")


def expert_scores(stats: RouterStats, criterion: str, model=None, view: MoEModel | None = None, blocks=None,
                  seed: int = 0, max_tokens: int = 4096, progress=None) -> list[np.ndarray]:
    """One array per MoE layer, one score per expert."""
    if criterion == "frequency":
        return [np.asarray(lay["count"], dtype=float) for lay in stats.layers]
    if criterion == "gate-mass":
        return [stats.gate_mass(i) for i in range(len(stats.layers))]
    if criterion in ("reap", "reap-softmax"):  # the model's gates, or REAP's own softmax definition
        definition = "model" if criterion == "reap" else "softmax"
        return [stats.reap(i, definition) for i in range(len(stats.layers))]
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return [rng.random(e) for e in stats.num_experts]
    if criterion in ("reconstruction", "ablation"):
        if model is None or view is None or blocks is None:
            raise ValueError(f"criterion {criterion!r} runs the model: pass model=, view= and blocks= (calibration)")
        fn = reconstruction_scores if criterion == "reconstruction" else ablation_scores
        return fn(model, view, blocks, max_tokens=max_tokens, progress=progress)
    raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")


def _each_layer_input(model, view: MoEModel, blocks, max_tokens: int, fn) -> None:
    """``fn(lay, x)`` with ``x`` the input of MoE block ``lay`` on up to ``max_tokens`` calibration tokens from every
    domain (real tokens only), called while that layer's weights are loaded: layer by layer, a model larger than
    memory keeps one layer's inputs at a time."""
    from .layerwise import engine_of, forward_batches

    engine = engine_of(model)
    caps: dict[int, list] = {lay.index: [] for lay in view}
    by_decoder = {lay.layer_idx: lay for lay in view}
    sub = blocks.spread(max_tokens)
    valid = sub.attention_mask().reshape(-1).bool()

    def done(i: int) -> None:
        lay = by_decoder.get(i)
        if lay is None:
            return
        xs = caps.pop(lay.index)
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        fn(lay, x[valid.to(x.device)])

    def keep(i: int, x: torch.Tensor) -> None:
        if engine is None or engine.running:  # not the load-time self-check of a layer-by-layer model
            caps[i].append(x.detach())

    with torch.inference_mode(), forward_hooks(*[(lay.block, "pre", lambda m, a, _i=lay.index: keep(_i, a[0]))
                                                 for lay in view]):
        for _ in forward_batches(model, sub.batches(8), logits=False, after_layer=done):
            pass


def _masked_output(lay, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    from .transform import LayerEdit

    out = lay.forward(x, edit=LayerEdit(keep=keep))
    return out[0] if isinstance(out, tuple) else out


def reconstruction_scores(model, view: MoEModel, blocks, max_tokens: int = 4096, greedy_max_experts: int = 32,
                          progress=None) -> list[np.ndarray]:
    """NAEE-style: the layer-output error ‖F(x) − F_D(x)‖ when experts are removed and tokens re-route.

    Up to ``greedy_max_experts`` experts: greedy removal (each step removes the expert whose removal adds the least
    error); an expert's score is the error at the step it was removed, made monotone, so the last ones removed
    score highest. Above that, each expert is scored by the error of removing it alone. One forward over the
    calibration text (layer by layer for a model larger than memory). Under grouped routing (DeepSeek-V3) a removal
    that no smaller model can have (not a whole multiple of the groups) routes through the full router with the
    removed experts never chosen.
    """
    scores: dict[int, np.ndarray] = {}

    def score(lay, x: torch.Tensor) -> None:
        E, k = lay.num_experts, lay.top_k
        full = _masked_output(lay, x, torch.ones(E, dtype=torch.bool))
        err = lambda keep: float((full - _masked_output(lay, x, keep)).float().norm())  # noqa: E731
        s = np.zeros(E)
        if E <= greedy_max_experts:
            keep = torch.ones(E, dtype=torch.bool)
            level = 0.0
            for step in range(E - k):
                cands = [(err(keep.clone().index_fill_(0, torch.tensor([e]), False)), e)
                         for e in range(E) if keep[e]]
                e_err, e = min(cands)
                level = max(level, e_err)
                s[e] = level + 1e-9 * step
                keep[e] = False
            top = level + 1.0 + float(full.float().norm())
            for e in range(E):
                if keep[e]:  # never removable (the last k): above every removed one, ordered by solo error
                    s[e] = top + err(torch.ones(E, dtype=torch.bool).index_fill_(0, torch.tensor([e]), False))
        else:
            for e in range(E):
                keep = torch.ones(E, dtype=torch.bool)
                keep[e] = False
                s[e] = err(keep)
        scores[lay.index] = s
        if progress:
            progress(len(scores), len(view))

    _each_layer_input(model, view, blocks, max_tokens, score)
    return [scores[lay.index] for lay in view]


def ablation_scores(model, view: MoEModel, blocks, max_tokens: int = 4096, progress=None) -> list[np.ndarray]:
    """Ground truth: Δ mean NLL on calibration text when expert e alone is masked (one pass per expert)."""
    from .layerwise import LayerwiseError, engine_of
    from .perplexity import perplexity
    from .plan import Plan
    from .preview import previewing

    engine = engine_of(model)
    if engine is not None:
        total = sum(view.num_experts)
        read = sum(engine.layer_nbytes(i) for i in range(len(engine.view.decoder_layers)))
        raise LayerwiseError(
            f"ablation runs one perplexity pass per expert ({total + 1:,} passes); layer by layer each pass reads "
            f"every decoder layer from disk again ({read / 2**30:,.1f} GiB), {(total + 1) * read / 2**40:,.2f} TiB in "
            "all: use reconstruction (one pass, each layer read once) or reap, or load the model in memory")

    sub = blocks.spread(max_tokens)
    base = perplexity(model, sub).nll
    out, total, done = [], sum(view.num_experts), 0
    for lay in view:
        s = np.zeros(lay.num_experts)
        for e in range(lay.num_experts):
            with previewing(model, view, Plan(drop_experts={lay.index: [e]})):
                s[e] = perplexity(model, sub).nll - base
            done += 1
            if progress:
                progress(done, total)
        out.append(s)
    return out


def expert_similarity(stats: RouterStats, layer: int, kind: str = "router-logits",
                      view: MoEModel | None = None) -> np.ndarray:
    """[E, E] cosine similarity of experts: router-logit columns (MC-SMoE), mean outputs (HC-SMoE) or weights."""
    lay = stats.layers[layer]
    if kind == "router-logits":
        g = np.asarray(lay["logit_gram"], dtype=float)
        d = np.sqrt(np.clip(np.diag(g), 1e-30, None))
        return g / d[:, None] / d[None, :]
    if kind == "mean-output":
        m = mean_outputs(stats, layer)
    elif kind == "weights":
        if view is None:
            raise ValueError("weight similarity needs the model's view")
        lv = view[layer]
        m = torch.cat([lv.gate_up.detach().reshape(lv.num_experts, -1), lv.down.detach().reshape(lv.num_experts, -1)],
                      1).float().cpu().numpy()
    else:
        raise ValueError(f"unknown similarity {kind!r}; choose from {', '.join(SIMILARITIES)}")
    n = np.linalg.norm(m, axis=1)
    n = np.where(n > 0, n, 1.0)
    return (m @ m.T) / n[:, None] / n[None, :]


def mean_outputs(stats: RouterStats, layer: int) -> np.ndarray:
    """[E, H] each expert's mean output over all tokens (dense sample) or, without one, over its routed tokens."""
    lay = stats.layers[layer]
    if lay.get("dense_tokens", 0) > 0:
        return np.asarray(lay["dense_out_sum"], dtype=float) / lay["dense_tokens"]
    c = np.maximum(np.asarray(lay["count"], dtype=float), 1)
    return np.asarray(lay["out_sum"], dtype=float) / c[:, None]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    r = spearmanr(np.asarray(a).ravel(), np.asarray(b).ravel()).statistic
    return float(r)


def super_experts(stats, early_fraction: float = 0.75) -> set[tuple[int, int]]:
    """REAP's rule: max activation > max(99.5th percentile, global max / 10), in the first 75% of layers."""
    acts = np.concatenate([np.asarray(lay["act_max"]) for lay in stats.layers])
    thr = max(np.percentile(acts, 99.5), acts.max() / 10)
    n = len(stats.layers)
    out = set()
    for i, lay in enumerate(stats.layers):
        if i >= int(np.ceil(n * early_fraction)):
            break
        for e, a in enumerate(np.asarray(lay["act_max"])):
            if a > thr:
                out.add((i, e))
    return out


@dataclass
class RankStability:
    """How far a criterion's ranking of each layer's experts holds when the calibration text changes: the scores
    on the two halves of the calibration blocks (even- and odd-numbered), their Spearman ρ per layer, and the share
    of the lowest-scored ``fraction`` of experts that both halves put there (the experts a drop would remove)."""

    criterion: str
    halves: tuple[list[np.ndarray], list[np.ndarray]]
    rho: np.ndarray  # [L]; NaN where a half scores every expert alike
    bottom_agreement: np.ndarray  # [L] in [0, 1]
    fraction: float

    def sentence(self) -> str:
        rho = self.rho[np.isfinite(self.rho)]
        if not rho.size:
            return f"{self.criterion}: one half of the calibration text scores every expert alike; no ranking to compare"
        worst = int(np.nanargmin(self.rho))
        return (f"{self.criterion}: ranks agree across the two calibration halves with Spearman ρ {np.median(rho):.2f} "
                f"(median over layers; lowest {self.rho[worst]:.2f}, layer {worst}); the lowest-scored "
                f"{self.fraction:.0%} of a layer's experts are the same in both halves for "
                f"{np.mean(self.bottom_agreement):.0%} of them")


def rank_stability(stats: RouterStats, criterion: str, fraction: float = 0.25, model=None,
                   view: MoEModel | None = None, blocks=None, max_tokens: int = 4096) -> RankStability:
    """Score the experts on each half of the calibration text and compare the rankings. The statistics' criteria
    read the per-half sums of the one statistics pass; reconstruction and ablation run the model on each half
    (``max_tokens`` in all, half on each)."""
    if criterion == "random":
        raise ValueError("random scores are drawn, not measured: there is no ranking to test across calibration halves")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie between 0 and 1, got {fraction}")
    if criterion in CHEAP:
        halves = tuple(expert_scores(stats.half(h), criterion) for h in (0, 1))
    else:
        if blocks is None:
            raise ValueError(f"criterion {criterion!r} runs the model: pass model=, view= and blocks= (calibration)")
        halves = tuple(expert_scores(stats, criterion, model=model, view=view, max_tokens=max_tokens // 2,
                                     blocks=blocks.subset(list(range(h, len(blocks), 2)))) for h in (0, 1))
    rho, agree = [], []
    for a, b in zip(*halves):
        rho.append(spearman(a, b) if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan"))
        n = max(1, int(round(fraction * len(a))))
        low_a, low_b = set(np.argsort(a, kind="stable")[:n].tolist()), set(np.argsort(b, kind="stable")[:n].tolist())
        agree.append(len(low_a & low_b) / n)
    return RankStability(criterion, halves, np.array(rho, dtype=float), np.array(agree), fraction)
