"""Why an expert or a layer matters, in one panel: what the statistics say about it side by side, each against its
own baseline, so a choice to drop or keep it can be read before it is made.

For an expert: its load against the fair share, its rank in its layer under each cheap criterion, the domains it
serves more or less than its overall share, the experts it is chosen with more than chance, the tokens that go to
it most reliably, and whether REAP counts it a super expert. For a layer: how much its MoE sub-layer and its
decoder block turn the residual stream, against the other layers, and what dropping the sub-layer does to
perplexity (a preview, paired against the original).
"""
from __future__ import annotations

import numpy as np

from .moe import MoEModel
from .perplexity import change
from .plan import Plan
from .saliency import CHEAP, expert_scores, super_experts
from .stats import RouterStats


def explain_expert(stats: RouterStats, layer: int, expert: int, view: MoEModel | None = None, vocab=None,
                   tokenizer=None, top: int = 3) -> dict:
    """What the statistics say about ``expert`` of MoE layer ``layer``."""
    from .errors import PlanError

    if not 0 <= layer < len(stats.layers):
        raise PlanError(f"MoE layer {layer} does not exist (layers 0..{len(stats.layers) - 1})")
    E = stats.num_experts[layer]
    if not 0 <= expert < E:
        raise PlanError(f"expert {expert} does not exist in MoE layer {layer} (experts 0..{E - 1})")
    ranks = {}
    for c in [c for c in CHEAP if c != "random"]:
        s = np.asarray(expert_scores(stats, c, view=view)[layer], dtype=float)
        ranks[c] = (int((s > s[expert]).sum()) + 1, float(s[expert]))  # 1 = most important of the layer
    spec = stats.specialisation(layer)[:, expert]
    lift = stats.coactivation_lift(layer)[expert]
    partners = [(int(j), float(lift[j])) for j in np.argsort(-np.nan_to_num(lift, nan=-1)) if j != expert][:top]
    tokens = []
    if vocab is not None and tokenizer is not None:
        from .figures import token_label

        ids, share, occ = vocab.token_share(layer, min_count=4)
        for j in np.argsort(-share[:, expert], kind="stable")[:top] if len(ids) else []:
            if share[j, expert] > 0:
                tokens.append((token_label(tokenizer, int(ids[j])), float(share[j, expert]), int(occ[j])))
    return {"layer": layer, "expert": expert, "experts": E, "load": float(stats.load_vs_uniform()[layer][expert]),
            "ranks": ranks, "domains": {d: float(v) for d, v in zip(stats.domains, spec)},
            "partners": partners, "tokens": tokens, "super": (layer, expert) in super_experts(stats)}


def explain_layer(model, view: MoEModel, stats: RouterStats, layer: int, blocks, base) -> dict:
    """What the statistics say about MoE layer ``layer``, and what dropping its MoE sub-layer costs (previewed on
    ``blocks``, against ``base``, the original's perplexity on them)."""
    from .errors import PlanError
    from .preview import preview_perplexity

    if not 0 <= layer < len(view):
        raise PlanError(f"MoE layer {layer} does not exist (layers 0..{len(view) - 1})")
    li, bi = stats.layer_importance(), stats.block_importance()
    dl = view[layer].layer_idx
    res = preview_perplexity(model, view, Plan(drop_layers=[layer]), blocks, stats=stats)
    return {"layer": layer, "decoder_layer": dl, "turn": float(li[layer]), "turn_rank": int((li > li[layer]).sum()) + 1,
            "layers": len(li), "block_turn": float(bi[dl]), "drop_ppl": res.ppl, "drop_se": res.se,
            "drop_change": str(change(base, res)), "base_ppl": base.ppl}
