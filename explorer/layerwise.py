"""Run a model larger than memory one decoder layer at a time, each weight read once per pass.

llm-compressor's sequential pipeline, for the explorer's passes: the model is built on the meta device; the
embedding, final norm and head are read once; then, for each decoder layer, its tensors are read straight from the
checkpoint's shards (per-expert keys stacked by transformers' own key conversions, block FP8 and MXFP4 dequantised
here), every batch's hidden states go through it, and it is freed before the next one is read. Nothing is written
to disk. The statistics observer, the preview's masks and the decoder-layer hooks see exactly what they see when the
whole model is in memory: only the order of the work changes (layer-major instead of batch-major).

On a CPU without bf16 instructions (AVX2 alone), a bf16 or fp16 checkpoint computes in float32: its layers are upcast
as they are read, since such a CPU multiplies bf16 matrices several times slower than float32 ones. With
AVX-512-BF16 or AMX, and on CUDA, it computes in its own dtype.
"""
from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import ExplorerError
from .weightformats import dequant_fp8, dequant_mxfp4, fp8_block, is_mxfp4, quant_config

SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                        "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}  # bytes per element, by safetensors dtype name
_LAYER_KEY = re.compile(r"^(.*?\blayers)\.(\d+)\.")


class LayerwiseError(ExplorerError):
    """Something the layer-by-layer engine cannot do; the message says what to do instead."""


class _Stop(Exception):
    """Raised by the last stand-in layer: the capture pass needs nothing after the decoder layers."""


class _StandIn(nn.Module):
    """Takes a decoder layer's place in its ModuleList during the capture and head passes. It is another module,
    so hooks on the real layer (the statistics' block hooks) never see these passes; attributes the model's layer
    loop reads (``attention_type``, ...) come from the real layer."""

    def __init__(self, real: nn.Module, fn: Callable):
        super().__init__()
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_fn", fn)

    def forward(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512-BF16 or AMX): there bf16 products are several
    times faster than float32 ones; without them (AVX2 alone) several times slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume the common case, no bf16 instructions
        return False


