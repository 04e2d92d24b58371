"""Tiny randomly initialised MoE models built from transformers configs (tests, benchmarks, teaching)."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

_COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
               max_position_embeddings=256, tie_word_embeddings=False)

TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=64,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                      norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                      head_dim=16, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
    "olmoe": dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0,
                  bos_token_id=None),
    "phimoe": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                        num_key_value_heads=4,  # as the real model: with 2, padded batches fail in sdpa (MLA)
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gpt_oss": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "granitemoe": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    "llama4_text": dict(intermediate_size=48, intermediate_size_mlp=96, num_local_experts=8, num_experts_per_tok=1,
                        head_dim=16, interleave_moe_layer_step=1, no_rope_layers=[1, 1, 1]),
}


def tiny_config(family: str, **overrides):
    if family not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for {family!r}; known: {sorted(TINY_CONFIGS)}")
    return AutoConfig.for_model(family, **{**_COMMON, **TINY_CONFIGS[family], **overrides})


def tiny_model(family: str = "mixtral", seed: int = 0, dtype: torch.dtype = torch.float32,
               experts_implementation: str | None = None, **overrides) -> PreTrainedModel:
    """A seeded tiny model of ``family`` whose weights are not all small, so routing is not degenerate."""
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    kw = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * (p.shape[-1] ** -0.5))
            elif "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
        for name, b in model.named_buffers():
            if "correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=g).to(b.dtype) * 0.05)
    return model.eval()


def upcycled(model: PreTrainedModel, factor: int = 2, noise: float = 0.0, seed: int = 0) -> PreTrainedModel:
    """A model with ``factor`` times the experts that computes what ``model`` computes (sparse upcycling): each
    expert and its router row copied ``factor`` times and top-k multiplied by ``factor``. With a softmax router (over
    all experts or over the top-k), the copies of the k chosen experts are chosen and split their gate, so the
    output is unchanged. ``noise`` (relative) makes the copies differ slightly.
    Teaching uses it as a *trained* stand-in for a larger model of the same family."""
    import copy

    from .moe import MoEModel

    view = MoEModel(model)
    if any(lay.family.gating not in ("softmax_topk", "topk_softmax") for lay in view):
        raise ValueError(f"upcycling keeps the function only for softmax routers, not {view[0].family.gating!r}")
    cfg = copy.deepcopy(model.config)
    tc = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    setattr(tc, view.count_attr, getattr(tc, view.count_attr) * factor)
    tc.num_experts_per_tok = tc.num_experts_per_tok * factor
    big = AutoModelForCausalLM.from_config(cfg, dtype=next(model.parameters()).dtype)
    src = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in big.state_dict().items():
            old = src[name]
            if t.shape == old.shape:
                t.copy_(old)
                continue
            rep = old.repeat_interleave(factor, dim=0)
            if old.dim() == 3 and noise:  # expert tensors: copies differ a little
                rep = rep + noise * old.std() * torch.randn(rep.shape, generator=g).to(rep.dtype)
            t.copy_(rep)
    return big.eval()
