"""Apply a plan to a checkpoint on disk, shard by shard, without ever instantiating the model.

A 600B MoE does not fit in memory twice (or once). This edits what is on disk: it reads the safetensors index,
takes from each tensor only the rows it keeps (``safe_open(...).get_slice``), averages merge groups from their
members' rows, renumbers per-expert keys and decoder layers, and streams each output tensor into new shards as it
is made, so peak memory is about the largest tensor it edits, not the model. The model's structure (which keys
are experts, routers and shared experts, top-k, the expert-count field) comes from the config alone, through the
same ``MoEModel`` view built on the meta device.

Both on-disk layouts are handled: per-expert keys (``...experts.3.w1.weight``, what ``save_pretrained`` writes for
Mixtral-style families in transformers 5) and fused ones (``...experts.gate_up_proj`` [E, ...], GPT-OSS, Llama-4,
GraniteMoE). The result has the same tensors, bit for bit, as ``apply_plan`` + ``export`` on the loaded model.
Supported: expert drop, merge (no neuron alignment), slimming, Layer Drop and Block Drop, with the same expert
count and width in every MoE layer. Layer Drop cannot be said in a stock config: the folder gets an
``explorer_layout.json`` that ``load_model`` reads (the weights keep the checkpoint's own key names).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .hubcache import inside_model
from .layout import BLOCK_ATTRS, expert_dim
from .moe import MoEModel
from .ops import OPS, EditContext
from .outputs import check_export_dir, staged_dir
from .perlayer import MODELING_FILE, PER_LAYER_KEY, restore_per_layer
from .plan import Plan, PlanError
from .neurons import up_positions
from .surgery import LAYOUT_FILE, block_drop_config, intermediate_attr
from .shards import INDEX, ST_DTYPES, disk_name, open_shard, safetensors_header, weight_map
from .weightformats import (WeightFormatError, check_fp8_grid, check_fp8_readable, check_int_weights, dequant_fp8,
                            dequant_mxfp4, fp8_block, is_mxfp4, quant_config, quant_fp8, quant_mxfp4, scale_grid)

_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_DTYPES = {name: getattr(torch, t) for name, t in ST_DTYPES.items()}


@dataclass
class _Layer:
    """What the plan does to one MoE layer, in the terms of on-disk keys."""
    prefix: str  # the block's module path, e.g. "model.layers.3.mlp"
    shared: list[str]  # module paths of shared experts / shared gate (copied as they are)
    E: int
    kept: list[int]
    merged: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # first member -> (group, w)
    neurons: dict[int, torch.Tensor] | None = None  # slimming: kept expert -> intermediate neurons it keeps
    skip: bool = False  # Layer Drop: none of the block's keys are written
    view_layer: object = None  # the MoELayer (meta), for the gate/up layout
    experts_rel: str = "experts"  # the experts module's path under the block: only its tensors are expert weights
    rows: dict[str, int] = field(default_factory=dict)  # on-disk key of a router-side per-expert tensor -> its dim
    expert_keys: set[str] = field(default_factory=set)  # on-disk keys of the fused expert tensors
    fmt: "_Format | None" = None  # the checkpoint's weight format (FP8 blocks, MXFP4) and every key's shape
    row_order: object = None  # on-disk key -> (memory row -> disk row of a fused gate/up tensor), or None


@dataclass
class _Format:
    heads: dict  # key -> (shape, dtype) over all shards
    fp8: tuple[int, int] | None = None  # weight_block_size of a block-wise FP8 checkpoint
    mxfp4: bool = False
    packed: bool = False  # compressed-tensors / other packed integer weights: never averaged or narrowed


_DOWN = ("down", "w2", "output_linear")  # names of the expert tensor that reads the intermediate neurons


@dataclass
class _Out:
    name: str
    dtype: str
    shape: list[int]
    src: str  # source key
    op: "Task"  # how its values are produced from the source (Copy, Rows, Members, Experts, FP8Requant, ...)
    sel: tuple | None = None  # (dim, positions): slimming of a per-expert tensor, after the task


def _structure(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    kw = {"dtype": dtype} if isinstance(dtype, torch.dtype) and dtype.is_floating_point else {}
    with torch.device("meta"):  # in the checkpoint's dtype: the report's bytes are those the shards hold
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kw)
    restore_per_layer(model, getattr(config, PER_LAYER_KEY, None) or {})  # an export's per-layer shapes
    return config, model, MoEModel(model)


def _check_supported(plan: Plan, view: MoEModel, config, model, stats) -> None:
    if stats is not None:
        stats.check_fits(view)
    for name, spec in plan.ops.items():  # each operation says whether it can be done shard by shard
        why = OPS[name].out_of_core(spec, plan, view, stats, config, model)
        if why:
            raise PlanError(f"out-of-core apply: {why}")
    counts = {len(plan.kept(i, view[i].num_experts)) for i in plan.surviving_layers(view)}
    if len(counts) > 1:
        raise PlanError(f"out-of-core apply needs the same expert count in every MoE layer (a stock config "
                        f"describes it); this plan keeps {sorted(counts)}")


def _slim_width(plan: Plan, view: MoEModel) -> int:
    """The one width of every surviving MoE layer's experts (the out-of-core apply refuses unequal widths)."""
    return plan.width(view[plan.surviving_layers(view)[0]])


