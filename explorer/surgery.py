"""Model surgery: what removing experts, MoE sub-layers and decoder layers does to a model's modules and config.

Shared by the in-memory apply, the operations (Layer Drop, Block Drop, slimming) and loading an export whose
per-layer shapes a stock config cannot describe (``explorer_layout.json``). Below the plan: it takes a plan only
to ask which blocks it drops.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import PlanError
from .layout import BLOCK_ATTRS, EXPERT_COUNT_NAMES, slice_experts_of
from .moe import MoELayer, MoEModel, decoder_layers_of
from .perlayer import DroppedMoE

LAYOUT_FILE = "explorer_layout.json"
INDEX_LISTS = ("mlp_only_layers", "moe_layers", "sliding_window_layers", "full_attention_layers")


def set_param(mod: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        return
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value.detach().clone().contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(mod, name, value.detach().clone().contiguous())


def intermediate_attr(cfg) -> str:
    d = cfg.to_dict()
    return "moe_intermediate_size" if d.get("moe_intermediate_size") is not None else "intermediate_size"


def resize_layer(lay: MoELayer, kept: list[int] | None, tensors: tuple | None, n_experts: int, inter: int) -> None:
    """Write new expert tensors and router rows into ``lay``'s modules and update every cached count."""
    ex, rl = lay.experts, lay.router_linear
    if tensors is not None:
        set_param(ex, lay.gate_up_name, tensors[0])
        set_param(ex, "down_proj", tensors[1])
        if tensors[2] is not None:
            set_param(ex, "gate_up_proj_bias", tensors[2])
        if tensors[3] is not None:
            set_param(ex, "down_proj_bias", tensors[3])
    if kept is not None:  # router rows, router and choice biases, ERNIE's moe_statics...: one rule with preview
        E = lay.num_experts
        slice_experts_of(lay.router, kept, E)
        slice_experts_of(lay.block, kept, E, recurse=False)
    for mod in (ex, lay.router, rl, lay.block):
        for name in EXPERT_COUNT_NAMES:
            if isinstance(getattr(mod, name, None), int):
                setattr(mod, name, n_experts)
    if isinstance(rl, nn.Linear):
        rl.out_features = n_experts
    for name in ("intermediate_dim", "intermediate_size", "expert_dim"):
        if isinstance(getattr(ex, name, None), int):
            setattr(ex, name, inter)


def _block_attr(dl: nn.Module) -> str:
    return next(a for a in BLOCK_ATTRS if hasattr(dl, a))


def drop_moe_sublayer(lay: MoELayer, drop_norm: bool = False) -> None:
    """Layer Drop: the MoE block adds nothing, exactly as the preview's skip does. The norm before it stays: in
    post-norm families (FlexOLMo) or where it also feeds a shared MLP (GraniteMoE-shared) it is not the block's
    own. ``drop_norm`` reads exports of earlier versions, which removed it."""
    dl = lay.decoder_layer
    setattr(dl, _block_attr(dl), DroppedMoE(lay.family.returns_tuple, lay.family.flat_output))
    if drop_norm and hasattr(dl, "post_attention_layernorm"):
        dl.post_attention_layernorm = nn.Identity()


def remove_blocks(model: nn.Module, view: MoEModel, plan) -> None:
    layers = view.decoder_layers
    n_old = len(layers)
    keep = plan.kept_blocks(n_old)
    new = nn.ModuleList([layers[i] for i in keep])
    for new_i, dl in enumerate(new):  # KV-cache indices follow the new numbering
        old_i = keep[new_i]
        for mod in dl.modules():
            v = getattr(mod, "layer_idx", None)
            if isinstance(v, int) and not isinstance(v, bool):
                # a sub-layer numbered 2*i + j (LongCat's two attention sub-layers per layer) keeps its j
                mod.layer_idx = 2 * new_i + (v - 2 * old_i) if v != old_i and 0 <= v - 2 * old_i <= 1 else new_i
    parent = model.get_decoder() if hasattr(model, "get_decoder") else model
    for cand in (parent, getattr(parent, "model", None), getattr(parent, "language_model", None)):
        if cand is not None and getattr(cand, "layers", None) is layers:
            cand.layers = new
            break
    block_drop_config(view.text_config, keep, n_old)


