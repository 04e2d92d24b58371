"""A uniform view of the MoE layers inside any transformers causal LM.

Every family stores its experts fused (``gate_up_proj`` / ``down_proj``), but routers, gate normalisation,
shared experts, biases and block return values differ. Those differences live in ``FAMILIES`` and in
``MoELayer``; nothing else in the package knows a family's name.

``MoELayer.forward`` recomputes a block's output from the view's tensors. The statistics pass, the what-if
preview (routing masks, merges, skips) and the correctness tests all run through it, so one tested code path
stands behind every number the explorer shows.
"""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
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


# ---- accelerate's big-model hooks ---------------------------------------------------------------------------
# With ``device_map`` (weights spread over GPUs, CPU and disk), accelerate moves a module's weights in just before
# its own forward and back out after. The view reads expert and router tensors directly, so it opens the same
# hooks around its own computation: offloaded weights are then real tensors, and gone again afterwards.
@contextmanager
def materialized(*modules: nn.Module | None):
    """Inside the block, the weights of ``modules`` are on their execution device even when offloaded."""
    hooked = [m for m in modules if m is not None and getattr(m, "_hf_hook", None) is not None]
    for m in hooked:
        m._hf_hook.pre_forward(m)
    try:
        yield
    finally:
        for m in hooked:
            m._hf_hook.post_forward(m, None)


@contextmanager
def forward_hooks(*specs):
    """Hooks that exist only inside the block. Each spec is (module, "pre" | "post", fn) or (..., with_kwargs);
    whatever happens inside, every hook is removed on exit."""
    handles = []
    try:
        for mod, when, fn, *kw in specs:
            register = mod.register_forward_pre_hook if when == "pre" else mod.register_forward_hook
            handles.append(register(fn, with_kwargs=bool(kw and kw[0])))
        yield
    finally:
        for h in handles:
            h.remove()


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device when it is dispatched, else its weights' device."""
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
        for p in m.parameters(recurse=False):
            if p.device.type != "meta":
                return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """The device token ids go to: the input embedding's."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(emb) if emb is not None else module_device(model)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family_of(config) -> Family:
    """The family row of ``config``'s model type; unknown types get the common layout, which ``MoEModel.check``
    then holds against the model's own blocks (a type it does not reproduce is refused)."""
    mt = getattr(_text_config(config), "model_type", None)
    if mt in FAMILIES:
        return FAMILIES[mt]
    return Family("softmax_topk", "norm_topk_prob", True)


