"""Materialise a plan into a new, genuinely smaller model, and export it atomically.

Expert tensors, router rows, router biases and score-correction biases are sliced together; every cached expert
count (config, experts module, router, block, ``nn.Linear.out_features``) is updated; merged experts are stored
once. Where a stock config can describe the result (same expert count and width in every MoE layer, no MoE
sub-layer dropped), ``save_pretrained`` output loads with plain ``AutoModelForCausalLM.from_pretrained``.
Otherwise ``explorer_layout.json`` records the per-layer shapes and ``load_model`` restores it.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from .moe import BLOCK_ATTRS, EXPERT_COUNT_NAMES, MoELayer, MoEModel, slice_experts_of
from .outputs import check_export_dir, staged_dir
from .plan import Plan, PlanError, fingerprint
from .transform import layer_edit

LAYOUT_FILE = "explorer_layout.json"
INDEX_LISTS = ("mlp_only_layers", "moe_layers", "sliding_window_layers", "full_attention_layers")


class DroppedMoE(nn.Module):
    """Stands where a dropped MoE sub-layer was (Layer Drop): contributes nothing, holds no weights."""

    def __init__(self, returns_tuple: bool = False, flat: bool = False):
        super().__init__()
        self.returns_tuple, self.flat = returns_tuple, flat

    def forward(self, hidden_states, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        if self.flat:
            out = out.reshape(-1, out.shape[-1])
        return (out, None) if self.returns_tuple else out


def _set_param(mod: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        return
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value.detach().clone().contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(mod, name, value.detach().clone().contiguous())


def _intermediate_attr(cfg) -> str:
    d = cfg.to_dict()
    return "moe_intermediate_size" if d.get("moe_intermediate_size") is not None else "intermediate_size"


def _resize_layer(lay: MoELayer, kept: list[int] | None, tensors: tuple | None, n_experts: int, inter: int) -> None:
    """Write new expert tensors and router rows into ``lay``'s modules and update every cached count."""
    ex, rl = lay.experts, lay.router_linear
    if tensors is not None:
        _set_param(ex, lay.gate_up_name, tensors[0])
        _set_param(ex, "down_proj", tensors[1])
        if tensors[2] is not None:
            _set_param(ex, "gate_up_proj_bias", tensors[2])
        if tensors[3] is not None:
            _set_param(ex, "down_proj_bias", tensors[3])
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


def _drop_moe_sublayer(lay: MoELayer, drop_norm: bool = False) -> None:
    """Layer Drop: the MoE block adds nothing, exactly as the preview's skip does. The norm before it stays: in
    post-norm families (FlexOLMo) or where it also feeds a shared MLP (GraniteMoE-shared) it is not the block's
    own. ``drop_norm`` reads exports of earlier versions, which removed it."""
    dl = lay.decoder_layer
    setattr(dl, _block_attr(dl), DroppedMoE(lay.family.returns_tuple, lay.family.flat_output))
    if drop_norm and hasattr(dl, "post_attention_layernorm"):
        dl.post_attention_layernorm = nn.Identity()


def _drop_blocks(model: nn.Module, view: MoEModel, plan: Plan) -> None:
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


