"""Materialise a plan into a new, genuinely smaller model, and export it atomically.

Expert tensors, router rows, router biases and score-correction biases are sliced together; every cached expert
count (config, experts module, router, block, ``nn.Linear.out_features``) is updated; merged experts are stored
once. Where a stock config can describe the result (same expert count and width in every MoE layer, no MoE
sub-layer dropped), ``save_pretrained`` output loads with plain ``AutoModelForCausalLM.from_pretrained``.
Otherwise the config records what differs per layer (``explorer.perlayer``) and the export ships the small model
class that restores it: transformers and lm-eval load it with ``trust_remote_code=True``, ``load_model`` without.
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
from .perlayer import CLASS_NAME, MODELING_FILE, PER_LAYER_KEY, DroppedMoE, restore_per_layer
from .surgery import drop_moe_sublayer, intermediate_attr, resize_layer, set_param
from .transform import layer_edit

def apply_plan(model, view: MoEModel, plan: Plan, stats=None, inplace: bool = False, form: str = "per-layer"):
    """(new model, its view, layout or None). The original is untouched unless ``inplace``.

    form: how a result that a stock config cannot say is held (``explorer.engines``): "per-layer" (the export
    records per-layer shapes; layout is not None) or "padded" (zero experts, neurons and blocks up to one count and
    width, exact where the router has a selection bias; layout None). A uniform result is the same in both."""
    from .engines import FORMS, padding_problem, uniformity

    if form not in FORMS:
        raise PlanError(f"the export form is one of {', '.join(FORMS)}; got {form!r}")
    plan.validate(view)
    if form == "padded" and uniformity(plan, view):
        why = padding_problem(plan, view)
        if why:
            raise PlanError(f"the padded form cannot hold this plan exactly: {why}; export it per layer (vLLM and "
                            "llama.cpp do not load that), or keep the same expert count in every layer")
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
    if form == "padded" and not config_describes(model):
        layout["padding_params"] = pad_for_engines(model)
        if not config_describes(model):
            raise PlanError("after padding, the config still does not describe the model; export it per layer")
    new_view = MoEModel(model) if len(counts) or layout.get("padding_params") else None
    if not config_describes(model):
        return model, new_view, layout
    return model, new_view, None


def padded_copy(model, view: MoEModel, plan: Plan):
    """A copy of ``model`` (``plan`` applied: a student, say) in the padded form, or the refusal in words."""
    from .engines import padding_problem

    why = padding_problem(plan, view)
    if why:
        raise PlanError(f"the padded form cannot hold this plan exactly: {why}; export it per layer, or keep the "
                        "same expert count in every layer")
    model = copy.deepcopy(model)
    pad_for_engines(model)
    if not config_describes(model):
        raise PlanError("after padding, the config still does not describe the model; export it per layer")
    return model


def pad_for_engines(model) -> int:
    """Pad an applied model, in place, to one expert count and width in every MoE layer: zero experts that the
    router never selects (selection bias ``PAD_BIAS``; grouped routers keep each group's experts in their group),
    zero neurons, and a zero block where a MoE sub-layer was dropped. Returns the parameters added; the config then
    describes the model, and every token is routed and computed as before (the tests hold logits equal)."""
    from .engines import PAD_BIAS, unselectable
    from .layout import expert_dim
    from .neurons import up_positions

    before = sum(p.numel() for p in model.parameters())
    view = MoEModel(model, check=False)
    cfg = view.text_config
    top_e = max(lay.num_experts for lay in view)
    top_w = max(lay.intermediate_size for lay in view)
    attr = intermediate_attr(cfg)
    if getattr(cfg, attr) != top_w:
        setattr(cfg, attr, top_w)
    if view.count_attr:
        setattr(cfg, view.count_attr, top_e)
    with torch.no_grad():
        for lay in view:
            E, I = lay.num_experts, lay.intermediate_size
            if E == top_e and I == top_w:
                continue
            mode = unselectable(lay) if E < top_e else None
            if E < top_e and mode is None:
                raise PlanError(f"MoE layer {lay.index}: its router has no selection bias; padded experts would "
                                "be chosen")
            g = lay.groups[0]
            slots = torch.arange(E)
            if g > 1:
                slots = (slots // (E // g)) * (top_e // g) + slots % (E // g)
            idx = up_positions(lay, torch.arange(I), width=top_w)
            gu, dn = lay.gate_up, lay.down
            H = gu.shape[1] if lay.transposed else gu.shape[2]
            rows = lay.up_rows(top_w)
            new_gu = gu.new_zeros((top_e, H, rows) if lay.transposed else (top_e, rows, H))
            new_dn = dn.new_zeros((top_e, top_w, dn.shape[2]) if lay.transposed else (top_e, dn.shape[1], top_w))
            if lay.transposed:
                new_gu[slots.unsqueeze(1), :, idx.unsqueeze(0)] = gu.permute(0, 2, 1)
                new_dn[slots, :I] = dn
            else:
                new_gu[slots.unsqueeze(1), idx.unsqueeze(0)] = gu
                new_dn[slots, :, :I] = dn
            gb = db = None
            if lay.gate_up_bias is not None:
                gb = lay.gate_up_bias.new_zeros((top_e, rows))
                gb[slots.unsqueeze(1), idx.unsqueeze(0)] = lay.gate_up_bias
            if lay.down_bias is not None:
                db = lay.down_bias.new_zeros((top_e, lay.down_bias.shape[1]))
                db[slots] = lay.down_bias
            if E < top_e:
                pad_ids = {id(lay.correction_bias) if mode == "correction" else id(lay.router_bias)}
                for mod, rec in ((lay.router, True), (lay.block, False)):
                    named = list(mod.named_parameters(recurse=rec)) + list(mod.named_buffers(recurse=rec))
                    for name, t in named:
                        dim = expert_dim(t, E)
                        if dim is None or name.startswith("experts."):
                            continue
                        shape = list(t.shape)
                        shape[dim] = top_e
                        new = t.new_full(shape, PAD_BIAS if id(t) in pad_ids else 0)
                        new.index_copy_(dim, slots.to(t.device), t)
                        owner, _, leaf = name.rpartition(".")
                        set_param(mod.get_submodule(owner) if owner else mod, leaf, new)
            resize_layer(lay, None, (new_gu, new_dn, gb, db), top_e, top_w)
        _zero_blocks_for_dropped(model)
    return sum(p.numel() for p in model.parameters()) - before


def _zero_blocks_for_dropped(model) -> None:
    """Each dropped MoE sub-layer becomes the family's own block, built from the (padded) config, all zeros:
    a stock model whose block adds nothing there, as the dropped one did."""
    from transformers import AutoModelForCausalLM

    dropped = [n for n, m in model.named_modules() if isinstance(m, DroppedMoE)]
    if not dropped:
        return
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    p = next(model.parameters())
    for name in dropped:
        block = ref.get_submodule(name).to_empty(device=p.device).to(p.dtype)
        for t in list(block.parameters()) + list(block.buffers()):
            t.zero_()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, block)


def config_describes(model) -> bool:
    """Whether a model built from ``model.config`` alone has exactly ``model``'s tensors."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return a == b


def per_layer_spec(model) -> dict:
    """What ``model`` holds that the model its stock config builds does not: the shapes of the tensors that differ,
    the integer settings of the modules that differ (expert counts, widths), and the MoE sub-layers that add nothing.
    Checked by building the stock model again and restoring the spec on it: the result has ``model``'s tensors."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.__dict__.pop(PER_LAYER_KEY, None)
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(config)
    ref_mods = dict(ref.named_modules())
    dropped = {n: {"returns_tuple": m.returns_tuple, "flat": m.flat} for n, m in model.named_modules()
               if isinstance(m, DroppedMoE) and not isinstance(ref_mods.get(n), DroppedMoE)}
    gone = tuple(n + "." for n in dropped)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith(gone)}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = {k: list(s) for k, s in have.items() if k in want and want[k] != s}
    settings = {}
    for name, mod in model.named_modules():
        other = ref_mods.get(name)
        if other is None or name.startswith(gone) or name in dropped:
            continue
        diff = {a: v for a, v in vars(mod).items() if isinstance(v, int) and not isinstance(v, bool)
                and not a.startswith("_") and isinstance(getattr(other, a, None), int) and getattr(other, a) != v}
        if diff:
            settings[name] = diff
    spec = {"shapes": shapes, "settings": settings, "dropped": dropped}
    with torch.device("meta"):
        check = AutoModelForCausalLM.from_config(config)
    restore_per_layer(check, spec)
    got = {k: tuple(v.shape) for k, v in check.state_dict().items()}
    if got != have:
        bad = sorted(set(got) ^ set(have)) or [k for k in have if got[k] != have[k]]
        raise PlanError(f"this model's per-layer shapes cannot be written for plain transformers ({bad[0]}); "
                        "apply the plan in memory and save it with the explorer's own tools")
    return spec


def modeling_source(model) -> str:
    """``modeling_explorer.py`` for ``model``'s family: ``explorer.perlayer`` as it is, and the family's class with
    it mixed in."""
    from . import perlayer

    base = _stock_class(model.config)
    return (Path(perlayer.__file__).read_text(encoding="utf-8")
            + f"\n\nfrom {base.__module__} import {base.__name__} as _Base  # noqa: E402\n\n\n"
            f"class {CLASS_NAME}(PerLayerMoE, _Base):\n"
            f'    """{base.__name__} with per-layer MoE shapes (written by the MoE Compression Explorer)."""\n')


def per_layer_fields(config, spec: dict) -> None:
    """The config fields of the per-layer form: the spec, ``auto_map`` to the export's model file, and that
    class as the architecture (engines that build the stock class would misread the weights)."""
    config.__dict__[PER_LAYER_KEY] = spec
    config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{CLASS_NAME}"}
    config.architectures = [CLASS_NAME]


def _stock_class(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def _save_per_layer(model, folder: Path) -> None:
    """``save_pretrained`` (transformers' serialised key names) with the config fields and the model file that let
    plain transformers rebuild the per-layer shapes; ``model.config`` is left as it was."""
    cfg = model.config
    before = {k: copy.deepcopy(cfg.__dict__[k]) for k in (PER_LAYER_KEY, "auto_map", "architectures")
              if k in cfg.__dict__}
    try:
        per_layer_fields(cfg, per_layer_spec(model))
        model.save_pretrained(folder, safe_serialization=True)
        stored = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        stored["architectures"] = [CLASS_NAME]  # save_pretrained writes the class's name: engines read this field
        (folder / "config.json").write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    finally:
        for k in (PER_LAYER_KEY, "auto_map", "architectures"):
            cfg.__dict__.pop(k, None)
        cfg.__dict__.update(before)
    (folder / MODELING_FILE).write_text(modeling_source(model), encoding="utf-8")


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
           summary: dict | None = None, source: str | os.PathLike | None = None, overwrite: bool = False,
           view: MoEModel | None = None) -> Path:
    """Write model, tokenizer, plan and summary to ``out_dir`` atomically (all or nothing).

    ``view``: the original model's, for a quantise plan's llm-compressor recipe (``llmcompressor_recipe.yaml``,
    experts numbered as this export numbers them).

    The folder rules of ``explorer.outputs.check_export_dir`` apply (never the input model, the working directory
    or the home folder; ``overwrite`` replaces only a previous export). Partial folders of killed runs are removed.
    """
    out = check_export_dir(out_dir, source=source, overwrite=overwrite)
    note = dequantised_note(model, source)
    if note and "weight_format" not in (summary or {}):
        summary = {**(summary or {}), "weight_format": note}
    with staged_dir(out, overwrite) as tmp:
        if layout is None and config_describes(model):
            model.save_pretrained(tmp, safe_serialization=True)
            for name, spec in plan.ops.items():  # operations with a stored format of their own (packed experts)
                note = OPS[name].write_export(spec, model, tmp)
                if note:
                    summary = {**(summary or {}), "weight_format": note}
        else:
            _save_per_layer(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            portable_tokenizer(tmp)
        plan.to_json(tmp / "plan.json")
        write_recipe(plan, view, tmp)
        summary = {**(summary or {}), "bytes_written": weight_bytes(tmp)}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return out


def write_recipe(plan: Plan, view: MoEModel | None, folder: Path) -> list[Path]:
    """The plan's recipes for other tools (a quantise plan's llm-compressor YAML) into the export, as
    ``TOOL_recipe.yaml``."""
    if view is None:
        return []
    out = []
    for tool, text in plan.recipes(view).items():
        f = Path(folder) / f"{tool}_recipe.yaml"
        f.write_text(text, encoding="utf-8")
        out.append(f)
    return out


# transformers 5 writes the class of a tokenizer read from tokenizer.json as "TokenizersBackend", a name that
# transformers 4 (which llama.cpp's converter and many serving stacks pin) does not know; the same file read as
# "PreTrainedTokenizerFast" gives the same ids in both. The other keys are the loader's state, not the tokenizer's.
_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
_LOADER_STATE = ("backend", "is_local", "local_files_only")


def portable_tokenizer(folder: str | os.PathLike) -> None:
    """Rewrite ``tokenizer_config.json`` in ``folder`` with a class name transformers 4 and 5 both read."""
    f = Path(folder) / "tokenizer_config.json"
    if not f.exists():
        return
    cfg = json.loads(f.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") not in _TOKENIZER_CLASSES:
        return
    cfg["tokenizer_class"] = _TOKENIZER_CLASSES[cfg["tokenizer_class"]]
    for k in _LOADER_STATE:
        cfg.pop(k, None)
    f.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def weight_bytes(folder: str | os.PathLike) -> int:
    """The bytes of a model folder's weight files, as ``du`` counts them (what the report's sizes are held to)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