@dataclass
class MoELayer:
    """Handle on one MoE block: its router, fused expert tensors and shared experts."""

    index: int  # MoE layer number (0..n_moe-1)
    layer_idx: int  # decoder layer number in the model
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    family: Family
    top_k: int
    renorm: bool
    shared: list[nn.Module] = field(default_factory=list)
    shared_gate: nn.Module | None = None
    decoder_layer: nn.Module | None = None
    model_hidden: int | None = None  # the model's hidden size (config), for routers without one [E, H] matrix

    # ---- tensors ------------------------------------------------------------------------------------
    @property
    def router_weight(self) -> torch.Tensor:
        w = getattr(self.router_linear, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise UnsupportedModelError(f"the router of MoE layer {self.index} ({type(self.router).__name__}) has no "
                                        "[experts, hidden] score matrix the explorer can read")
        return w

    @property
    def router_linear(self) -> nn.Module:
        """The module holding the router's [E, H] score matrix."""
        for name in ("wg", "gate", "classifier", "layer"):
            sub = getattr(self.router, name, None)
            if isinstance(sub, nn.Module) and isinstance(getattr(sub, "weight", None), torch.Tensor):
                return sub
        if isinstance(getattr(self.router, "weight", None), torch.Tensor):
            return self.router
        n = self.gate_up.shape[0]
        lin = [m for m in self.router.modules() if isinstance(m, nn.Linear) and m.out_features == n]
        return lin[-1] if lin else self.router

    @property
    def router_bias(self) -> torch.Tensor | None:
        b = getattr(self.router_linear, "bias", None)
        return b if isinstance(b, torch.Tensor) else None

    @property
    def correction_bias(self) -> torch.Tensor | None:
        for mod in (self.router, self.block):
            for name in ("e_score_correction_bias", "expert_bias"):
                t = getattr(mod, name, None)
                if isinstance(t, torch.Tensor):
                    return t
        return None

    @property
    def num_experts(self) -> int:
        w = getattr(self.router_linear, "weight", None)
        return w.shape[0] if isinstance(w, torch.Tensor) else self.gate_up.shape[0]

    @property
    def transposed(self) -> bool:
        return bool(getattr(self.experts, "is_transposed", self.family.transposed))

    @property
    def gated(self) -> bool:
        """Gated experts (gate and up fused in ``gate_up_proj``) or plain ones (Nemotron-H's ``up_proj``, relu²)."""
        return isinstance(getattr(self.experts, "gate_up_proj", None), torch.Tensor)

    @property
    def gate_up_name(self) -> str:
        return "gate_up_proj" if self.gated else "up_proj"

    def up_rows(self, intermediate: int) -> int:
        """Rows of the first expert matrix for ``intermediate`` neurons: 2I gated, I plain."""
        return 2 * intermediate if self.gated else intermediate

    @property
    def gate_up(self) -> torch.Tensor:
        return getattr(self.experts, self.gate_up_name)

    @property
    def down(self) -> torch.Tensor:
        return self.experts.down_proj

    @property
    def gate_up_bias(self) -> torch.Tensor | None:
        return getattr(self.experts, "gate_up_proj_bias", None)

    @property
    def down_bias(self) -> torch.Tensor | None:
        return getattr(self.experts, "down_proj_bias", None)

    @property
    def intermediate_size(self) -> int:
        d = self.down
        return d.shape[1] if self.transposed else d.shape[2]

    @property
    def hidden_size(self) -> int:
        """The block's input width (the model's hidden size; Nemotron-H's experts may work in a latent one)."""
        w = getattr(self.router_linear, "weight", None)
        return w.shape[1] if isinstance(w, torch.Tensor) else self.model_hidden

    # ---- what the routing allows -------------------------------------------------------------------------
    @property
    def groups(self) -> tuple[int, int]:
        """(n_group, topk_group) of group-limited routing (DeepSeek-V2/V3 style, as the router holds them);
        (1, 1) for every other router."""
        g = next((getattr(self.router, a) for a in ("num_group", "n_group", "num_expert_group")
                  if getattr(self.router, a, None)), 1)
        tg = getattr(self.router, "topk_group", None) or 1
        g, tg = int(g or 1), int(tg)
        return (g, tg) if g > 1 else (1, 1)

    def keep_rule(self) -> tuple[int, int]:
        """(least experts this layer may keep, the step the kept count must be a multiple of)."""
        g, tg = self.groups
        return max(self.top_k, g * -(-self.top_k // tg)), g

    def check_kept(self, kept: int) -> str | None:
        """Why keeping ``kept`` experts breaks this layer's routing, or None when it is fine."""
        if kept == 0:
            return f"the plan removes every expert ({self.num_experts} of {self.num_experts})"
        if kept < self.top_k:
            return f"the plan keeps {kept} experts, fewer than top-k = {self.top_k}"
        g, tg = self.groups
        if g > 1 and kept % g:
            return f"grouped routing needs the kept count divisible by n_group={g}; the plan keeps {kept}"
        if g > 1 and kept != self.num_experts and (kept // g) * tg < self.top_k:
            return f"{kept // g} experts per group x topk_group={tg} cannot serve top-k = {self.top_k}"
        return None

    def expert_weight_params(self) -> int:
        """Weights (not biases) of one routed expert: what quantisation stores in fewer bits."""
        return self.gate_up[0].numel() + self.down[0].numel()

    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        n = self.gate_up[0].numel() + self.down[0].numel()
        for b in (self.gate_up_bias, self.down_bias):
            if b is not None:
                n += b[0].numel()
        return n

    def _per_expert_params(self):
        E = self.num_experts
        for mod, rec in ((self.router, True), (self.block, False)):
            for p in mod.parameters(recurse=rec):
                if expert_dim(p, E) is not None:
                    yield p

    def router_params(self) -> int:
        """Parameters of the router and the block's own per-expert tensors (what Layer Drop removes beside experts)."""
        return sum(p.numel() for p in self.router.parameters()) + sum(
            p.numel() for p in self.block.parameters(recurse=False))

    def router_row_params(self) -> int:
        """Parameters one expert holds outside its own weights: its router row, router and choice biases..."""
        return sum(p.numel() for p in self._per_expert_params()) // self.num_experts

    def shared_params(self) -> int:
        n = sum(p.numel() for m in self.shared for p in m.parameters())
        if self.shared_gate is not None:
            n += sum(p.numel() for p in self.shared_gate.parameters())
        return n

    # ---- computation --------------------------------------------------------------------------------
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.experts.act_fn(gate_up)
        fn = getattr(self.experts, "_apply_gate", None)
        if fn is not None:
            return fn(gate_up)
        g, u = gate_up.chunk(2, dim=-1)
        return self.experts.act_fn(g) * u

    def ffn_hidden(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        gu = x @ w if self.transposed else F.linear(x, w)
        if b is not None:
            gu = gu + b
        return self._apply_gate(gu)

    def ffn_out(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        y = h @ w if self.transposed else F.linear(h, w)
        return y + b if b is not None else y

    def expert_tensors(self, e: int) -> tuple:
        gb, db = self.gate_up_bias, self.down_bias
        return (self.gate_up[e], self.down[e], None if gb is None else gb[e], None if db is None else db[e])

    def expert_hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Intermediate activation of expert e on tokens x [T, H] -> [T, I] (what slimming scores)."""
        gu, _, gb, _ = self.expert_tensors(e)
        return self.ffn_hidden(x, gu, gb)

    def expert_out(self, e: int, h: torch.Tensor) -> torch.Tensor:
        _, dn, _, db = self.expert_tensors(e)
        return self.ffn_out(h, dn, db)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """f_e(x): the ungated output of routed expert e on tokens x [T, H]."""
        return self.expert_out(e, self.expert_hidden(e, x))

    def dense_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token of a (small) sample x [n, H] -> [E, n, H], in two batched products."""
        gu = torch.einsum("nh,ehi->eni" if self.transposed else "nh,eih->eni", x, self.gate_up)
        if self.gate_up_bias is not None:
            gu = gu + self.gate_up_bias[:, None, :]
        h = self._apply_gate(gu)
        y = torch.einsum("eni,eih->enh" if self.transposed else "eni,ehi->enh", h, self.down)
        if self.down_bias is not None:
            y = y + self.down_bias[:, None, :]
        return y

    def shared_out(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.shared:
            return None
        out = sum(m(x) for m in self.shared)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x)) * out
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] in float32."""
        w = self.router_weight
        return F.linear(x.to(w.dtype), w, self.router_bias).float()

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """A distribution over all E experts per token: softmax, or normalised sigmoid for sigmoid routers."""
        if self.family.gating in ("sigmoid_group", "sigmoid_input"):
            s = torch.sigmoid(logits)
            return s / s.sum(-1, keepdim=True).clamp_min(1e-20)
        return torch.softmax(logits, dim=-1)

    @property
    def router_extra(self) -> torch.Tensor | None:
        """A per-expert tensor the block passes to its router beside the hidden states (MiniMax-M2's and HY-V3's
        ``e_score_correction_bias``, AFMoE's ``expert_bias``), or None when the router takes the hidden states only."""
        try:
            params = [p for p in inspect.signature(self.router.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            return None
        if len(params) < 2:
            return None
        for name in ("e_score_correction_bias", "expert_bias"):
            t = getattr(self.block, name, None)
            if isinstance(t, torch.Tensor):
                return t
        return None

    def call_router(self, x: torch.Tensor, router: nn.Module | None = None, extra: torch.Tensor | None = None):
        """The router's own output on tokens x, called as the block calls it."""
        router = self.router if router is None else router
        extra = self.router_extra if extra is None else extra
        args = (x,) if extra is None else (x, extra)
        if self.__dict__.get("_router_3d") is None:  # most blocks pass [T, H]; some (AFMoE) [B, S, H]
            try:
                out = router(*args)
                self.__dict__["_router_3d"] = False
                return out
            except (ValueError, RuntimeError, IndexError):
                self.__dict__["_router_3d"] = True
        if self.__dict__["_router_3d"]:
            args = (x.reshape(1, -1, x.shape[-1]), *args[1:])
        return router(*args)

    def _parse(self, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.family.gating == "sigmoid_input":
            logits = out[1].float()
            w, idx = torch.topk(logits, self.top_k, dim=-1)
            return logits, torch.sigmoid(w), idx
        if isinstance(out, tuple) and len(out) == 3:
            logits, w, idx = out
            return logits.reshape(-1, logits.shape[-1]).float(), w.reshape(-1, w.shape[-1]), idx.reshape(-1, idx.shape[-1])
        if isinstance(out, torch.Tensor):
            return self.route_from_logits(out.float())
        raise UnsupportedModelError(
            f"the router of MoE layer {self.index} ({type(self.router).__name__}) returns "
            f"{type(out).__name__} of {len(out) if isinstance(out, tuple) else '?'} parts; the explorer reads "
            "(logits, top-k weights, top-k indices) or logits")

    def sliced_router(self, kept: list[int]) -> tuple[nn.Module, torch.Tensor | None]:
        """(router, extra) of the smaller model that keeps experts ``kept``: a copy of this router with the kept
        rows of every per-expert tensor, exactly what ``apply`` writes. Masked routing runs it, so a preview routes
        as the applied model routes, whatever the family's gating (group limits, choice biases, renormalisation)."""
        key = tuple(kept)
        cache = self.__dict__.setdefault("_sliced", {})
        if key not in cache:
            with materialized(self.router_linear):
                hook = self.router.__dict__.get("_hf_hook")
                if hook is not None:
                    del self.router._hf_hook
                try:
                    r = copy.deepcopy(self.router)
                finally:
                    if hook is not None:
                        self.router._hf_hook = hook
            for m in r.modules():  # the copy computes where it is; accelerate's hooks belong to the original
                m.__dict__.pop("_hf_hook", None)
                if "forward" in m.__dict__ and hasattr(m, "_old_forward"):
                    m.forward = m._old_forward
            slice_experts_of(r, kept, self.num_experts)
            extra = self.router_extra
            if extra is not None:
                extra = extra.detach().index_select(extra.dim() - 1 if extra.shape[0] != self.num_experts else 0,
                                                    torch.as_tensor(kept, device=extra.device))
            cache.clear()  # one plan at a time per layer
            cache[key] = (r, extra)
        return cache[key]

    def _router_triple(self, x: torch.Tensor) -> bool:
        if "_triple" not in self.__dict__:
            self.__dict__["_triple"] = isinstance(self.call_router(x[:1]), tuple)
        return self.__dict__["_triple"]

    def route(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T,E] fp32, top-k weights [T,k], top-k indices [T,k]).

        Without a mask the model's own router module decides (exact). With a boolean keep-mask [E] the smaller
        model's router decides: a copy holding only the kept rows (``sliced_router``), its choices named by their
        original ids; the logits of removed experts are -inf.
        """
        if mask is None:
            return self._parse(self.call_router(x))
        kept = mask.nonzero().flatten().tolist()
        if len(kept) == self.num_experts:
            return self._parse(self.call_router(x))
        if self.family.gating == "sigmoid_input" or not self._router_triple(x):
            return self.route_from_logits(self.logits(x), mask)
        r, extra = self.sliced_router(kept)
        logits_k, w, sub = self._parse(self.call_router(x, r, extra) if extra is not None else r(x))
        ids = on_device(self.__dict__.setdefault("_sliced_ids", {}).setdefault(tuple(kept), torch.as_tensor(kept)), sub.device)
        logits = logits_k.new_full((logits_k.shape[0], self.num_experts), float("-inf"))
        logits[:, ids] = logits_k
        return logits, w, ids[sub]

    def logits_of(self, router_output) -> torch.Tensor:
        """The [T, E] logits inside whatever the router module returned."""
        if isinstance(router_output, torch.Tensor):
            return router_output
        return router_output[1] if self.family.gating == "sigmoid_input" else router_output[0]

    def route_from_logits(self, logits: torch.Tensor, mask: torch.Tensor | None = None):
        g, k = self.family.gating, self.top_k
        ml = logits if mask is None else logits.masked_fill(~on_device(mask, logits.device), float("-inf"))
        if g == "softmax_topk":
            p = torch.softmax(ml, dim=-1)
            w, idx = torch.topk(p, k, dim=-1)
            if self.renorm:
                w = w / w.sum(-1, keepdim=True)
        elif g == "topk_softmax":
            v, idx = torch.topk(ml, k, dim=-1)
            w = torch.softmax(v, dim=-1)
        elif g == "sigmoid_input":
            v, idx = torch.topk(ml, k, dim=-1)
            w = torch.sigmoid(v)
        elif g == "sparsemixer":
            from transformers.models.phimoe.modeling_phimoe import sparsemixer

            w, idx = sparsemixer(ml, jitter_eps=self.router.router_jitter_noise, training=False, top_k=k)
        elif g == "sigmoid_group":
            if mask is not None:
                # the smaller model's router holds only the kept rows, regrouped contiguously into n_group groups:
                # route among the kept experts exactly so, then name them by their original ids
                kept = mask.to(logits.device).nonzero().flatten()
                bias = self.router.e_score_correction_bias
                w, sub = self._group_route(logits.index_select(-1, kept), bias.index_select(-1, kept.to(bias.device)))
                return logits, w, kept[sub]
            w, idx = self._group_route(logits, self.router.e_score_correction_bias)
        else:
            raise NotImplementedError(f"gating {g!r}")
        return logits, w, idx

    def _group_route(self, logits: torch.Tensor, correction_bias: torch.Tensor):
        """DeepSeek-V3's group-limited choice over the experts in ``logits`` (groups are contiguous runs)."""
        r, k = self.router, self.top_k
        scores = torch.sigmoid(logits)
        choice = scores + correction_bias
        E, G = scores.shape[-1], r.num_group
        gs = choice.view(-1, G, E // G).topk(min(2, E // G), dim=-1)[0].sum(-1)
        gidx = torch.topk(gs, k=r.topk_group, dim=-1, sorted=False)[1]
        gmask = torch.zeros_like(gs).scatter_(1, gidx, 1).unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
        choice = choice.masked_fill(~gmask.bool(), float("-inf"))
        idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if r.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * r.routed_scaling_factor, idx

    def forward(self, hidden: torch.Tensor, observer: Any = None, edit: Any = None):
        """The block's output recomputed from the view, optionally observed or edited.

        edit (see ``explorer.transform.LayerEdit``): ``keep`` bool [E] of experts that may be routed to;
        ``tensors`` (gate_up, down, gate_up_bias, down_bias) for the kept experts in order, used with ``slot``
        (long [E]: original expert -> row of ``tensors``); ``skip``: the MoE sub-layer adds nothing (Layer Drop).
        """
        with materialized(self.experts, self.router_linear):
            return self._forward(hidden, observer, edit)

    @property
    def device(self) -> torch.device:
        """Where this layer computes (its execution device when accelerate dispatched the model)."""
        return module_device(self.experts)

    def _forward(self, hidden: torch.Tensor, observer: Any, edit: Any):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        logits, w, idx = self.route(x, None if edit is None else edit.keep)
        if edit is not None and edit.skip:
            out = torch.zeros_like(x)
        else:
            lat = self.family.latent
            xe = x if lat is None else getattr(self.block, lat[0])(x)
            out = self.combine(xe, w, idx, observer=observer, logits=logits, edit=edit)
            if lat is not None:
                out = getattr(self.block, lat[1])(out)
            if self.family.block_scale:
                out = out * self.block.routed_scaling_factor
            sh = self.shared_out(x)
            if sh is not None:
                out = out + sh.reshape(out.shape)
            if self.family.post_norm is not None:
                out = getattr(self.block, self.family.post_norm)(out)
        if not self.family.flat_output:
            out = out.reshape(shape)
        if self.family.returns_tuple:
            return out, logits
        return out

    def combine(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, observer: Any = None,
                logits: torch.Tensor | None = None, edit: Any = None) -> torch.Tensor:
        """Σ_k g_k · f_{e_k}(x) over the routed (token, expert) pairs only (never dense).

        Two equal paths (tested to 1e-5): on CUDA the pairs are sorted by expert and run through a grouped matmul
        with per-expert sums as segment reductions on the device (no host sync per layer); elsewhere a loop over
        the experts that received tokens, which measured faster on CPU. ``expert_path`` forces one.
        """
        if observer is not None:
            observer.begin(self, x, logits, w, idx)
        path = EXPERT_PATH if EXPERT_PATH != "auto" else ("grouped" if x.is_cuda else "loop")
        fn = self._combine_grouped if path == "grouped" else self._combine_loop
        return fn(x, w, idx, observer, edit)

    def _weights(self, edit: Any):
        """(gate_up, down, gate_up_bias, down_bias, slot): the expert tensors in use and expert -> row (None: id)."""
        if edit is None or edit.tensors is None:
            return self.gate_up, self.down, self.gate_up_bias, self.down_bias, None
        return (*edit.tensors, edit.slot)

    def _combine_loop(self, x, w, idx, observer, edit):
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32 if x.dtype != torch.float64 else x.dtype,
                          device=x.device)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tok_all = order // idx.shape[1]
        gates_all = w.reshape(-1)[order]
        gate_in = self.family.gating == "sigmoid_input"
        gu_all, dn_all, gb_all, db_all, slot = self._weights(edit)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = tok_all[start:start + n]
            g = gates_all[start:start + n]
            start += n
            xin = x[tok] * g[:, None].to(x.dtype) if gate_in else x[tok]
            r = e if slot is None else int(slot[e])
            gb = None if gb_all is None else gb_all[r]
            db = None if db_all is None else db_all[r]
            h = self.ffn_hidden(xin, gu_all[r], gb)
            y = self.ffn_out(h, dn_all[r], db)
            if observer is not None:
                observer.expert(self, e, tok, g, xin, h, y)
            contrib = y if gate_in else y * g[:, None].to(y.dtype)
            out.index_add_(0, tok, contrib.to(out.dtype))
        return out.to(x.dtype)

    def _combine_grouped(self, x, w, idx, observer, edit):
        gu_all, dn_all, gb_all, db_all, slot = self._weights(edit)
        flat = idx.reshape(-1)
        rows = flat if slot is None else on_device(slot, flat.device)[flat]  # row of the weight tensors per pair
        order = torch.argsort(rows, stable=True)
        row = rows[order]
        # per-group counts without bincount, which waits for the device to size its output
        counts = torch.zeros(gu_all.shape[0], dtype=torch.long, device=row.device)
        offs = torch.cumsum(counts.index_add_(0, row, torch.ones_like(row)), 0)
        tok = order // idx.shape[1]
        g = w.reshape(-1)[order]
        gate_in = self.family.gating == "sigmoid_input"
        xin = x[tok] * g[:, None].to(x.dtype) if gate_in else x[tok]
        # every layout as [rows, in, out] for the grouped product
        w_up = gu_all if self.transposed else gu_all.transpose(1, 2)
        w_dn = dn_all if self.transposed else dn_all.transpose(1, 2)
        gu = grouped_mm(xin, w_up, offs)
        if gb_all is not None:
            gu = gu + gb_all[row]
        h = self._apply_gate(gu)
        y = grouped_mm(h, w_dn, offs)
        if db_all is not None:
            y = y + db_all[row]
        if observer is not None:
            observer.experts(self, flat[order], tok, g, xin, h, y)
        contrib = y if gate_in else y * g[:, None].to(y.dtype)
        # back to (token, slot) order and a sum over the k slots: no atomic adds into the output
        pairs = torch.empty_like(contrib)
        pairs[order] = contrib
        acc = torch.float32 if x.dtype != torch.float64 else x.dtype
        return pairs.view(x.shape[0], idx.shape[1], -1).sum(1, dtype=acc).to(x.dtype)


EXPERT_PATH = "auto"  # "auto" (grouped on CUDA, loop elsewhere), "grouped" or "loop"


class expert_path:
    """Context manager forcing how ``MoELayer.combine`` runs the experts (tests compare the two paths)."""

    def __init__(self, path: str):
        if path not in ("auto", "grouped", "loop"):
            raise ValueError(f"expert path must be auto, grouped or loop, got {path!r}")
        self.path = path

    def __enter__(self):
        global EXPERT_PATH
        self.before, EXPERT_PATH = EXPERT_PATH, self.path
        return self

    def __exit__(self, *exc):
        global EXPERT_PATH
        EXPERT_PATH = self.before
        return False


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, copied once per (tensor, device) and kept on the tensor itself: a preview's masks and
    slot maps live on the CPU, and a copy per layer and forward would stall the device queue."""
    if t.device == device:
        return t
    per = t.__dict__.setdefault("_explorer_copies", {})
    if device not in per:
        per[device] = t.to(device)
    return per[device]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` sorted by group times that group's matrix: x [S, in], w [G, in, out], offs [G] cumulative ends.

    torch's grouped kernel on CUDA (``F.grouped_mm``, else ``torch._grouped_mm``, as transformers' grouped_mm
    experts do); elsewhere, or for shapes the kernel refuses, one product per group with a single host sync."""
    if x.is_cuda:
        fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
        if fn is not None:
            try:
                return fn(x.to(w.dtype), w, offs=offs.to(torch.int32))
            except (RuntimeError, NotImplementedError):  # e.g. alignment or an older GPU: the loop is exact
                pass
    out = x.new_empty(x.shape[0], w.shape[2])
    start = 0
    for i, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[i], out=out[start:end])
        start = end
    return out


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _main(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().reshape(-1), b.float().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


class _Mask:
    """The smallest edit ``MoELayer.forward`` takes: a routing mask (see transform.LayerEdit)."""

    def __init__(self, keep: torch.Tensor):
        self.keep, self.tensors, self.slot, self.skip = keep, None, None, False


def check_kept_ids(lay: "MoELayer") -> list[int]:
    """A small set of experts the layer may keep (one step above its least allowed count, spread over the groups):
    what the self-check routes among. Small, since the check copies these experts of one layer (16 + 8 of
    DeepSeek-V3's 256, about 1 GB in bf16; 9 of OLMoE's 64)."""
    E = lay.num_experts
    least, step = lay.keep_rule()
    g, _ = lay.groups
    n = max(least, min(E - step, least + step))
    if n >= E:
        return list(range(E))
    per = n // g
    size = E // g
    return [grp * size + j for grp in range(g) for j in range(size - per, size)]  # the last ``per`` of each group


def sliced_block(lay: "MoELayer", kept: list[int]) -> nn.Module:
    """A shallow copy of ``lay``'s block as the smaller model holds it: the kept experts' rows (copied), the
    sliced router, block-level per-expert tensors sliced. What ``apply`` writes, built for one layer."""
    b = copy.copy(lay.block)
    b._modules, b._parameters, b._buffers = dict(b._modules), dict(b._parameters), dict(b._buffers)
    ex = copy.copy(lay.experts)
    ex._parameters, ex._buffers = dict(ex._parameters), dict(ex._buffers)
    for m in (b, ex):  # accelerate's hooks and forward wrappers belong to the originals
        for name in ("forward", "_hf_hook", "_old_forward"):
            m.__dict__.pop(name, None)
    idx = torch.as_tensor(kept, dtype=torch.long)
    with materialized(lay.experts):
        for name, t in list(ex._parameters.items()):
            if t is not None and t.dim() and t.shape[0] == lay.num_experts:
                ex._parameters[name] = nn.Parameter(t.detach().index_select(0, idx.to(t.device)), requires_grad=False)
    for name in EXPERT_COUNT_NAMES:
        if getattr(ex, name, None) == lay.num_experts:
            setattr(ex, name, len(kept))
    attr_ex = next(n for n, m in lay.block.named_children() if m is lay.experts)
    attr_r = next(n for n, m in lay.block.named_children() if m is lay.router)
    b._modules[attr_ex] = ex
    router, _ = lay.sliced_router(kept)
    b._modules[attr_r] = router
    slice_experts_of(b, kept, lay.num_experts, recurse=False)
    return b


def check_layer(lay: "MoELayer", model_type: str, tokens: int = 16, seed: int = 0, masked: bool = True) -> None:
    """Refuse (UnsupportedModelError) what the view of this layer does not reproduce."""
    where = f"{model_type}: MoE layer {lay.index} (decoder layer {lay.layer_idx}, {type(lay.block).__name__})"
    n_held = lay.gate_up.shape[0]
    if n_held != lay.num_experts:
        raise UnsupportedModelError(
            f"{where}: its router scores {lay.num_experts} experts but the block holds {n_held}; routed slots "
            "without weights (zero-computation or null experts, as LongCat-Flash's) are not supported")
    dev = lay.device
    dtype = next((p.dtype for p in lay.router.parameters() if p.is_floating_point()), torch.float32)
    g = torch.Generator().manual_seed(seed + lay.index)
    x = torch.randn(1, tokens, lay.hidden_size, generator=g).to(dev, dtype)
    tol = _tolerance(dtype)
    with torch.no_grad():
        try:
            ref = _main(lay.block(x))
        except Exception as err:  # noqa: BLE001 - any failure of the family's own block is the answer
            raise UnsupportedModelError(
                f"{where} cannot be run on hidden states alone ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "the explorer cannot observe or edit it") from err
        try:
            got = _main(lay.forward(x))
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"{where}: {err}") from err
        except Exception as err:  # noqa: BLE001
            raise UnsupportedModelError(
                f"{where}: the explorer's view of the block fails ({type(err).__name__}: "
                f"{str(err).splitlines()[0]}); it does not know this family's layout") from err
        if got.numel() != ref.numel():
            raise UnsupportedModelError(f"{where}: the view's output has shape {tuple(got.shape)}, the block's "
                                        f"{tuple(ref.shape)}")
        err = _rel(got, ref)
        if not err <= tol:
            raise UnsupportedModelError(
                f"{where}: the view does not reproduce the block's own output (relative difference {err:.2g}, "
                f"tolerance {tol:g}); the block computes more than router + experts + shared experts as the "
                "explorer knows them, so its statistics and previews would be wrong. Refused.")
        if not masked:
            return
        kept = check_kept_ids(lay)
        if len(kept) == lay.num_experts:
            return
        keep = torch.zeros(lay.num_experts, dtype=torch.bool)
        keep[kept] = True
        try:
            small = _main(sliced_block(lay, kept)(x))
        except Exception as err:  # noqa: BLE001
            raise UnsupportedModelError(
                f"{where}: the block with {len(kept)} of {lay.num_experts} experts kept fails "
                f"({type(err).__name__}: {str(err).splitlines()[0]}); expert removal cannot be applied") from err
        got = _main(lay.forward(x, edit=_Mask(keep)))
        err = _rel(got, small)
        if not err <= tol:
            raise UnsupportedModelError(
                f"{where}: routing among {len(kept)} kept experts differs from the smaller model's own block "
                f"(relative difference {err:.2g}); previews of dropped or merged experts would be wrong. Refused.")


class MoEModel:
    """The MoE layers of a causal LM, found once, with uniform handles.

    ``check`` (default: whenever the weights are real, not on the meta device) holds the view against each MoE
    block's own forward before anything is computed from it; a family the view does not reproduce is refused
    with ``UnsupportedModelError`` naming the model type and what differs."""

    def __init__(self, model: nn.Module, check: bool | None = None):
        self.model = model
        self.config = model.config
        self.text_config = _text_config(model.config)
        self.family = family_of(model.config)
        self.layers: list[MoELayer] = list(_find_layers(model, self.family, self.text_config))
        if not self.layers:
            why = _why_not_found(model)
            raise NoMoELayersError(
                f"no MoE layers found in {type(model).__name__} (model_type={self.text_config.model_type!r}): "
                + (why if why else "expected decoder layers with an `mlp`/`block_sparse_moe`/`feed_forward`/`moe`/"
                   "`mixer` block holding stacked `experts.gate_up_proj` (or `up_proj`) and a router"))
        self.decoder_layers = _decoder_layers(model)
        if check is None:
            check = not any(p.device.type == "meta" for p in self.layers[0].router.parameters())
        if check:
            self.check()

    @property
    def model_type(self) -> str:
        return str(getattr(self.text_config, "model_type", type(self.model).__name__))

    def check(self, tokens: int = 16, seed: int = 0) -> None:
        """Run every MoE block and the view on the same random tokens and refuse the model in words where they
        differ: the block's output, and, for a routing mask, the block of the smaller model ``apply`` would build.
        Cheap (a few tokens per layer; a copy of a handful of one layer's experts); cached on the model."""
        key = (tuple(lay.num_experts for lay in self.layers), tuple(lay.intermediate_size for lay in self.layers))
        if self.model.__dict__.get("_explorer_checked") == key:
            return
        training = [(m, m.training) for m in (lay.block for lay in self.layers)]
        try:
            for lay in self.layers:
                lay.block.eval()  # jitter and dropout are training-time noise, not the family's routing
                check_layer(lay, self.model_type, tokens, seed, masked=lay.index == 0)
        finally:
            for m, t in training:
                m.train(t)
        self.model.__dict__["_explorer_checked"] = key

    @property
    def count_attr(self) -> str | None:
        stored = self.text_config.to_dict()
        for a in COUNT_ATTRS:
            if stored.get(a) is not None:
                return a
        for a in COUNT_ATTRS:
            if getattr(self.text_config, a, None) is not None:
                return a
        return None

    @property
    def top_k(self) -> int:
        return self.layers[0].top_k

    @property
    def num_experts(self) -> list[int]:
        return [lay.num_experts for lay in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[MoELayer]:
        return iter(self.layers)

    def __getitem__(self, i: int) -> MoELayer:
        return self.layers[i]

    def summary(self) -> dict:
        total = sum(p.numel() for p in self.model.parameters())
        routed = sum(lay.expert_params() * lay.num_experts for lay in self.layers)
        inactive = sum(lay.expert_params() * (lay.num_experts - lay.top_k) for lay in self.layers)
        return {
            "model_type": self.text_config.model_type, "architecture": type(self.model).__name__,
            "decoder_layers": len(self.decoder_layers), "moe_layers": len(self.layers),
            "moe_layer_indices": [lay.layer_idx for lay in self.layers],
            "experts": self.num_experts, "top_k": self.top_k, "gating": self.family.gating,
            "shared_experts": bool(self.layers[0].shared), "count_attr": self.count_attr,
            "params_total": total, "params_routed_experts": routed, "params_active": total - inactive,
        }

    def patched(self, forward: Callable[[MoELayer, torch.Tensor], Any]) -> "_Patch":
        """Context manager: every MoE block runs ``forward(layer, hidden)`` instead of its own forward."""
        return _Patch(self, forward)


class _Patch:
    def __init__(self, view: MoEModel, fn):
        self.view, self.fn = view, fn

    def __enter__(self):
        for lay in self.view.layers:
            lay.block.forward = (lambda hs, *a, _l=lay, **k: self.fn(_l, hs))
        return self.view

    def __exit__(self, *exc):
        for lay in self.view.layers:
            if "forward" in lay.block.__dict__:
                del lay.block.forward
        return False


def _why_not_found(model: nn.Module) -> str:
    """What the model holds instead, in words, when it has expert-like modules the view does not take."""
    try:
        layers = _decoder_layers(model)
    except NoMoELayersError:
        layers = [model]
    for dl in layers:
        if dl is not model and isinstance(getattr(dl, "experts", None), nn.Module):
            return (f"{type(dl).__name__} holds its router and experts directly, beside a dense MLP, with no MoE "
                    "block of their own to observe and cut; not supported")
        for name, m in dl.named_modules():
            cls = type(m).__name__
            low = cls.lower()
            if ("expert" in low or low.endswith("moe") or "moeblock" in low) and m is not dl and not any(isinstance(getattr(m, a, None), torch.Tensor)
                                                   for a in ("gate_up_proj", "up_proj")):
                return (f"its experts ({cls}) are not stacked per-expert tensors (gate_up_proj or up_proj, and "
                        "down_proj), which the explorer needs to observe and cut them; not supported")
    return ""


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for cand in (base, getattr(base, "model", None), getattr(base, "language_model", None)):
        layers = getattr(cand, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise NoMoELayersError(f"{type(model).__name__} has no `layers` list of decoder layers")


def _find_layers(model, family: Family, cfg) -> Iterator[MoELayer]:
    try:
        layers = _decoder_layers(model)
    except NoMoELayersError:
        return
    n = 0
    for li, dl in enumerate(layers):
        block = next((getattr(dl, a) for a in BLOCK_ATTRS if hasattr(dl, a)), None)
        experts = getattr(block, "experts", None) if block is not None else None
        if experts is None or not any(isinstance(getattr(experts, a, None), torch.Tensor)
                                      for a in ("gate_up_proj", "up_proj")):
            continue
        router = next((getattr(block, a) for a in ROUTER_ATTRS if isinstance(getattr(block, a, None), nn.Module)), None)
        if router is None:
            continue
        top_k = next((getattr(o, a) for o in (router, block) for a in ("top_k", "topk", "num_experts_per_tok")
                      if isinstance(getattr(o, a, None), int)), None)
        top_k = top_k or next((getattr(cfg, a) for a in TOPK_ATTRS if isinstance(getattr(cfg, a, None), int)), 1)
        renorm = family.renorm_default
        if family.renorm_attr is not None:
            renorm = bool(getattr(cfg, family.renorm_attr, family.renorm_default))
        shared = [getattr(block, a) for a in SHARED_ATTRS if isinstance(getattr(block, a, None), nn.Module)]
        yield MoELayer(index=n, layer_idx=li, block=block, router=router, experts=experts, family=family,
                       top_k=int(top_k), renorm=renorm, shared=shared,
                       shared_gate=getattr(block, "shared_expert_gate", None), decoder_layer=dl,
                       model_hidden=getattr(cfg, "hidden_size", None))
        n += 1