def _cpu_fast_dtype(storage: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a layer computes in: the storage dtype on accelerators and on CPUs with bf16 instructions;
    float32 for half precision on a CPU without them."""
    if device.type == "cpu" and (storage == torch.float16 or (storage == torch.bfloat16 and not cpu_has_fast_bf16())):
        return torch.float32
    return storage


def _config_dtype(config) -> torch.dtype:
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    for c in (config, tc):
        d = getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)
        d = getattr(torch, d, None) if isinstance(d, str) else d
        if isinstance(d, torch.dtype) and d.is_floating_point:
            return d
    return torch.float32


class LayerwiseModel:
    """A checkpoint folder run layer by layer. ``model`` is its skeleton (weights on the meta device outside the
    layer being run) and carries ``explorer_layerwise`` = this engine, which the statistics, perplexity and preview
    code ask for the next layer's outputs (:func:`forward_batches`)."""

    def __init__(self, folder: str | Path, *, dtype=None, device: str | torch.device = "cpu",
                 trust_remote_code: bool = False, upcast_on_cpu: bool = True):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .moe import MoEModel

        self.folder = Path(folder)
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        qc = quant_config(self.folder)
        self.fp8 = fp8_block(qc)
        self.mxfp4 = is_mxfp4(qc)
        if qc and not (self.fp8 or self.mxfp4):
            raise LayerwiseError(f"{self.folder} is quantised with {qc.get('quant_method')!r}; the layer-by-layer "
                                 "engine reads block FP8 and MXFP4 only: load it in memory (without --sequential)")
        self.quantised = ("block FP8" if self.fp8 else "MXFP4") if qc else None
        for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
            if getattr(c, "quantization_config", None) is not None:
                del c.quantization_config  # the skeleton holds plain weights; this engine dequantises them
        self.device = torch.device(device)
        self.storage_dtype = _config_dtype(config)
        if dtype is None or dtype == "auto":
            self.dtype = _cpu_fast_dtype(self.storage_dtype, self.device) if upcast_on_cpu else self.storage_dtype
        else:
            self.dtype = dtype
        with init_empty_weights(include_buffers=False):  # buffers (rotary tables, ...) are computed, not read
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, trust_remote_code=trust_remote_code)
        model.eval()
        for b in model.buffers():
            b.data = b.data.to(self.device)
        self.model = model
        model.explorer_layerwise = self
        self._wmap = _weight_map(self.folder)
        self.layer_keys, self.rest_keys, self.ignored_keys = self._group_keys(config)
        self.view = MoEModel(model, check=False)
        if not self.view.layers_hand_on_hidden_states_only():
            raise LayerwiseError(f"{self.view.model_type}: its decoder layers hand the next layer more than the hidden "
                                 "states, so they cannot be run one at a time here; load it in memory or with "
                                 "--device-map")
        self._handles: dict[str, object] = {}
        self._prefetcher = None
        self.on_load: list[Callable[[int], None]] = []  # called with a decoder layer's index once it is read
        self.on_unload: list[Callable[[int], None]] = []
        self.loaded_bytes = 0
        self.peak_bytes = 0
        self.read_bytes = 0
        self._checked: set[int] = set()
        self._running = False
        self._hooks = [model.register_forward_pre_hook(self._guard)]
        self._load(self.rest_keys)
        model.tie_weights()  # a tied head is the embedding the checkpoint stores once
        in_layers = {id(p) for p in self.view.decoder_layers.parameters()}
        left = [n for n, p in model.named_parameters() if p.device.type == "meta" and id(p) not in in_layers]
        if left:
            raise LayerwiseError(f"{self.folder}: {len(left)} weight(s) outside the decoder layers are not in the "
                                 f"checkpoint ({', '.join(left[:3])}); transformers would fill them with random "
                                 "numbers")
        self.loaded_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
        self.rest_bytes = self.loaded_bytes
        self.prefetch(0)

    # ---- what is where ------------------------------------------------------------------------------------
    def _group_keys(self, config) -> tuple[dict[int, list[str]], list[str], list[str]]:
        """Checkpoint keys per decoder layer, the rest (embedding, norm, head), and those the model has no layer
        for (DeepSeek-V3's multi-token-prediction layer 61: transformers does not build it either)."""
        n = config.get_text_config().num_hidden_layers
        heads: dict[str, int] = {}
        for k in self._wmap:
            m = _LAYER_KEY.match(k)
            if m:
                heads[m.group(1)] = heads.get(m.group(1), 0) + 1
        stack = max(heads, key=heads.get) if heads else None
        layers: dict[int, list[str]] = {i: [] for i in range(n)}
        rest, ignored = [], []
        for k in self._wmap:
            m = _LAYER_KEY.match(k)
            if m and m.group(1) == stack:
                i = int(m.group(2))
                (layers[i] if i < n else ignored).append(k)
            else:
                rest.append(k)
        return layers, rest, ignored

    def layer_nbytes(self, i: int) -> int:
        """Bytes decoder layer ``i`` takes in memory at the compute dtype."""
        layer = self.view.decoder_layers[i]
        return sum(p.numel() * p.element_size() for p in layer.parameters())

    # ---- reading ------------------------------------------------------------------------------------------
    def _handle(self, shard: str):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(self.folder / shard, "pt")
        return self._handles[shard]

    def _read(self, keys: list[str]) -> dict:
        """The tensors of ``keys`` as the model's modules hold them: plain ones as lazy safetensors slices (each is
        read, cast and placed one at a time while transformers converts the layer), quantised ones dequantised here
        (block FP8 with partial last blocks, as DeepSeek's own dequantisation reads them; MXFP4 as gpt-oss's)."""
        have = set(keys)

        def sl(k):
            s = self._handle(self._wmap[k]).get_slice(k)
            self.read_bytes += math.prod(s.get_shape()) * SAFETENSORS_ITEMSIZE.get(s.get_dtype(), 4)
            return s

        out = {}
        for k in keys:
            if self.fp8 and k.endswith("_scale_inv") and k[: -len("_scale_inv")] in have:
                continue
            if self.mxfp4 and k.endswith("_scales") and k[: -len("_scales")] + "_blocks" in have:
                continue
            if self.fp8 and k + "_scale_inv" in have:
                out[k] = dequant_fp8(sl(k)[...], sl(k + "_scale_inv")[...], self.fp8).to(self.dtype)
            elif self.mxfp4 and k.endswith("_blocks") and k[: -len("_blocks")] + "_scales" in have:
                base = k[: -len("_blocks")]
                w = dequant_mxfp4(sl(k)[...], sl(base + "_scales")[...])
                out[base] = w.transpose(-1, -2).to(self.dtype).contiguous()
            else:
                out[k] = sl(k)
        return out

    def _load(self, keys: list[str]) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        if not keys:
            return
        sd = self._read(keys)
        cfg = LoadStateDictConfig(dtype=self.dtype, device_map={"": self.device},
                                  weight_mapping=get_model_conversion_mapping(self.model, add_legacy=True))
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        sync = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"  # one tensor read at a time: memory stays about one layer
        try:
            info, _ = convert_and_load_state_dict_in_model(self.model, sd, cfg)
        finally:
            if sync is None:
                del os.environ["HF_DEACTIVATE_ASYNC_LOAD"]
            else:
                os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = sync
            if bar:
                hf_logging.enable_progress_bar()
        if info.mismatched_keys or info.conversion_errors:
            bad = list(info.mismatched_keys)[:3] or list(info.conversion_errors)[:3]
            raise LayerwiseError(f"{self.folder}: the weights do not fit the model its config describes ({bad})")
        del sd
        self.loaded_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters()
                                if p.device.type != "meta")
        self.peak_bytes = max(self.peak_bytes, self.loaded_bytes)

    def prefetch(self, i: int) -> None:
        """Have decoder layer ``i``'s shards read into the page cache by a background thread (posix_fadvise
        WILLNEED, which blocks while it reads) while the layer before it computes: the disk works during the
        products instead of after them."""
        if not 0 <= i < len(self.layer_keys) or not hasattr(os, "posix_fadvise"):
            return
        if self._prefetcher is None:
            from concurrent.futures import ThreadPoolExecutor

            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explorer-prefetch")
        for shard in sorted({self._wmap[k] for k in self.layer_keys[i]}):
            self._prefetcher.submit(_will_need, self.folder / shard)

    def load_layer(self, i: int) -> None:
        self._load(self.layer_keys[i])
        self.prefetch(i + 1)
        layer = self.view.decoder_layers[i]
        left = [n for n, p in layer.named_parameters() if p.device.type == "meta"]
        if left:
            raise LayerwiseError(f"{self.folder}: decoder layer {i} has {len(left)} weight(s) the checkpoint does not "
                                 f"hold ({', '.join(left[:3])}); transformers would fill them with random numbers")
        if i not in self._checked:  # the load-time self-check, on weights this pass reads anyway
            from .selfcheck import check_layer

            mine = [lay for lay in self.view if lay.layer_idx == i]
            patched = [lay.block.__dict__.pop("forward", None) for lay in mine]  # the block's own forward
            try:
                for lay in mine:
                    check_layer(lay, self.view.model_type, masked=lay.index == 0)
            finally:
                for lay, fwd in zip(mine, patched):
                    if fwd is not None:
                        lay.block.forward = fwd
            self._checked.add(i)
        for fn in self.on_load:
            fn(i)

    def unload_layer(self, i: int) -> None:
        for fn in self.on_unload:
            fn(i)
        layer = self.view.decoder_layers[i]
        for mod in layer.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.device.type != "meta":
                    mod._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        self.loaded_bytes = self.rest_bytes

    def describe(self) -> str:
        """How the passes run, in words (the CLI's progress line)."""
        n = len(self.view.decoder_layers)
        biggest = max(self.layer_nbytes(i) for i in range(n))
        upcast = (f", upcast from {_name(self.storage_dtype)} as each layer is read"
                  if self.dtype != self.storage_dtype and not self.quantised else "")
        fmt = f", {self.quantised} dequantised per layer" if self.quantised else ""
        return (f"layer by layer: {n} decoder layers read from disk one at a time, computing in {_name(self.dtype)} "
                f"on {self.device}{upcast}{fmt}; at most {biggest / 2**20:,.0f} MiB of layer weights plus "
                f"{self.rest_bytes / 2**20:,.0f} MiB of embedding and head in memory")

    # ---- running ------------------------------------------------------------------------------------------
    def _guard(self, module, args):
        if not self._running:
            raise LayerwiseError("this model is loaded layer by layer (--sequential): only statistics, perplexity "
                                 "and previews run through it; load it in memory (or with --device-map) for this")

    @contextmanager
    def _stand_ins(self, fns: list[Callable]):
        stack = self.view.decoder_layers
        real = list(stack)
        self._running = True
        try:
            for i, fn in enumerate(fns):
                stack[i] = _StandIn(real[i], fn)
            yield
        finally:
            for i, layer in enumerate(real):
                stack[i] = layer
            self._running = False

    def forward_batches(self, batches: list, before: Callable[[int], None] | None = None, logits: bool = True,
                        progress: Callable[[int, int], None] | None = None
                        ) -> Iterator[tuple[int, object, torch.Tensor | None]]:
        """(batch index, batch, logits or None) for every batch, as ``model(...)`` would give them, computed layer
        by layer. ``before(bi)`` runs before each batch enters each layer (the observer's per-batch state);
        ``progress(layers done, layers)``."""
        before = before or (lambda bi: None)
        n = len(self.view.decoder_layers)
        hidden: list[torch.Tensor] = []
        calls: list[list] = [[] for _ in range(n)]  # calls[layer][batch] = (args, kwargs) the layer loop passes

        def catcher(i):
            def fn(*args, **kwargs):
                h = args[0] if args else kwargs.pop("hidden_states")
                calls[i].append((args[1:], kwargs))
                if i == 0:
                    hidden.append(h)
                if i == n - 1:
                    raise _Stop
                return h
            return fn

        with torch.inference_mode():
            with self._stand_ins([catcher(i) for i in range(n)]):
                for b in batches:
                    try:
                        self.model(**_inputs(b, self.device))
                    except _Stop:
                        pass
            for i in range(n):
                self.load_layer(i)
                layer = self.view.decoder_layers[i]
                try:
                    self._running = True
                    for bi in range(len(batches)):
                        before(bi)
                        args, kwargs = calls[i][bi]
                        out = layer(hidden[bi], *args, **kwargs)
                        hidden[bi] = out[0] if isinstance(out, tuple) else out
                finally:
                    self._running = False
                    self.unload_layer(i)
                calls[i] = None
                if progress is not None:
                    progress(i + 1, n)
            if not logits:
                for bi, b in enumerate(batches):
                    yield bi, b, None
                return
            for bi, b in enumerate(batches):
                done = hidden[bi]
                fns = [lambda *a, _h=done, **k: _h] + [lambda *a, **k: a[0] if a else k["hidden_states"]] * (n - 1)
                before(bi)
                with self._stand_ins(fns):
                    out = self.model(**_inputs(b, self.device))
                hidden[bi] = None
                yield bi, b, out.logits

    def materialise(self) -> nn.Module:
        """Every layer read into memory once (and checked): a plain model, no longer run layer by layer."""
        for i in range(len(self.view.decoder_layers)):
            self.load_layer(i)
        self.close()
        for h in self._hooks:
            h.remove()
        del self.model.explorer_layerwise
        return self.model

    def close(self) -> None:
        self._handles.clear()
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)
            self._prefetcher = None