def _disk_path(path: str, keys, keep: int = 3) -> str | None:
    """``path`` as the checkpoint spells it: the in-memory path, or the same last ``keep`` components (layer
    number included) under another head (Nemotron-H stores ``backbone.layers...`` for ``model.layers...``)."""
    if any(k.startswith(path + ".") for k in keys):
        return path
    parts = path.split(".")
    for j in range(1, len(parts) - keep + 1):
        tail = ".".join(parts[j:]) + "."
        heads = {k[: k.index(tail)] for k in keys if k.startswith(tail) or ("." + tail) in k}
        heads = {h for h in heads if h == "" or h.endswith(".")}
        if len(heads) == 1:
            return heads.pop() + tail[:-1]
    return None


def _disk_prefix(prefix: str, keys) -> str:
    """The block's path as the checkpoint spells it: transformers 5 renames some on load (Mixtral's on-disk
    ``block_sparse_moe`` is ``mlp`` in memory; Nemotron-H's ``backbone`` is ``model``), so try those."""
    found = _disk_path(prefix, keys)
    if found is not None:
        return found
    head = prefix.rsplit(".", 1)[0]
    for attr in BLOCK_ATTRS:
        cand = _disk_path(f"{head}.{attr}", keys)
        if cand is not None:
            return cand
    raise PlanError(f"cannot find the MoE block {prefix} among the checkpoint's keys")


