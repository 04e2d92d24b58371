"""Expert kernels: Σ_k g_k · f_{e_k}(x) over the routed (token, expert) pairs of one MoE layer, never dense.

Two kernels, equal to 1e-5 (tests), in a registry by name: ``grouped`` sorts the pairs by expert and runs a grouped
matmul, with per-expert statistics as products on the device (no host sync per layer); ``loop`` runs the experts
that received tokens one by one, which measured faster on CPU. ``expert_path`` forces one.

An observer (the statistics pass) sees what the kernels compute: ``Observer`` says what it is called with.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LayerEdit:
    """What a plan does to one MoE layer, as the kernels read it (``transform.layer_edit`` makes it)."""

    keep: torch.Tensor | None = None  # bool [E]: experts that may still be routed to
    kept: list[int] | None = None  # original ids of the kept experts, in order
    tensors: tuple | None = None  # (gate_up, down, gate_up_bias, down_bias) of the kept experts, in order
    slot: torch.Tensor | None = None  # long [E]: original expert -> row of ``tensors`` (-1: removed)
    skip: bool = False  # Layer Drop
    notes: dict = field(default_factory=dict)  # operation name -> what its edit returned (e.g. quantisation scales)


class ExpertLayer(Protocol):
    """What the kernels and the self-check read of one MoE layer (``moe.MoELayer`` is one): they are written
    against this, below the class that calls them."""

    index: int  # MoE layer number
    layer_idx: int  # decoder layer number
    block: nn.Module
    experts: nn.Module
    router: nn.Module
    family: Any  # its row of the family table (``layout.Family``)

    @property
    def num_experts(self) -> int: ...

    @property
    def transposed(self) -> bool: ...

    def expert_weights(self, edit: "LayerEdit | None") -> tuple:
        """(gate_up, down, gate_up_bias, down_bias, slot) of the experts in use."""

    def apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor: ...

    def ffn_hidden(self, x: torch.Tensor, gu: torch.Tensor, gb: torch.Tensor | None) -> torch.Tensor: ...

    def ffn_out(self, h: torch.Tensor, dn: torch.Tensor, db: torch.Tensor | None) -> torch.Tensor: ...


class Observer(Protocol):
    """What a kernel reports to (``stats`` collects router statistics through it)."""

    def begin(self, lay: ExpertLayer, x: torch.Tensor, logits: torch.Tensor | None, w: torch.Tensor,
              idx: torch.Tensor) -> None: ...

    def expert(self, lay: ExpertLayer, e: int, tok: torch.Tensor, g: torch.Tensor, xin: torch.Tensor,
               h: torch.Tensor, y: torch.Tensor) -> None: ...

    def experts(self, lay: ExpertLayer, e: torch.Tensor, tok: torch.Tensor, g: torch.Tensor, xin: torch.Tensor,
                h: torch.Tensor, y: torch.Tensor) -> None: ...


PAD_ROWS = 16


def padded_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with zero rows added up to a multiple of ``PAD_ROWS`` for a bf16 / fp16 product on the CPU: oneDNN
    builds a kernel for every new product shape there, and experts receive a different number of tokens each time
    (measured, 64 experts of OLMoE's shape at 150-350 tokens each: 440 ms a layer with each expert's own row count,
    190 ms padded; no gain in float32). The caller drops the added rows' results."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or x.shape[0] % PAD_ROWS == 0:
        return x
    return F.pad(x, (0, 0, 0, PAD_ROWS - x.shape[0] % PAD_ROWS))


def loop(lay: ExpertLayer, x, w, idx, observer: Observer | None, edit: LayerEdit | None):
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32 if x.dtype != torch.float64 else x.dtype,
                      device=x.device)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=lay.num_experts).tolist()
    tok_all = order // idx.shape[1]
    gates_all = w.reshape(-1)[order]
    gate_in = lay.family.gating == "sigmoid_input"
    gu_all, dn_all, gb_all, db_all, slot = lay.expert_weights(edit)
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
        xp = padded_rows(xin)
        h = lay.ffn_hidden(xp, gu_all[r], gb)
        y = lay.ffn_out(h, dn_all[r], db)
        if xp is not xin:
            h, y = h[:n], y[:n]
        if observer is not None:
            observer.expert(lay, e, tok, g, xin, h, y)
        contrib = y if gate_in else y * g[:, None].to(y.dtype)
        out.index_add_(0, tok, contrib.to(out.dtype))
    return out.to(x.dtype)


def grouped(lay: ExpertLayer, x, w, idx, observer: Observer | None, edit: LayerEdit | None):
    gu_all, dn_all, gb_all, db_all, slot = lay.expert_weights(edit)
    flat = idx.reshape(-1)
    rows = flat if slot is None else on_device(slot, flat.device)[flat]  # row of the weight tensors per pair
    order = torch.argsort(rows, stable=True)
    row = rows[order]
    # per-group counts without bincount, which waits for the device to size its output
    counts = torch.zeros(gu_all.shape[0], dtype=torch.long, device=row.device)
    offs = torch.cumsum(counts.index_add_(0, row, torch.ones_like(row)), 0)
    tok = order // idx.shape[1]
    g = w.reshape(-1)[order]
    gate_in = lay.family.gating == "sigmoid_input"
    xin = x[tok] * g[:, None].to(x.dtype) if gate_in else x[tok]
    # every layout as [rows, in, out] for the grouped product
    w_up = gu_all if lay.transposed else gu_all.transpose(1, 2)
    w_dn = dn_all if lay.transposed else dn_all.transpose(1, 2)
    gu = grouped_mm(xin, w_up, offs)
    if gb_all is not None:
        gu = gu + gb_all[row]
    h = lay.apply_gate(gu)
    y = grouped_mm(h, w_dn, offs)
    if db_all is not None:
        y = y + db_all[row]
    if observer is not None:
        observer.experts(lay, flat[order], tok, g, xin, h, y)
    contrib = y if gate_in else y * g[:, None].to(y.dtype)
    # back to (token, slot) order and a sum over the k slots: no atomic adds into the output
    pairs = torch.empty_like(contrib)
    pairs[order] = contrib
    acc = torch.float32 if x.dtype != torch.float64 else x.dtype
    return pairs.view(x.shape[0], idx.shape[1], -1).sum(1, dtype=acc).to(x.dtype)


KERNELS: dict[str, Callable] = {"loop": loop, "grouped": grouped}


_FORCED: ContextVar[str] = ContextVar("explorer_expert_path", default="auto")


class expert_path:
    """Context manager forcing which kernel ``MoELayer.combine`` runs (tests and benchmarks compare them). The
    choice is a context variable: one app user's forced path never leaks into another's thread."""

    def __init__(self, path: str):
        if path != "auto" and path not in KERNELS:
            raise ValueError(f"expert path must be auto or one of {', '.join(KERNELS)}, got {path!r}")
        self.path = path

    def __enter__(self):
        self._token = _FORCED.set(self.path)
        return self

    def __exit__(self, *exc):
        _FORCED.reset(self._token)
        return False


def kernel_for(x: torch.Tensor) -> Callable:
    """The kernel for ``x``: the forced one, else grouped on CUDA and the loop elsewhere (measured faster there)."""
    path = _FORCED.get()
    if path == "auto":
        path = "grouped" if x.is_cuda else "loop"
    return KERNELS[path]


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
