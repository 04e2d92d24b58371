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


# Every other MoE model type of the installed transformers gets its own default config shrunk by these rules
# (applied where the config has the field), then the few fields its own row in ``TINY_OVERRIDES`` names.
_SHRINK = dict(
    hidden_size=64, d_model=64, num_attention_heads=4, n_heads=4, num_key_value_heads=2, head_dim=16,
    vocab_size=256, max_position_embeddings=256, intermediate_size=96, moe_intermediate_size=48,
    shared_expert_intermediate_size=64, moe_shared_expert_intermediate_size=64, shared_intermediate_size=64,
    expert_ffn_hidden_size=48, ffn_hidden_size=96, num_experts_per_tok=2, num_experts_per_token=2, moe_k=2, moe_topk=2, kv_lora_rank=16,
    q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16, n_shared_experts=1,
    moe_num_shared_experts=1, first_k_dense_replace=1, tie_word_embeddings=False, kv_channels=16,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    mamba_n_heads=8, mamba_num_heads=8, mamba_d_head=16, mamba_head_dim=16, mamba_d_state=16, ssm_state_size=16,
    mamba_dt_rank=8, mamba_n_groups=1, n_groups=1, use_mamba_kernels=False, num_nextn_predict_layers=0,
    sliding_window=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, index_head_dim=16, index_n_heads=2,
    index_topk=8, unpadded_vocab_size=256, top_k_experts=2,
)
_LAYERS = 4
TINY_OVERRIDES: dict[str, dict] = {
    "dots1": dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"], num_dense_layers=1),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
    "zaya": dict(num_experts_per_tok=1),
    "dots3_note": dict(per_layer_config={}),
    "dots3_note_text": dict(per_layer_config={}),
    "kolibri1_1": dict(index_layers=[1, 3], kv_source_layers=[0, 1, 2, 3], mlp_only_layers=[0], index_num_heads=2,
                       num_key_value_heads=2, num_attention_heads=4),
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                      indexer_compress_ratio=2),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=2),
    "doge": dict(is_moe=True, num_experts=16, num_experts_per_tok=4),
    "gemma4_text": dict(enable_moe_block=True, num_experts=8, moe_intermediate_size=48),
    "gemma4": dict(enable_moe_block=True, num_experts=8, moe_intermediate_size=48),
    "nemotron_h": dict(layers_block_type=["linear_attention", "moe", "full_attention", "moe"]),
    "dbrx": dict(ffn_config=dict(hidden_size=64, ffn_hidden_size=48, moe_num_experts=8, moe_top_k=2),
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0)),
    "longcat_flash": dict(zero_expert_num=4),  # as the published model: routed slots that compute nothing
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1),
}


def _count_fields(cfg) -> list[str]:
    from .layout import COUNT_ATTRS

    d = cfg.to_dict()
    return [a for a in COUNT_ATTRS if d.get(a) is not None]


def generic_tiny_config(model_type: str, **overrides):
    """A tiny config of any model type: its own defaults shrunk by ``_SHRINK`` (8 experts, top-2, hidden 64)."""
    cfg = AutoConfig.for_model(model_type)
    tc = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    d = tc.to_dict()
    n_old = d.get("num_hidden_layers") or d.get("n_layers") or d.get("num_layers")
    kw = {k: v for k, v in _SHRINK.items() if k in d}
    for a in _count_fields(tc):
        kw[a] = 8
    if "kv_lora_rank" in d and "num_key_value_heads" in d:  # MLA: as many KV heads as heads (as the real models)
        kw["num_key_value_heads"] = kw.get("num_attention_heads", d["num_key_value_heads"])
        if "head_dim" in d and d.get("head_dim") == d.get("qk_rope_head_dim"):  # MLA's head_dim is the rope part
            kw["head_dim"] = kw["qk_rope_head_dim"]
    for g in ("n_group", "num_expert_group"):
        if d.get(g):
            kw.update({g: 2, "topk_group": 1})
    for a in ("num_hidden_layers", "n_layers", "num_layers"):
        if a in d:
            kw[a] = _LAYERS
    if isinstance(n_old, int):
        for name, val in d.items():  # per-layer lists follow the new depth
            if isinstance(val, list) and len(val) == n_old and name not in kw:
                kinds = list(dict.fromkeys(v for v in val if isinstance(v, str)))
                # layer kinds (attention / linear attention, dense / sparse MLP): every kind, taking turns
                kw[name] = [kinds[i % len(kinds)] for i in range(_LAYERS)] if len(kinds) > 1 else val[:_LAYERS]
    kw.update(TINY_OVERRIDES.get(model_type, {}))
    kw.update(overrides)
    if tc is cfg:
        return AutoConfig.for_model(model_type, **kw)
    name = next((n for n, v in vars(cfg).items() if v is tc), None)
    try:  # a composite config: a freshly built text part (its derived fields follow), else shrunk in place
        setattr(cfg, name, AutoConfig.for_model(tc.model_type, **{**kw, **TINY_OVERRIDES.get(tc.model_type, {})}))
    except Exception:  # noqa: BLE001
        for k, v in kw.items():
            setattr(tc, k, v)
    return cfg


def tiny_config(family: str, **overrides):
    """The tiny config of ``family``: its hand-written row in ``TINY_CONFIGS`` where it has one (the families every
    test runs on), else ``generic_tiny_config``."""
    if family not in TINY_CONFIGS:
        try:
            return generic_tiny_config(family, **overrides)
        except (KeyError, ValueError) as err:
            raise KeyError(f"no tiny config for {family!r}: {err}") from err
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


def random_blocks(n: int = 8, L: int = 32, seed: int = 0, vocab: int = 256, low: int = 0,
                  last_len: int | None = None):
    """Seeded random token blocks over two domains ("a", "b"): statistics and perplexity inputs for tiny models."""
    from .data import TokenBlocks

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (n, L), generator=g)
    lengths = torch.full((n,), L)
    if last_len is not None:
        lengths[-1] = last_len
    return TokenBlocks(ids, lengths, torch.arange(n) % 2, ["a", "b"], (lengths - 1).double(), L)


# Real models' routing shapes at a tiny width: the views, the app and the widgets are looked at on these (48-61
# layers of 128-384 experts), since a 4 x 8 demo hides what does not scale.
REAL_SHAPES: dict[str, tuple[str, dict]] = {
    "qwen3-30b-a3b": ("qwen3_moe", dict(num_hidden_layers=48, num_experts=128, num_experts_per_tok=8,
                                        moe_intermediate_size=8, intermediate_size=16)),
    "deepseek-v3": ("deepseek_v3", dict(num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256,
                                        num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
                                        moe_intermediate_size=8, intermediate_size=16)),
    "kimi-k2": ("deepseek_v3", dict(num_hidden_layers=61, first_k_dense_replace=1, n_routed_experts=384,
                                    num_experts_per_tok=8, n_group=1, topk_group=1, n_shared_experts=1,
                                    moe_intermediate_size=8, intermediate_size=16)),
}


def real_shape_model(name: str, seed: int = 0, vocab_size: int = 256) -> PreTrainedModel:
    """A seeded tiny-width model with a real model's routing shape (``REAL_SHAPES``: layers, experts, top-k,
    groups, dense and shared layers)."""
    family, shape = REAL_SHAPES[name]
    return tiny_model(family, seed=seed, vocab_size=vocab_size, **shape)