def _disk_row_orders(model):
    """key -> the disk row of each in-memory row of a fused gate/up tensor that transformers reorders while loading
    (Inkling-2 stores ``w13`` interleaved, gate and up row by row, and loads it as gate rows then up rows), or None
    where disk and memory agree. Read off transformers' own converters: their ``Interleave`` steps are run on row
    numbers, so the editor slices the rows the in-memory edit keeps."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Interleave, WeightConverter

        convs = [c for c in get_model_conversion_mapping(model, add_legacy=False) if isinstance(c, WeightConverter)]
    except Exception:  # noqa: BLE001 - a transformers without converters stores what it loads
        return lambda key, n: None
    found = []
    for c in convs:
        steps = [op for op in c.operations if isinstance(op, Interleave)]
        if steps and any(t.endswith("gate_up_proj") for t in c.target_patterns):
            found.append((re.compile(c.source_patterns[0] + "$"), steps))

    def order(key: str, n: int) -> torch.Tensor | None:
        for pat, steps in found:
            if pat.search(key):
                rows = torch.arange(n).view(1, n, 1)
                for op in steps:  # every step acts on the experts' row axis (dim 1 of [E, rows, H])
                    rows = next(iter(op.convert({key: rows}, [key], [key]).values()))
                return rows.reshape(-1)
        return None
    return order


def _router_rows(lay, names: dict) -> dict[str, int]:
    """In-memory keys of the per-expert tensors outside the experts (router rows and biases, the block's own),
    with the dimension that runs over experts."""
    out = {}
    for mod, rec in ((lay.router, True), (lay.block, False)):
        for name, t in list(mod.named_parameters(recurse=rec)) + list(mod.named_buffers(recurse=rec)):
            dim = expert_dim(t, lay.num_experts)
            if dim is not None:
                out[f"{names[id(mod)]}.{name}"] = dim
    return out


def _layers(model, view: MoEModel, plan: Plan, stats, keys) -> list[_Layer]:
    names = {id(m): n for n, m in model.named_modules()}
    to_disk = disk_name(model)
    blocked = plan.blocked_moe_layers(view)
    row_order = _disk_row_orders(model)
    out = []
    for lay in view:
        if lay.index in blocked:
            continue
        i, E = lay.index, lay.num_experts
        prefix = names[id(lay.block)]
        disk = _disk_prefix(prefix, keys)
        if i in plan.dropped_layers():
            out.append(_Layer(disk, [], E, [], skip=True, view_layer=lay))
            continue
        merged = plan.sources(i, stats)
        shared = [names[id(m)] for m in lay.shared] + ([names[id(lay.shared_gate)]] if lay.shared_gate else [])
        shared = [disk + p[len(prefix):] for p in shared]
        kept = plan.kept(i, E)
        neurons = None  # the neurons layer_edit keeps (slimming), asked of the operations that choose them
        ctx = EditContext(lay, stats, kept, {})
        ctx.members = {e: (g, None) for e, (g, _) in merged.items()}
        for name, spec in plan.ops.items():
            if OPS[name].touches(spec, lay):
                neurons = OPS[name].neurons(spec, ctx) or neurons
        rel = names[id(lay.experts)][len(prefix) + 1:]
        def on_disk(k: str) -> str:
            k = to_disk(k)
            return disk + k[len(prefix):] if k.startswith(prefix + ".") else k

        # router-side per-expert tensors, wherever the checkpoint keeps them (Laguna stores the router's
        # correction bias under ``mlp.experts.``: sliced like the router, never averaged like an expert)
        rows = {on_disk(k): dim for k, dim in _router_rows(lay, names).items()}
        ekeys = {on_disk(f"{names[id(lay.experts)]}.{n}") for n, _ in lay.experts.named_parameters()}
        out.append(_Layer(disk, shared, E, kept, merged, neurons, view_layer=lay, experts_rel=rel, rows=rows,
                          expert_keys=ekeys, row_order=row_order))
    return out


def _dropped_names(model, view: MoEModel, plan: Plan, remap: dict) -> dict:
    """In-memory module name -> DroppedMoE flags of each MoE sub-layer Layer Drop removes, under the decoder
    layers' new numbers (``explorer.perlayer``)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for i in plan.dropped_layers():
        lay = view[i]
        dl, block = names[id(lay.decoder_layer)], names[id(lay.block)]
        head = dl.rsplit(".", 1)[0]
        out[f"{head}.{remap[lay.layer_idx]}{block[len(dl):]}"] = {"returns_tuple": lay.family.returns_tuple,
                                                                  "flat": lay.family.flat_output}
    return out


def _is_down(rel: str) -> bool:
    leaf = rel.rsplit(".", 2)
    return any(d in part for part in leaf for d in _DOWN)


def _sel(lay: _Layer, e: int, rel: str, ndim: int, fused: bool, key: str | None = None) -> tuple | None:
    """(dim, positions) of expert ``e``'s slimmed tensor (dims of the one-expert tensor), or None. Positions are the
    disk's: a fused gate/up tensor that transformers reorders on load is sliced at the rows its memory rows came
    from."""
    if lay.neurons is None:
        return None
    idx = lay.neurons[e]
    vl = lay.view_layer
    if _is_down(rel):
        if ndim == 1:
            return None  # the down bias is per output, not per neuron
        return (0 if vl.transposed else 1), idx
    if not fused:  # per-expert gate or up: [I, H] or bias [I]
        return 0, idx
    pos = up_positions(vl, idx)
    order = lay.row_order(key, vl.up_rows(vl.intermediate_size)) if (lay.row_order and key and ndim > 1) else None
    if order is not None:
        pos = order[pos].sort().values  # the same neurons, in the disk's row order (the load reorders them back)
    return (0 if ndim == 1 or not vl.transposed else 1), pos


def _edit_for(key: str, shape: list[int], lay: _Layer):
    """(new key, new shape, op, sel) for a key under a MoE block, or None to leave it out (a removed expert)."""
    if lay.skip:
        return None
    rel = key[len(lay.prefix) + 1:]
    if any(key.startswith(s + ".") for s in lay.shared):
        return key, shape, Copy(), None
    m = _PER_EXPERT.search("." + rel)
    if m:  # per-expert layout: keep, renumber, or average a merge group
        e = int(m.group(1))
        if e not in lay.kept:
            return None
        new = lay.prefix + "." + (("." + rel).replace(f".experts.{e}.", f".experts.{lay.kept.index(e)}.", 1))[1:]
        fp8 = _fp8_edit(key, rel, e, lay)
        if fp8 is not None:
            return (new, *fp8)
        sel = _sel(lay, e, rel, len(shape), fused=False)
        new_shape = list(shape) if sel is None else [len(sel[1]) if d == sel[0] else n for d, n in enumerate(shape)]
        if (e in lay.merged or sel is not None) and lay.fmt is not None and lay.fmt.packed:
            raise PlanError(f"{key}: packed integer weights (compressed-tensors) cannot be merged or slimmed out of "
                            "core; drop experts or layers out of core, or apply in memory")
        if e in lay.merged:
            g, w = lay.merged[e]
            return new, new_shape, Members([key.replace(f".experts.{e}.", f".experts.{x}.", 1) for x in g], w), sel
        return new, new_shape, Copy(), sel
    # expert weights live under the experts module; a per-expert tensor elsewhere (router rows, router and choice
    # biases, ERNIE's moe_statics) is sliced, never averaged or narrowed
    if key in lay.rows and shape and shape[lay.rows[key]] == lay.E:  # a router-side tensor, wherever it is stored
        dim = lay.rows[key]
        return key, [len(lay.kept) if d == dim else n for d, n in enumerate(shape)], Rows(dim, lay.kept), None
    is_expert = rel.startswith(lay.experts_rel + ".") or key in lay.expert_keys
    if shape and shape[0] == lay.E and (is_expert or len(shape) <= 2):
        if not is_expert:
            return key, [len(lay.kept)] + shape[1:], Rows(0, lay.kept), None
        sels = [_sel(lay, e, rel, len(shape) - 1, fused=True, key=key) for e in lay.kept]
        rows = [(*(lay.merged[e] if e in lay.merged else ([e], [1.0])), sel) for e, sel in zip(lay.kept, sels)]
        if (lay.merged or sels[0] is not None) and key.endswith(("_blocks", "_scales")) and lay.fmt and lay.fmt.mxfp4:
            return _mxfp4_edit(key, shape, lay, rows)
        if (lay.merged or sels[0] is not None) and lay.fmt is not None and (lay.fmt.packed or lay.fmt.fp8):
            raise PlanError(f"{key}: quantised fused expert tensors cannot be merged or slimmed out of core; drop "
                            "experts or layers out of core, or apply in memory")
        one = list(shape[1:])
        if sels[0] is not None:
            one[sels[0][0]] = len(sels[0][1])
        return key, [len(lay.kept)] + one, Experts(rows), None
    if len(shape) == 2 and shape[0] == 1 and shape[1] == lay.E:  # a [1, E] correction bias
        return key, [1, len(lay.kept)], Rows(1, lay.kept), None
    return key, shape, Copy(), None


def _fp8_edit(key: str, rel: str, e: int, lay: _Layer):
    """(shape, op, sel) for an FP8 weight or its scales of a merged or slimmed expert: dequantised, edited and
    quantised back (``FP8Requant``); None when the bytes are copied as they are."""
    f = lay.fmt
    if f is None or f.fp8 is None:
        return None
    base = key[: -len("_scale_inv")] if key.endswith("_scale_inv") else key
    if base + "_scale_inv" not in f.heads:
        return None
    brel = rel[: -len("_scale_inv")] if rel.endswith("_scale_inv") else rel
    sel = _sel(lay, e, brel, 2, fused=False)
    if e not in lay.merged and sel is None:
        return None
    g, w = lay.merged.get(e, ([e], [1.0]))
    members = [base.replace(f".experts.{e}.", f".experts.{x}.", 1) for x in g]
    wshape = list(f.heads[base][0])  # every member's scale grid was checked with the checkpoint (_format)
    if sel is not None:
        wshape[sel[0]] = len(sel[1])
        try:
            check_fp8_readable(base, wshape, f.fp8)
        except WeightFormatError as err:
            raise PlanError(f"slimming to {len(sel[1])} neurons: {err}; choose a width that is a multiple of "
                            f"{f.fp8[sel[0]]}, or apply in memory") from err
    part = "scale" if key.endswith("_scale_inv") else "weight"
    shape = scale_grid(wshape, f.fp8) if part == "scale" else wshape
    return shape, FP8Requant(members, w, sel, part, f.fp8), None


def _mxfp4_edit(key: str, shape: list[int], lay: _Layer, rows):
    """(key, shape, op, sel) of a fused MXFP4 ``*_blocks`` / ``*_scales`` tensor whose experts are merged or slimmed:
    each kept expert dequantised [out, in], edited, and quantised back."""
    base = key[: -len("_blocks")] if key.endswith("_blocks") else key[: -len("_scales")]
    bshape = lay.fmt.heads[base + "_blocks"][0]  # [E, out, in/32, 16]
    out_n, in_n = bshape[1], bshape[2] * 32
    sel = rows[0][2]
    if sel is not None:  # the view's dims are the in-memory (transposed) ones: out and in swap on disk
        dim = 1 - sel[0] if lay.view_layer.transposed else sel[0]
        if dim == 0:
            out_n = len(sel[1])
        else:
            in_n = len(sel[1])
            if in_n % 32:
                raise PlanError(f"{base}: MXFP4 holds 32 values per scale; slimming to {in_n} neurons cannot be "
                                "stored in this format (choose a width that is a multiple of 32, or apply in memory)")
    E = len(lay.kept)
    new = [E, out_n, in_n // 32, 16] if key.endswith("_blocks") else [E, out_n, in_n // 32]
    return key, new, MXFP4Requant(base, rows, "blocks" if key.endswith("_blocks") else "scales",
                                  lay.view_layer.transposed), None


def _merge_float(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``_merge``'s arithmetic on float32 (dequantised) tensors, without a cast back."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    acc = parts[0].float() * w[0]
    for t, a in zip(parts[1:], w[1:]):
        acc = acc + t.float() * a
    return acc


def _merge(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The same arithmetic, in the same order, as ``transform.merge_group``: bit-for-bit the in-memory result."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    acc = parts[0].detach().float() * w[0]
    for t, a in zip(parts[1:], w[1:]):
        acc = acc + t.detach().float() * a
    return acc.to(parts[0].dtype)


def _rows(sl, dim: int, ids: list[int]) -> torch.Tensor:
    """Rows ``ids`` of a lazily opened tensor along ``dim`` (0 or 1), read one run of consecutive ids at a time."""
    runs, start = [], 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or ids[j] != ids[j - 1] + 1:
            a, b = ids[start], ids[j - 1] + 1
            runs.append(sl[a:b] if dim == 0 else sl[:, a:b])
            start = j
    return torch.cat(runs, dim=dim)


class _Reader:
    """One open handle per shard, reopened once it has served ``budget`` bytes: a mapping kept open holds every page
    read so far resident (peak memory would grow to the shard), and reopening for every tensor took past 15 minutes
    on a checkpoint of 200,000 tensors. Memory stays near the budget plus the tensor being edited."""

    def __init__(self, folder: Path, wmap: dict[str, str], budget: int = 1 << 30):
        self.folder, self.wmap, self.budget = folder, wmap, budget
        self.handles: dict[str, list] = {}  # shard -> [context manager, handle, bytes served]
        self.headers: dict[str, dict] = {}  # shard -> its header (shards.safetensors_header)
        self.opens = 0

    def _handle(self, shard: str):
        h = self.handles.get(shard)
        if h is None or h[2] >= self.budget:
            from safetensors import safe_open

            if h is not None:
                h[0].__exit__(None, None, None)
            cm = safe_open(self.folder / shard, "pt")
            h = self.handles[shard] = [cm, cm.__enter__(), 0]
            self.opens += 1
        return h

    def slice(self, key: str, fn):
        h = self._handle(self.wmap[key])
        out = fn(h[1].get_slice(key))
        if isinstance(out, torch.Tensor):
            h[2] += out.numel() * out.element_size()
        return out

    def tensor(self, key: str) -> torch.Tensor:
        return self.slice(key, lambda sl: sl[:])  # safetensors copies out of the mapping

    def byte_range(self, key: str) -> tuple[Path, int, int, str]:
        """(file, first byte, end, dtype) of ``key``'s data in its shard, from the shard's header (read once)."""
        shard = self.wmap[key]
        if shard not in self.headers:
            self.headers[shard] = safetensors_header(self.folder / shard)
        dtype, _, start, end = self.headers[shard][key]
        return self.folder / shard, start, end, dtype

    def copy_bytes(self, key: str, fh, chunk: int = 64 << 20) -> int:
        """Write ``key``'s bytes to ``fh`` as stored, a chunk at a time: a tensor copied unchanged is never held
        whole (one the model does not use, declared 6 GiB, took 2.5 GiB of memory)."""
        path, a, b, _ = self.byte_range(key)
        with open(path, "rb") as src:
            src.seek(a)
            left = b - a
            while left > 0:
                buf = src.read(min(chunk, left))
                if not buf:
                    raise PlanError(f"{path} is truncated: {key} ends past the end of the file; copy the model again")
                fh.write(buf)
                left -= len(buf)
        return b - a

    def close(self) -> None:
        for cm, _, _ in self.handles.values():
            cm.__exit__(None, None, None)
        self.handles = {}


@contextmanager
def _closing(reader: _Reader):
    try:
        yield reader
    finally:
        reader.close()


def _select(t: torch.Tensor, sel: tuple | None) -> torch.Tensor:
    return t if sel is None else t.index_select(sel[0], sel[1])


# ---- tasks: how each output tensor is produced from the source shards (one writer streams them) ------------
class Task:
    """How one output tensor's values are produced from the source (its key ``o.src``), then narrowed by
    ``o.sel`` where slimming asks; the writer calls ``produce`` once per output tensor."""

    def produce(self, o: _Out, rd: _Reader) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class Copy(Task):
    """The source tensor as it is (its bytes copied without a decode where no slimming narrows it)."""

    def produce(self, o, rd):
        return _select(rd.tensor(o.src), o.sel)


@dataclass
class Rows(Task):
    """The kept experts' rows along ``dim`` of a router-side tensor (router rows, biases)."""

    dim: int
    ids: list[int]

    def produce(self, o, rd):
        return rd.slice(o.src, lambda sl: _rows(sl, self.dim, self.ids))


@dataclass
class Members(Task):
    """A merged expert's tensor: its members' weighted average (per-expert keys)."""

    keys: list[str]
    weights: list[float]

    def produce(self, o, rd):
        return _select(_merge([rd.tensor(k) for k in self.keys], self.weights), o.sel)


@dataclass
class Experts(Task):
    """A fused expert tensor [E, ...]: per kept expert (members, weights, selection), merged and narrowed."""

    rows: list[tuple]

    def produce(self, o, rd):
        def experts(sl):
            out = []
            for ids, w, sel in self.rows:
                parts = [sl[e:e + 1][0] for e in ids]
                out.append(_select(parts[0] if len(parts) == 1 else _merge(parts, w), sel))
            return torch.stack(out)
        return rd.slice(o.src, experts)


@dataclass
class FP8Requant(Task):
    """A block-FP8 weight (or its scales) of a merged or slimmed expert: dequantised, edited, quantised back."""

    members: list[str]
    weights: list[float]
    sel: tuple | None
    part: str  # "weight" or "scale"
    block: tuple[int, int]

    def produce(self, o, rd):
        x = _merge_float([dequant_fp8(rd.tensor(k), rd.tensor(k + "_scale_inv"), self.block) for k in self.members],
                         self.weights)
        q, scale = quant_fp8(_select(x, self.sel), self.block)
        return q if self.part == "weight" else scale


@dataclass
class MXFP4Requant(Task):
    """A fused MXFP4 ``*_blocks`` / ``*_scales`` tensor whose experts are merged or slimmed: each kept expert
    dequantised [out, in], edited, and quantised back."""

    base: str
    rows: list[tuple]
    part: str  # "blocks" or "scales"
    transposed: bool

    def produce(self, o, rd):
        def one(e):
            return (rd.slice(self.base + "_blocks", lambda sl: sl[e:e + 1][0]),
                    rd.slice(self.base + "_scales", lambda sl: sl[e:e + 1][0]))
        out = []
        for ids, w, sel in self.rows:
            x = _merge_float([dequant_mxfp4(*one(e)) for e in ids], w)  # [out, in] as stored
            if sel is not None:
                x = x.index_select(1 - sel[0] if self.transposed else sel[0], sel[1])
            blocks, scales = quant_mxfp4(x)
            out.append(blocks if self.part == "blocks" else scales)
        return torch.stack(out)


def _write_shard(path: Path, outs: list[_Out], rd: _Reader) -> int:
    """Stream tensors into a safetensors file: the header first (shapes are known), then each tensor's bytes."""
    header, offset = {}, 0
    sizes = []
    for o in outs:
        n = torch.tensor([], dtype=_DTYPES[o.dtype]).element_size()
        for d in o.shape:
            n *= d
        header[o.name] = {"dtype": o.dtype, "shape": o.shape, "data_offsets": [offset, offset + n]}
        sizes.append(n)
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for o, n in zip(outs, sizes):
            if isinstance(o.op, Copy) and o.sel is None and rd.byte_range(o.src)[3] == o.dtype:
                if rd.copy_bytes(o.src, fh) != n:
                    raise PlanError(f"internal: {o.src} holds another number of bytes than its shape says")
                continue
            t = o.op.produce(o, rd).contiguous()
            if list(t.shape) != o.shape:
                raise PlanError(f"internal: {o.name} came out {list(t.shape)}, expected {o.shape}")
            if t.numel():
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
            del t
    return offset


def _outputs(shard_names: list[str], all_heads: dict, wmap: dict, layers: list[_Layer], block_re, remap: dict,
             outside: dict, renumbered) -> dict[str, list[_Out]]:
    """Per source shard, the output tensors it gives and the task that produces each (left out: dropped decoder
    blocks, removed experts, multi-token-prediction layers not kept)."""
    plan_per_shard: dict[str, list[_Out]] = {s: [] for s in shard_names}
    for shard in shard_names:
        heads = {k: v for k, v in all_heads.items() if wmap.get(k) == shard}
        for key, (shape, dtype) in heads.items():
            if dtype not in _DTYPES:
                raise PlanError(f"{key}: tensors of dtype {dtype} are not supported out of core")
            m = block_re.match(key)
            if m and remap[int(m.group(1))] is None or key in outside and remap[outside[key][0]] is None:
                continue  # a dropped decoder block, or a multi-token-prediction layer left out
            lay = next((x for x in layers if key.startswith(x.prefix + ".")), None)
            owner = next((x for x in layers if key in x.rows), None)
            if owner is not None and lay is None:  # a router-side per-expert tensor stored outside the block
                if owner.skip:
                    continue
                dim = owner.rows[key]
                new_shape = [len(owner.kept) if d == dim else n for d, n in enumerate(shape)]
                plan_per_shard[shard].append(_Out(renumbered(key), dtype, new_shape, key, Rows(dim, owner.kept)))
                continue
            if lay is None:
                new, new_shape, op, sel = key, shape, Copy(), None
            else:
                edit = _edit_for(key, shape, lay)
                if edit is None:
                    continue  # a removed expert's own key, or a dropped MoE sub-layer
                new, new_shape, op, sel = edit
            plan_per_shard[shard].append(_Out(renumbered(new), dtype, new_shape, key, op, sel))
    return plan_per_shard


def _cut_config(view: MoEModel, plan: Plan, layers: list[_Layer], remap: dict, n_old: int, mtp: list[int],
                keep_mtp: bool, fmt: "_Format", src: Path) -> dict:
    """The config (``view.text_config``, edited in place) of the cut model: expert count, width, layers after
    Block Drop, multi-token-prediction layers; returns the summary's notes on what became of them."""
    cfg = view.text_config
    kept = {len(lay.kept) for lay in layers if not lay.skip}
    if kept and view.count_attr:
        setattr(cfg, view.count_attr, kept.pop())
    if any(lay.neurons is not None for lay in layers):
        setattr(cfg, intermediate_attr(cfg), _slim_width(plan, view))
    if plan.dropped_blocks():
        block_drop_config(cfg, [i for i in range(n_old) if remap[i] is not None], n_old)
    notes = {}
    if mtp:
        notes["mtp_layers"] = (f"stored layers {mtp} (multi-token prediction) kept as they are, their experts "
                               "uncut, renumbered after the last layer" if keep_mtp else
                               f"stored layers {mtp} (multi-token prediction) left out; num_nextn_predict_layers "
                               "set to 0 (keep_mtp keeps them, uncut)")
        if not keep_mtp and isinstance(getattr(cfg, "num_nextn_predict_layers", None), int):
            cfg.num_nextn_predict_layers = 0
    if fmt.fp8 or fmt.mxfp4 or fmt.packed:
        notes["weight_format"] = (f"kept as the input's ({quant_config(src).get('quant_method')}); merged and "
                                  "slimmed experts were dequantised, edited and quantised back"
                                  if (fmt.fp8 or fmt.mxfp4) else "kept as the input's (packed; drops only)")
    return notes


def _block_renames(view: MoEModel, model, plan: Plan) -> tuple[str, dict[int, int | None]]:
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(view.decoder_layers)], plan.block_map(len(view.decoder_layers))


def _layer_keys_outside(model, view: MoEModel, to_disk, block_re) -> dict[str, tuple[int, str]]:
    """Stored key -> (decoder layer, in-memory key) for a decoder layer's tensors that the checkpoint keeps outside
    the stored layer stack, so Block Drop renumbers (or drops) them with their layer."""
    names = {id(m): n for n, m in model.named_modules()}
    mem_dl = names[id(view.decoder_layers)]
    pat = re.compile(re.escape(mem_dl) + r"\.(\d+)\.")
    out = {}
    for k in model.state_dict():
        m = pat.match(k)
        if m:
            d = to_disk(k)
            if not block_re.match(d):
                out[d] = (int(m.group(1)), k)
    return out


def _read_heads(src: Path, wmap: dict[str, str]) -> dict[str, tuple[list[int], str]]:
    """key -> (shape, dtype) of every tensor, from the shards' headers (each shard opened once)."""
    def heads_of(shard):
        def read(f):
            return {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys() if wmap.get(k) == shard}
        return read

    heads = {}
    for shard in sorted(set(wmap.values())):
        heads.update(open_shard(src / shard, heads_of(shard)))
    return heads


def _format(src: Path, heads: dict) -> _Format:
    """The checkpoint's weight format, with every FP8 weight's scale grid checked against the weight."""
    qc = quant_config(src)
    try:
        check_int_weights(heads, qc)
    except WeightFormatError as err:
        raise PlanError(str(err)) from err
    fmt = _Format(heads, fp8=fp8_block(qc), mxfp4=is_mxfp4(qc),
                  packed=bool(qc) and qc.get("quant_method") not in (None, "fp8", "mxfp4"))
    if fmt.fp8 is not None:
        for k, (shape, dtype) in heads.items():
            if dtype.startswith("F8") and k + "_scale_inv" in heads and len(shape) == 2:
                try:
                    check_fp8_grid(k, shape, heads[k + "_scale_inv"][0], fmt.fp8)
                except WeightFormatError as err:
                    raise PlanError(str(err)) from err
    return fmt


def apply_checkpoint(source: str | os.PathLike, plan: Plan, out_dir: str | os.PathLike, stats=None,
                     overwrite: bool = False, summary: dict | None = None, keep_mtp: bool = False,
                     on_report=None) -> Path:
    """Write the model ``plan`` makes of the checkpoint in ``source`` to ``out_dir`` (atomic, never over the input).

    Other files of the checkpoint (tokenizer, generation config) are copied; plan.json and summary.json are added.
    Quantised checkpoints keep their format and ``quantization_config``: block-wise FP8 and MXFP4 bytes are copied
    with their scales where experts or layers are dropped, and merged or slimmed experts are dequantised, edited and
    quantised back. Layers stored past ``num_hidden_layers`` (DeepSeek-V3's multi-token-prediction layer, which
    transformers does not load) are left out, and ``num_nextn_predict_layers`` set to 0, since their experts would
    no longer match the config; ``keep_mtp`` keeps them as they are (uncut), renumbered after the last layer.
    ``on_report`` is called with the plan's report (sizes, which engines load the result) before anything is written.
    """
    src = Path(source).expanduser()
    if not (src / "config.json").exists():
        raise PlanError(f"{src} is not a model folder (no config.json)")
    config, model, view = _structure(src)
    plan.validate(view)
    _check_supported(plan, view, config, model, stats)
    out = check_export_dir(out_dir, source=src, overwrite=overwrite)
    if on_report is not None:
        on_report(plan.report(view))
    wmap = weight_map(src)
    all_heads = _read_heads(src, wmap)
    fmt = _format(src, all_heads)
    layers = _layers(model, view, plan, stats, wmap)
    for lay in layers:
        lay.fmt = fmt
    dl_path, remap = _block_renames(view, model, plan)
    mem_dl = dl_path
    first = _disk_path(dl_path + ".0", wmap, keep=2)
    dl_path = first[:-2] if first else dl_path
    block_re = re.compile(re.escape(dl_path) + r"\.(\d+)\.")
    shard_names = sorted(set(wmap.values()))
    n_old = len(view.decoder_layers)
    mtp = sorted({int(m.group(1)) for k in all_heads if (m := block_re.match(k)) and int(m.group(1)) >= n_old})
    for i in mtp:  # stored past the decoder: kept after the last kept layer, or left out
        remap[i] = (len([v for v in remap.values() if v is not None]) + mtp.index(i)) if keep_mtp else None

    to_disk = disk_name(model)
    outside = _layer_keys_outside(model, view, to_disk, block_re) if plan.dropped_blocks() else {}

    def renumbered(key: str) -> str:
        """A stored key under the decoder layers, with its layer's new number (Block Drop, kept MTP layers); a
        layer's tensor stored elsewhere (Inkling-2's ``attn_res.attn_queries.<layer - 1>``) through its in-memory
        name, renumbered there and named as the checkpoint names it."""
        if key in outside:
            layer, mem = outside[key]
            return to_disk(f"{mem_dl}.{remap[layer]}." + mem[len(f"{mem_dl}.{layer}."):])
        m = block_re.match(key)
        return f"{dl_path}.{remap[int(m.group(1))]}." + key[m.end():] if m else key

    plan_per_shard = _outputs(shard_names, all_heads, wmap, layers, block_re, remap, outside, renumbered)
    rd = _Reader(src, wmap)
    with staged_dir(out, overwrite) as tmp, _closing(rd):
        total, new_map = 0, {}
        n = len(shard_names)
        for j, s in enumerate(shard_names):
            name = "model.safetensors" if n == 1 else f"model-{j + 1:05d}-of-{n:05d}.safetensors"
            outs = sorted(plan_per_shard[s], key=lambda o: o.name)
            total += _write_shard(tmp / name, outs, rd)
            new_map.update({o.name: name for o in outs})
        if n > 1:
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(new_map.items()))}, indent=2))
        notes = _cut_config(view, plan, layers, remap, n_old, mtp, keep_mtp, fmt, src)
        if plan.dropped_layers():  # a stock config cannot say "no MoE here": the per-layer form says it
            from .apply import modeling_source, per_layer_fields

            per_layer_fields(config, {"shapes": {}, "settings": {}, "dropped": _dropped_names(model, view, plan,
                                                                                              remap)})
            (tmp / MODELING_FILE).write_text(modeling_source(model), encoding="utf-8")
        config.save_pretrained(tmp)
        for name, spec in plan.ops.items():  # operations with a stored format of their own (packed experts)
            note = OPS[name].write_checkpoint(spec, plan, view, tmp, remap, renumbered)
            if note:
                notes["weight_format"] = note
        skipped = []
        for f in src.iterdir():  # tokenizer and the rest, as they are: the model's own regular files only
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                    INDEX, "config.json", "plan.json", "summary.json", LAYOUT_FILE, MODELING_FILE):
                if not inside_model(src, f):  # a link to elsewhere would copy another file's contents
                    skipped.append(f.name)
                    continue
                shutil.copyfile(f, tmp / f.name)  # contents only: modes follow the umask, like every file written
        from .apply import portable_tokenizer

        portable_tokenizer(tmp)
        if skipped:
            notes["not_copied"] = (f"{', '.join(sorted(skipped))}: link(s) to files outside the model folder (or its "
                                   "hub blob store), left out")
        plan.to_json(tmp / "plan.json")
        from .apply import weight_bytes, write_recipe

        write_recipe(plan, view, tmp)

        notes["bytes_written"] = weight_bytes(tmp)
        (tmp / "summary.json").write_text(json.dumps({"source": str(src), "out_of_core": True,
                                                      "report": plan.report(view), **notes, **(summary or {})},
                                                     indent=1, default=float))
    return out