def _will_need(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    except OSError:
        pass  # a hint only


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _inputs(b, device) -> dict:
    return {"input_ids": b.input_ids.to(device), "attention_mask": b.attention_mask().to(device), "use_cache": False}


def _weight_map(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        return dict(json.loads(idx.read_text())["weight_map"])
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    out = {}
    for s in shards:
        with safe_open(folder / s, "pt") as f:
            out.update({k: s for k in f.keys()})
    return out


def engine_of(model) -> LayerwiseModel | None:
    """The layer-by-layer engine running ``model``, or None for a model in memory."""
    return getattr(model, "explorer_layerwise", None)


def forward_batches(model, batches, before: Callable[[int], None] | None = None, logits: bool = True,
                    progress: Callable[[int, int], None] | None = None
                    ) -> Iterator[tuple[int, object, torch.Tensor | None]]:
    """(batch index, batch, logits) of every batch: one forward per batch for a model in memory (or dispatched by
    accelerate), layer by layer for a layer-by-layer model. The one loop the statistics, perplexity and preview
    passes share. ``progress(done, total)`` counts batches in memory, decoder layers layer by layer."""
    engine = engine_of(model)
    batches = list(batches)
    if engine is not None:
        yield from engine.forward_batches(batches, before, logits, progress)
        return
    from .devices import input_device

    device = input_device(model)
    for bi, b in enumerate(batches):
        if before is not None:
            before(bi)
        out = model(**_inputs(b, device))
        if progress is not None:
            progress(bi + 1, len(batches))
        yield bi, b, out.logits


__all__ = ["LayerwiseModel", "LayerwiseError", "forward_batches", "engine_of"]
