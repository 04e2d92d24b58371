"""A uniform view of the MoE layers inside any transformers causal LM.

Every family stores its experts fused (``gate_up_proj`` / ``down_proj``), but routers, gate normalisation,
shared experts, biases and block return values differ. Those differences live in the family table
(``layout.FAMILIES``) and in ``MoELayer``; nothing else in the package knows a family's name. The expert kernels
(``kernels``), accelerate's hooks (``devices``) and the self-check against each family's own block (``selfcheck``)
are modules of their own.

``MoELayer.forward`` recomputes a block's output from the view's tensors. The statistics pass, the what-if
preview (routing masks, merges, skips) and the correctness tests all run through it, so one tested code path
stands behind every number the explorer shows.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .devices import materialized, module_device
from .kernels import KERNELS, LayerEdit, Observer, kernel_for, on_device
from .layout import (BLOCK_ATTRS, COUNT_ATTRS, ROUTER_ATTRS, SHARED_ATTRS, TOPK_ATTRS, Family, NoMoELayersError,
                     UnsupportedModelError, expert_dim, family_of, slice_experts_of, text_config_of)
from .selfcheck import check_layer


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
    def fp8_kept(self) -> dict | None:
        """The expert tensors kept in block FP8 by the layer-by-layer engine (name -> ``BlockFP8Stack``), or None."""
        return self.experts.__dict__.get("explorer_fp8")

    @property
    def gate_up(self) -> torch.Tensor:
        kept = self.fp8_kept
        return kept[self.gate_up_name] if kept else getattr(self.experts, self.gate_up_name)

    @property
    def down(self) -> torch.Tensor:
        kept = self.fp8_kept
        return kept["down_proj"] if kept else self.experts.down_proj

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

    @property
    def per_group_least(self) -> int:
        """Experts each group must keep: DeepSeek-V3's router scores a group by its two best experts
        (``topk(2)`` in transformers' code, which fails on a group of one), other grouped routers by their best."""
        return 2 if self.groups[0] > 1 and self.family.gating == "sigmoid_group" else 1

    def keep_rule(self) -> tuple[int, int]:
        """(least experts this layer may keep, the step the kept count must be a multiple of)."""
        g, tg = self.groups
        return max(self.top_k, g * max(self.per_group_least, -(-self.top_k // tg))), g

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
        if g > 1 and kept // g < self.per_group_least:
            return (f"the router scores each of its {g} groups by its two best experts: keep at least "
                    f"{self.per_group_least} per group ({g * self.per_group_least} in all); the plan keeps {kept}")
        return None

    def expert_weight_params(self) -> int:
        """Weights (not biases) of one routed expert: what quantisation stores in fewer bits."""
        return self.gate_up[0].numel() + self.down[0].numel()

    def expert_params_at(self, width: int) -> int:
        """Parameters of one routed expert slimmed (or padded) to ``width`` intermediate neurons."""
        gub = self.gate_up_bias[0].numel() if self.gate_up_bias is not None else 0
        db = self.down_bias[0].numel() if self.down_bias is not None else 0
        return (self.gate_up[0].numel() + self.down[0].numel() + gub) * width // self.intermediate_size + db

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
    def apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
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
        return self.apply_gate(gu)

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
        """Every expert on every token of a (small) sample x [n, H] -> [E, n, H], in two batched products. Written
        as one wide product and a bmm, not einsum: on a CPU, einsum's bf16 path is about 50x slower."""
        E, n = self.num_experts, x.shape[0]
        if self.fp8_kept:  # one expert dequantised at a time
            return torch.stack([self.expert(e, x) for e in range(E)])
        if self.transposed:
            gu = torch.bmm(x.expand(E, n, x.shape[-1]), self.gate_up)
        else:
            gu = F.linear(x, self.gate_up.reshape(-1, self.gate_up.shape[-1])).reshape(n, E, -1).transpose(0, 1)
        if self.gate_up_bias is not None:
            gu = gu + self.gate_up_bias[:, None, :]
        h = self.apply_gate(gu)
        y = torch.bmm(h, self.down if self.transposed else self.down.transpose(1, 2))
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
        if self.family.gating == "sigmoid_group" and self.check_kept(len(kept)) is not None:
            # no smaller model routes so (plans keep whole multiples of the groups): a saliency criterion's single
            # removal, routed by the full router with the removed experts never chosen
            logits = self.logits(x)
            w, idx = self._group_route(logits, self.router.e_score_correction_bias, on_device(mask, logits.device))
            return logits, w, idx
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

    def _group_route(self, logits: torch.Tensor, correction_bias: torch.Tensor, allowed: torch.Tensor | None = None):
        """DeepSeek-V3's group-limited choice over the experts in ``logits`` (groups are contiguous runs).
        ``allowed`` bool [E]: the others are never chosen; groups are scored by their allowed experts, and when the
        chosen groups hold fewer than top-k allowed experts the best allowed ones of the other groups fill in."""
        r, k = self.router, self.top_k
        scores = torch.sigmoid(logits)
        choice = scores + correction_bias
        E, G = scores.shape[-1], r.num_group
        ranked = choice if allowed is None else choice.masked_fill(~allowed, -1e4)
        gs = ranked.view(-1, G, E // G).topk(min(2, E // G), dim=-1)[0].sum(-1)
        gidx = torch.topk(gs, k=r.topk_group, dim=-1, sorted=False)[1]
        gmask = torch.zeros_like(gs).scatter_(1, gidx, 1).unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
        if allowed is None:
            choice = choice.masked_fill(~gmask.bool(), float("-inf"))
        else:
            choice = (choice - 1e4 * (1 - gmask)).masked_fill(~allowed, float("-inf"))
        idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if r.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * r.routed_scaling_factor, idx

    def forward(self, hidden: torch.Tensor, observer: Observer | None = None, edit: LayerEdit | None = None):
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

    def _forward(self, hidden: torch.Tensor, observer: Observer | None, edit: LayerEdit | None):
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

    def combine(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, observer: Observer | None = None,
                logits: torch.Tensor | None = None, edit: LayerEdit | None = None) -> torch.Tensor:
        """Σ_k g_k · f_{e_k}(x) over the routed (token, expert) pairs only (never dense).

        Two equal paths (tested to 1e-5): on CUDA the pairs are sorted by expert and run through a grouped matmul
        with per-expert sums as segment reductions on the device (no host sync per layer); elsewhere a loop over
        the experts that received tokens, which measured faster on CPU. ``expert_path`` forces one.
        """
        if observer is not None:
            observer.begin(self, x, logits, w, idx)
        # experts kept in FP8 are dequantised one at a time, as the loop computes them
        kernel = KERNELS["loop"] if self.fp8_kept else kernel_for(x)
        out = kernel(self, x, w, idx, observer, edit)
        if observer is not None:
            observer.end(self)
        return out

    def expert_weights(self, edit: LayerEdit | None):
        """(gate_up, down, gate_up_bias, down_bias, slot): the expert tensors in use and expert -> row (None: id)."""
        if edit is None or edit.tensors is None:
            return self.gate_up, self.down, self.gate_up_bias, self.down_bias, None
        return (*edit.tensors, edit.slot)

class MoEModel:
    """The MoE layers of a causal LM, found once, with uniform handles.

    ``check`` (default: whenever the weights are real, not on the meta device) holds the view against each MoE
    block's own forward before anything is computed from it; a family the view does not reproduce is refused
    with ``UnsupportedModelError`` naming the model type and what differs."""

    def __init__(self, model: nn.Module, check: bool | None = None):
        self.model = model
        self.config = model.config
        self.text_config = text_config_of(model.config)
        self.family = family_of(model.config)
        self.layers: list[MoELayer] = list(_find_layers(model, self.family, self.text_config))
        for lay in self.layers:  # the model a layer belongs to (what its checkpoint's key conversions belong to)
            lay.root = model
        if not self.layers:
            why = _why_not_found(model)
            raise NoMoELayersError(
                f"no MoE layers found in {type(model).__name__} (model_type={self.text_config.model_type!r}): "
                + (why if why else "expected decoder layers with an `mlp`/`block_sparse_moe`/`feed_forward`/`moe`/"
                   "`mixer` block holding stacked `experts.gate_up_proj` (or `up_proj`) and a router"))
        self.decoder_layers = decoder_layers_of(model)
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

    def layers_hand_on_hidden_states_only(self) -> bool:
        """Whether the model's layer loop takes the hidden states alone from each decoder layer
        (``hidden_states = decoder_layer(...)``), read off its source: then a layer can be stood in for by its
        input (Block Drop's preview) or run on its own (the layer-by-layer engine). GLM-MoE-DSA hands its
        indexer's choices on as well."""
        import inspect
        import re

        stack = next((m for m in self.model.modules() if getattr(m, "layers", None) is self.decoder_layers), None)
        try:
            src = inspect.getsource(type(stack).forward)
        except (TypeError, OSError):
            src = ""
        m = re.search(r"for\s+(?:\w+\s*,\s*)?(\w+)\s+in\s+(?:enumerate\()?self\.layers", src)
        target = None
        if m:
            call = re.search(r"\n\s*([\w, ]+?)\s*=\s*" + re.escape(m.group(1)) + r"\(", src)
            target = call.group(1) if call else None
        return not (target is None or "," in target or re.search(re.escape(target) + r"\s*\[", src))

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
        layers = decoder_layers_of(model)
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


def decoder_layers_of(model: nn.Module) -> nn.ModuleList:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for cand in (base, getattr(base, "model", None), getattr(base, "language_model", None)):
        layers = getattr(cand, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise NoMoELayersError(f"{type(model).__name__} has no `layers` list of decoder layers")


def _find_layers(model, family: Family, cfg) -> Iterator[MoELayer]:
    try:
        layers = decoder_layers_of(model)
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