def block_drop_config(cfg, keep: list[int], n_old: int) -> None:
    """Renumber a config after Block Drop: layer count, per-layer lists and layer-index lists."""
    stored = cfg.to_dict()
    counts = [a for a in ("num_layers", "n_layers") if isinstance(stored.get(a), int)]
    if counts:  # the field the config stores (LongCat derives num_hidden_layers = 2 * num_layers from it)
        for a in counts:
            setattr(cfg, a, len(keep))
    else:
        cfg.num_hidden_layers = len(keep)
    remap = {old: new_i for new_i, old in enumerate(keep)}
    for name, val in list(cfg.to_dict().items()):
        if isinstance(val, dict) and val and all(str(k).lstrip("-").isdigit() for k in val):
            # per-layer settings keyed by layer index (dots.llm3's per_layer_config)
            setattr(cfg, name, {type(k)(remap[int(k)]): v for k, v in val.items() if int(k) in remap})
            continue
        if name in ("num_hidden_layers", "num_layers", "n_layers") or not isinstance(val, list):
            continue
        if name in INDEX_LISTS and all(isinstance(v, int) for v in val):
            setattr(cfg, name, [remap[v] for v in val if v in remap])
        elif len(val) == n_old:  # one entry per layer (layer_types, no_rope_layers, ...)
            setattr(cfg, name, [v for i, v in enumerate(val) if i in remap])
    k = getattr(cfg, "first_k_dense_replace", None)
    if isinstance(k, int):
        cfg.first_k_dense_replace = sum(1 for i in keep if i < k)


DROPPED = "<dropped MoE>"


def _kinds(layers, dropped: dict | None = None) -> list[dict]:
    """Each decoder layer's kind: {child name: class} (attention or mamba, dense MLP or MoE...). A MoE sub-layer
    that Layer Drop removed (in the model, or named in ``dropped``: {layer: child name}) is DROPPED."""
    out = []
    for i, dl in enumerate(layers):
        kind = {n: DROPPED if isinstance(m, DroppedMoE) else type(m).__name__ for n, m in dl.named_children()}
        for n in (dropped or {}).get(i, []):
            kind[n] = DROPPED
        out.append(kind)
    return out


def _same_kind(want: dict, have: dict, moe: set) -> bool:
    """A layer the config builds (``want``) is the one held (``have``); a dropped MoE sub-layer stands for a MoE
    block (``moe``: the family's block classes) and nothing else: where the renumbered config builds a dense MLP,
    the layout file could not say the MoE sub-layer is gone."""
    return want.keys() == have.keys() and all(have[n] == c or (have[n] == DROPPED and c in moe)
                                              for n, c in want.items())


def layer_pattern_problem(view: MoEModel, plan) -> str | None:
    """Why the config renumbered after ``plan``'s Block Drop would build other layers than the ones kept, or None.
    Where a family derives layer kinds from a period (Jamba's attn/expert_layer_period, Qwen2-MoE's
    decoder_sparse_step), dropping a block in the middle shifts the pattern: a cache of the wrong kind, MoE where
    a dense MLP was. Asked by ``validate`` on the untouched model, so a plan the preview accepts is one apply
    writes."""
    from transformers import AutoModelForCausalLM

    blocks = plan.dropped_blocks()
    if not blocks:
        return None
    n_old = len(view.decoder_layers)
    keep = [i for i in range(n_old) if i not in set(blocks)]
    cache = view.__dict__.setdefault("_pattern_problems", {})
    key = (tuple(blocks), tuple(plan.dropped_layers()))
    if key not in cache:
        cfg = copy.deepcopy(view.model.config)
        block_drop_config(cfg.get_text_config(), keep, n_old)
        with torch.device("meta"):
            ref = AutoModelForCausalLM.from_config(cfg)
        names = {id(m): n for dl in view.decoder_layers for n, m in dl.named_children()}
        dropped = {}
        for i in plan.dropped_layers():
            lay = view[i]
            dropped.setdefault(lay.layer_idx, []).append(names.get(id(lay.block)))
        want = _kinds(_stack(ref))
        have = [k for i, k in enumerate(_kinds(view.decoder_layers, dropped)) if i in set(keep)]
        moe = {type(lay.block).__name__ for lay in view}
        bad = [i for i, (a, b) in enumerate(zip(want, have)) if not _same_kind(a, b, moe)]
        if bad or len(want) != len(have):
            cache[key] = _pattern_message(view, blocks, bad[0] if bad else len(min(want, have, key=len)))
        else:
            cache[key] = _no_attention_left(view, keep, blocks) or _settings_problem(view, _stack(ref), keep, blocks)
    return cache[key]