def apply_plan(model, view: MoEModel, plan: Plan, stats=None, inplace: bool = False):
    """(new model, its view, layout or None). The original is untouched unless ``inplace``."""
    plan.validate(view)
    if stats is not None:
        stats.check_fits(view)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise PlanError("this model has weights offloaded by a device map; applying a plan needs the whole model in "
                        "memory. Load it without --device-map (statistics, preview and perplexity work with one).")
    edits = {lay.index: layer_edit(lay, plan, stats, materialise=True) for lay in view}  # before any change
    params = plan.param_edits(view)
    if not inplace:
        model = copy.deepcopy(model)
        view = MoEModel(model)
    with torch.no_grad():
        for qn, (value, notes) in params.items():  # weights outside the experts (quantised attention, ...)
            model.get_parameter(qn).copy_(value)
            if notes:
                mod = model.get_submodule(qn.rsplit(".", 1)[0])
                mod._explorer_notes = {**getattr(mod, "_explorer_notes", {}), **notes}
    blocked = plan.blocked_moe_layers(view)
    counts, inters = {}, {}
    with torch.no_grad():
        for lay in view:
            e = edits[lay.index]
            if lay.index in blocked:
                continue
            if e.skip:
                _drop_moe_sublayer(lay)
                continue
            inter = e.tensors[1].shape[1 if lay.transposed else 2]
            _resize_layer(lay, e.kept, e.tensors, len(e.kept), inter)
            counts[lay.layer_idx], inters[lay.layer_idx] = len(e.kept), inter
            if e.notes:  # by new expert slot, for the export (e.g. quantisation scales: explorer.ops.quantise)
                lay.experts._explorer_notes = {name: {int(e.slot[x]): v for x, v in note.items()}
                                               for name, note in e.notes.items()}
    cfg = view.text_config
    count_attr = view.count_attr
    if counts and count_attr:
        old = getattr(cfg, count_attr)
        setattr(cfg, count_attr, max(counts.values()))
        for mod in (model, getattr(model, "model", None)):  # counts cached outside the MoE blocks (aux loss)
            for name in ("num_experts", "num_local_experts"):
                if mod is not None and getattr(mod, name, None) == old:
                    setattr(mod, name, max(counts.values()))
    dropped_sub = [view[i].layer_idx for i in plan.dropped_layers()]
    from .ops import OPS

    for name, spec in plan.ops.items():  # structural changes (Block Drop removes decoder layers)
        OPS[name].apply_model(spec, model, view, plan)
    if inters:  # after Block Drop: the config must describe the layers that are left
        attr = _intermediate_attr(cfg)
        before = getattr(cfg, attr)
        setattr(cfg, attr, max(inters.values()))
        if not config_describes(model):  # e.g. shared experts sized by the same attribute: keep it as it was
            setattr(cfg, attr, before)
    n_dec_new = cfg.num_hidden_layers
    old_to_new = plan.block_map(len(view.decoder_layers))
    layout = {
        "fingerprint_before": fingerprint(view),
        "num_hidden_layers": n_dec_new,
        "moe": {str(old_to_new[li]): {"num_experts": counts[li], "intermediate": inters[li]} for li in counts},
        "dropped_moe_sublayers": [old_to_new[li] for li in dropped_sub],
        "norms_kept": True,
        "plan": plan.to_dict(),
    }
    new_view = MoEModel(model) if len(counts) else None
    if not config_describes(model):
        return model, new_view, layout
    return model, new_view, None


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


def layer_pattern_problem(view: MoEModel, plan: Plan) -> str | None:
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


def _check_layer_kinds(model, view: MoEModel, plan: Plan) -> None:
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
    from .moe import _decoder_layers

    return _decoder_layers(model)


def config_describes(model) -> bool:
    """Whether a model built from ``model.config`` alone has exactly ``model``'s tensors."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return a == b


def dequantised_note(model, source: str | os.PathLike | None = None) -> str | None:
    """What an in-memory export of a quantised input is, in words (None for a plain input): the weights as loaded,
    dequantised, with no quantization_config or scale tensors, so the explorer and plain transformers both load it."""
    from .weightformats import quant_config

    was = getattr(model, "explorer_dequantised", None)
    if was is None and source is not None and Path(source).is_dir():
        qc = quant_config(Path(source))
        was = qc and f"{qc.get('quant_method')}-quantised, dequantised by transformers on load"
    if not was:
        return None
    dt = next(model.parameters()).dtype
    return (f"the input is {was}; this export is {str(dt).replace('torch.', '')} (about {dt.itemsize}x the bytes "
            "per weight) without a quantization_config or scale tensors, so plain transformers and the explorer "
            "load it; apply --out-of-core keeps the input's format, or add a quantise step to the plan")


def export(model, tokenizer, plan: Plan, out_dir: str | os.PathLike, layout: dict | None = None,
           summary: dict | None = None, source: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write model, tokenizer, plan and summary to ``out_dir`` atomically (all or nothing).

    The folder rules of ``explorer.outputs.check_export_dir`` apply (never the input model, the working directory
    or the home folder; ``overwrite`` replaces only a previous export). Partial folders of killed runs are removed.
    """
    out = check_export_dir(out_dir, source=source, overwrite=overwrite)
    note = dequantised_note(model, source)
    if note and "weight_format" not in (summary or {}):
        summary = {**(summary or {}), "weight_format": note}
    with staged_dir(out, overwrite) as tmp:
        if layout is None:
            model.save_pretrained(tmp, safe_serialization=True)
            from .ops import OPS

            for name, spec in plan.ops.items():  # operations with a stored format of their own (packed experts)
                note = OPS[name].write_export(spec, model, tmp)
                if note:
                    summary = {**(summary or {}), "weight_format": note}
        else:
            from safetensors.torch import save_model

            model.config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))
            (tmp / LAYOUT_FILE).write_text(json.dumps(layout, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.to_json(tmp / "plan.json")
        summary = {**(summary or {}), "bytes_written": weight_bytes(tmp)}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return out


def weight_bytes(folder: str | os.PathLike) -> int:
    """The bytes of a model folder's weight files, as ``du`` counts them (what the report's sizes are held to)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
