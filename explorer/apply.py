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

from .moe import MoEModel
from .ops import OPS
from .outputs import check_export_dir, staged_dir
from .plan import Plan, PlanError, fingerprint
from .surgery import LAYOUT_FILE, drop_moe_sublayer, intermediate_attr, resize_layer
from .transform import layer_edit

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
                drop_moe_sublayer(lay)
                continue
            inter = e.tensors[1].shape[1 if lay.transposed else 2]
            resize_layer(lay, e.kept, e.tensors, len(e.kept), inter)
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
    for name, spec in plan.ops.items():  # structural changes (Block Drop removes decoder layers)
        OPS[name].apply_model(spec, model, view, plan)
    if inters:  # after Block Drop: the config must describe the layers that are left
        attr = intermediate_attr(cfg)
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