def _no_attention_left(view: MoEModel, keep: list[int], blocks: list[int]) -> str | None:
    """A hybrid whose attention layers all go (Nemotron-H's one attention layer among mamba layers): transformers
    builds the causal mask from an attention layer's cache, and fails without one."""
    types = getattr(view.text_config, "layer_types", None)
    if not isinstance(types, list) or len(types) != len(view.decoder_layers):
        return None
    attn = [i for i, t in enumerate(types) if isinstance(t, str) and "attention" in t and "linear" not in t]
    if attn and not any(i in keep for i in attn):
        return (f"{view.model_type}: dropping decoder layer(s) {blocks} removes every attention layer ({attn}); the "
                "model's mask and cache need one: keep at least one of them")
    return None


_INDEX_ATTRS = ("layer_idx", "layer_index", "layer_id", "layer_number")


def _settings(module) -> dict:
    """A module's own scalar settings, sub-modules included (``name.attr`` -> value): what a config builds."""
    out = {}
    for name, m in module.named_modules():
        for attr, v in vars(m).items():
            if not attr.startswith("_") and attr != "training" and isinstance(v, (bool, int, float, str)):
                out[f"{name}.{attr}"] = v
    return out


def _settings_problem(view: MoEModel, ref_layers, keep: list[int], blocks: list[int]) -> str | None:
    """Each kept layer as the renumbered config builds it has the settings the layer holds, except its own index:
    a family that derives more from a layer's position (Beam's depth-scaled residuals, 2 * (layer_idx + 1)) would
    reload as another model. Layers before the first dropped block keep their positions and are not asked."""
    for new, old in enumerate(keep):
        if old < min(blocks):
            continue
        have, want = _settings(view.decoder_layers[old]), _settings(ref_layers[new])
        for k, v in have.items():
            if k not in want or want[k] == v:
                continue
            if k.rsplit(".", 1)[-1] in _INDEX_ATTRS and v == old and want[k] == new:
                continue  # its index, renumbered as apply renumbers it
            if v == len(view.decoder_layers) and want[k] == len(ref_layers):
                continue  # a copy of the model's layer count (MiniMax's attention keeps one), the new count
            return (f"{view.model_type}: after dropping decoder layer(s) {blocks}, decoder layer {old} (new {new}) "
                    f"would be rebuilt with {k.lstrip('.')} = {want[k]!r} where it holds {v!r}: this family derives "
                    "it from the layer's position, so the export would be another model; drop the last blocks, or "
                    "use Layer Drop")
    return None


def check_layer_kinds(model, view: MoEModel, plan) -> None:
    """After Block Drop, the renumbered config still builds the layers the new model holds (see
    ``layer_pattern_problem``, which ``validate`` asks first); refused in words rather than written."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    want = _kinds(_stack(ref))
    have = _kinds(_stack(model))
    moe = {type(lay.block).__name__ for lay in view}
    bad = [i for i, (a, b) in enumerate(zip(want, have)) if not _same_kind(a, b, moe)]
    if bad or len(want) != len(have):
        raise PlanError(_pattern_message(view, plan.dropped_blocks(), bad[0] if bad else len(min(want, have, key=len))))


def _pattern_message(view: MoEModel, blocks: list[int], at: int) -> str:
    return (f"{view.model_type}: after dropping decoder layer(s) {blocks} the config's layer pattern no longer "
            f"matches the layers kept (first at new layer {at}): this family sets layer kinds by a period; drop other "
            "blocks (at the end), or use Layer Drop")


def _stack(model):
    return decoder_layers_of(model)
