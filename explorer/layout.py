"""How MoE families lay out their blocks: the family table (gating rule, stored layout, what a block returns) and
the rules by which per-expert tensors are found. ``MoELayer`` reads the table; nothing else knows a family's name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ExplorerError

# --------------------------------------------------------------------------------------------------------
# Family differences, in one place.
#   gating:  how router logits become the k gates
#     softmax_topk   softmax over all E, top-k, renormalised when ``renorm`` (Mixtral, Qwen, OLMoE)
#     topk_softmax   top-k of logits, softmax over the k (GPT-OSS, GraniteMoE): same as softmax_topk+renorm
#     sigmoid_group  DeepSeek-V3: sigmoid scores + correction bias for the choice, group-limited, scaled
#     sparsemixer    PhiMoE's sparsemixer (eval mode)
#     sigmoid_input  Llama-4: top-k of logits, sigmoid gate multiplied into the expert's *input*
#   count_attr: the config attribute that counts routed experts
# --------------------------------------------------------------------------------------------------------
COUNT_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOPK_ATTRS = ("num_experts_per_tok", "num_experts_per_token", "top_k_experts", "moe_k", "moe_topk", "moe_top_k")
BLOCK_ATTRS = ("mlp", "block_sparse_moe", "feed_forward", "moe", "mixer")
ROUTER_ATTRS = ("gate", "router")
SHARED_ATTRS = ("shared_expert", "shared_experts", "shared_mlp")


@dataclass(frozen=True)
class Family:
    gating: str
    renorm_attr: str | None = None  # config attribute saying whether top-k gates are renormalised
    renorm_default: bool = True
    returns_tuple: bool = False  # the block returns (hidden, router_something)
    transposed: bool = False  # experts stored [E, H, 2I] / [E, I, H]
    flat_output: bool = False  # the block returns [tokens, H] rather than the input's shape
    block_scale: bool = False  # the block multiplies the routed sum by its ``routed_scaling_factor`` (Beam, M3)
    post_norm: str | None = None  # a norm the block applies to routed + shared (AXK1's ``post_mlp_layernorm``)
    latent: tuple[str, str] | None = None  # projections around the routed experts (Nemotron-H's fc1/fc2_latent_proj)


FAMILIES: dict[str, Family] = {
    "mixtral": Family("softmax_topk"),
    "minimax": Family("softmax_topk"),
    "qwen2_moe": Family("softmax_topk", "norm_topk_prob", False),
    "qwen3_moe": Family("softmax_topk", "norm_topk_prob", True),
    "olmoe": Family("softmax_topk", "norm_topk_prob", False),
    "phimoe": Family("sparsemixer"),
    "deepseek_v3": Family("sigmoid_group"),
    "glm4_moe": Family("sigmoid_group"),
    "dots1": Family("sigmoid_group"),
    "gpt_oss": Family("topk_softmax", returns_tuple=True, transposed=True),
    "granitemoe": Family("topk_softmax"),
    "llama4_text": Family("sigmoid_input", returns_tuple=True, transposed=True, flat_output=True),
    "llama4": Family("sigmoid_input", returns_tuple=True, transposed=True, flat_output=True),
    # families whose routers return (logits, weights, indices) and whose blocks add one step of their own
    "beam": Family("softmax_topk", block_scale=True),
    "minimax_m3_vl": Family("softmax_topk", block_scale=True),
    "minimax_m3_vl_text": Family("softmax_topk", block_scale=True),
    "axk1": Family("sigmoid_group", post_norm="post_mlp_layernorm"),
    "nemotron_h": Family("sigmoid_group", latent=("fc1_latent_proj", "fc2_latent_proj")),
}


class NoMoELayersError(ExplorerError):
    pass


class UnsupportedModelError(NoMoELayersError):
    """The view does not reproduce this model's own MoE blocks: refused in words rather than shown wrong."""


EXPERT_COUNT_NAMES = COUNT_ATTRS + ("n_experts", "num_routed_experts")  # where modules cache the count too


def expert_dim(t: torch.Tensor, n_experts: int) -> int | None:
    """The dimension of ``t`` that runs over experts (its first, else its last), or None: the one rule by which
    router rows, router and choice biases and ERNIE's ``moe_statics`` are found, in memory and on disk."""
    if t is None or t.dim() == 0:
        return None
    return 0 if t.shape[0] == n_experts else (t.dim() - 1 if t.shape[-1] == n_experts else None)


def slice_experts_of(module: nn.Module, kept: list[int], n_experts: int, recurse: bool = True) -> None:
    """Keep rows ``kept`` of every per-expert tensor held by ``module`` (router rows, router and choice biases,
    ERNIE's ``moe_statics``...) and every cached expert count, in place: what a router of the smaller model holds.
    A tensor is per-expert when its first (else last) dimension is the expert count. ``recurse=False``: the
    module's own tensors only (a block's, whose children are sliced each by their own rule)."""
    idx = torch.as_tensor(kept, dtype=torch.long)
    for mod in (module.modules() if recurse else [module]):
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            dim = expert_dim(t, n_experts)
            if dim is None:
                continue
            new = t.detach().index_select(dim, idx.to(t.device)).clone().contiguous()
            if isinstance(t, nn.Parameter):
                setattr(mod, name, nn.Parameter(new, requires_grad=t.requires_grad))
            else:
                mod._buffers[name] = new
        for name in EXPERT_COUNT_NAMES:
            if getattr(mod, name, None) == n_experts and isinstance(getattr(mod, name), int):
                setattr(mod, name, len(kept))
        if isinstance(mod, nn.Linear) and mod.out_features == n_experts:
            mod.out_features = len(kept)


def text_config_of(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family_of(config) -> Family:
    """The family row of ``config``'s model type; unknown types get the common layout, which ``MoEModel.check``
    then holds against the model's own blocks (a type it does not reproduce is refused)."""
    mt = getattr(text_config_of(config), "model_type", None)
    if mt in FAMILIES:
        return FAMILIES[mt]
    return Family("softmax_topk", "norm_topk_prob", True)
