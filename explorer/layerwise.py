"""Run a model larger than memory one decoder layer at a time, each weight read once per pass.

llm-compressor's sequential pipeline, for the explorer's passes: the model is built on the meta device; the
embedding, final norm and head are read once; then, for each decoder layer, its bytes are read straight from the
checkpoint's shards into one reused buffer (large direct reads, ahead of the layer's turn, while the layer before
computes), its tensors converted from there (per-expert keys stacked by transformers' own key conversions, block
FP8 and MXFP4 dequantised here), every batch's hidden states go through it, and it is freed before the next one.
Nothing is written to disk. The statistics observer, the preview's masks and the decoder-layer hooks see exactly what they see when the
whole model is in memory: only the order of the work changes (layer-major instead of batch-major).

On a CPU without bf16 instructions (AVX2 alone), a bf16 or fp16 checkpoint computes in float32: its layers are upcast
as they are read, since such a CPU multiplies bf16 matrices several times slower than float32 ones. With
AVX-512-BF16 or AMX, and on CUDA, it computes in its own dtype.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import ExplorerError
from .perlayer import PER_LAYER_KEY, restore_per_layer
from .shards import ST_DTYPES, RunReader, weight_map
from .weightformats import (CT_ACTIVATION_PARTS, CT_WEIGHT_PARTS, CompressedTensorsReader, WeightFormatError,
                            dequant_fp8, dequant_mxfp4, fp8_block, is_compressed_tensors, is_mxfp4, quant_config)

SAFETENSORS_ITEMSIZE = {name: getattr(torch, t).itemsize for name, t in ST_DTYPES.items()}  # bytes per element
_LAYER_KEY = re.compile(r"^(.*?\blayers)\.(\d+)\.")
SELF_CHECK_BYTES = 2 * 2**30  # experts kept in FP8 are dequantised for the self-check up to this size per layer


class LayerwiseError(ExplorerError):
    """Something the layer-by-layer engine cannot do; the message says what to do instead."""


class _Stop(Exception):
    """Raised by the last stand-in layer: the capture pass needs nothing after the decoder layers."""


class _Held:
    """A tensor of the layer being read, answering as a safetensors slice does (the FP8 and compressed-tensors
    readers ask for shapes and dtypes before the bytes)."""

    _NAMES = {v: k for k, v in ST_DTYPES.items()}

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __getitem__(self, index):
        return self.t[index]

    def get_shape(self) -> list[int]:
        return list(self.t.shape)

    def get_dtype(self) -> str:
        return self._NAMES[str(self.t.dtype).replace("torch.", "")]


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
                 trust_remote_code: bool = False, upcast_on_cpu: bool = True, keep_fp8: bool | None = None,
                 hidden_budget: int | None = None, spill_dir: str | Path | None = None,
                 drop_read_pages: bool | None = None, buffered_reads: bool | None = None):
        """``buffered_reads``: read each decoder layer whole into one reused buffer with large direct reads, ahead
        of its turn (default: when the layer's stored bytes beside its weights take at most half the memory
        available; False: each tensor read from the shards' mapping as transformers converts it, so the peak is
        one layer, at a slower read).

        ``drop_read_pages``: once a layer is read, drop its shards' pages from the kernel's page cache. Default:
        when the checkpoint exceeds half the memory available now, so it could not stay cached beside the pass
        anyway; keeping it would evict everything else, and on this project's VMs a page cache growing into
        memory it never touched read at a quarter of the disk's rate (measured: 0.47 against 1.5-2 GB/s)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .moe import MoEModel

        self.folder = Path(folder)
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        qc = quant_config(self.folder)
        self.fp8 = fp8_block(qc)
        self.mxfp4 = is_mxfp4(qc)
        try:
            self.ct = CompressedTensorsReader(qc) if is_compressed_tensors(qc) else None
        except WeightFormatError as err:
            raise LayerwiseError(f"{self.folder}: {err}") from None
        if qc and not (self.fp8 or self.mxfp4 or self.ct):
            raise LayerwiseError(f"{self.folder} is quantised with {qc.get('quant_method')!r}; the layer-by-layer "
                                 "engine reads block FP8, MXFP4 and compressed-tensors: load it in memory (without "
                                 "--sequential)")
        self.quantised = (("block FP8" if self.fp8 else "MXFP4" if self.mxfp4 else
                           f"compressed-tensors {self.ct.format or 'quantised'}") if qc else None)
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
            restore_per_layer(model, getattr(config, PER_LAYER_KEY, None) or {})  # an export's per-layer shapes
        model.eval()
        for b in model.buffers():
            b.data = b.data.to(self.device)
        self.model = model
        model.explorer_layerwise = self
        try:
            self._wmap = weight_map(self.folder)
        except ExplorerError as err:
            raise LayerwiseError(str(err)) from None
        self.layer_keys, self.rest_keys, self.ignored_keys = self._group_keys(config)
        if drop_read_pages is None:
            stored = sum((self.folder / sh).stat().st_size for sh in set(self._wmap.values()))
            drop_read_pages = stored > 0.5 * _available_memory(torch.device("cpu"))
        self.drop_read_pages = drop_read_pages
        self.buffered_reads = buffered_reads
        self.view = MoEModel(model, check=False)
        if not self.view.layers_hand_on_hidden_states_only():
            raise LayerwiseError(f"{self.view.model_type}: its decoder layers hand the next layer more than the hidden "
                                 "states, so they cannot be run one at a time here; load it in memory or with "
                                 "--device-map")
        self._handles: dict[str, object] = {}
        self._prefetcher = None
        self._reader = RunReader(self.folder, self._wmap)
        self._reading: dict[int, object] = {}  # decoder layer -> its read ahead, running
        self._held: dict[str, torch.Tensor] = {}  # the tensors of the layer being loaded, read into the buffer
        # hidden states between layers: in memory up to this many bytes, beyond in memory-mapped files here
        self.hidden_budget = hidden_budget if hidden_budget is not None else _default_hidden_budget()
        spill_dir = spill_dir if spill_dir is not None else os.environ.get("EXPLORER_SPILL_DIR")
        self.spill_dir = Path(spill_dir) if spill_dir else None
        self.last_hidden = ""  # where the last pass kept them, in words
        self.on_load: list[Callable[[int], None]] = []  # called with a decoder layer's index once it is read
        self.on_unload: list[Callable[[int], None]] = []
        self.loaded_bytes = 0
        self.peak_bytes = 0
        self.read_bytes = 0
        self.unchecked: set[int] = set()  # decoder layers whose self-check was left out (FP8 kept, too large)
        self._checked: set[int] = set()
        self._mine: dict[int, list] = {}  # decoder layer -> blocks whose forward this engine set (FP8 kept)
        self._module_names = {id(m): n for n, m in model.named_modules()}
        self.keep_fp8 = self._decide_keep_fp8(keep_fp8)
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
        (block FP8 with partial last blocks, as DeepSeek's own dequantisation reads them; MXFP4 as gpt-oss's;
        compressed-tensors by its own decompressors; activation scales dropped: the model computes dequantised)."""
        have = set(keys)
        out: dict = {}
        if self.ct is not None:
            keys = self._read_compressed(keys, have, out)
        sl = self._slice
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
                s = sl(k)
                out[k] = s.t if isinstance(s, _Held) else s
        return out

    def _slice(self, k: str):
        held = self._held.get(k)
        if held is not None:
            self.read_bytes += held.numel() * held.element_size()
            return _Held(held)
        s = self._handle(self._wmap[k]).get_slice(k)
        self.read_bytes += math.prod(s.get_shape()) * SAFETENSORS_ITEMSIZE.get(s.get_dtype(), 4)
        return s

    def _read_compressed(self, keys: list[str], have: set[str], out: dict) -> list[str]:
        """Dequantise every compressed-tensors module among ``keys`` into ``out``; the plain keys left."""
        modules: dict[str, dict[str, str]] = {}
        plain = []
        for k in keys:
            base, part = _ct_part(k)
            if part in CT_ACTIVATION_PARTS:
                continue
            quantised = base is not None and (base + "weight_packed" in have or
                                              (base + "weight" in have and base + "weight_scale" in have))
            if quantised:
                modules.setdefault(base, {})[part] = k
            else:
                plain.append(k)
        for base, parts in modules.items():
            tensors = {p: self._slice(k)[...] for p, k in parts.items()}
            try:
                w = self.ct.dequantise(base.rstrip("."), tensors)
            except WeightFormatError as err:
                raise LayerwiseError(f"{self.folder}: {err}") from None
            out[base + "weight"] = w.to(self.dtype)
        return plain

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
        self.peak_bytes = max(self.peak_bytes, self.loaded_bytes + self._reader.capacity)

    def prefetch(self, i: int) -> None:
        """Have decoder layer ``i``'s bytes read into the read buffer by a background thread while the layer before
        it computes: the disk works during the products instead of after them."""
        if not 0 <= i < len(self.layer_keys) or i in self._reading or not self._buffered(i):
            return
        if self._prefetcher is None:
            from concurrent.futures import ThreadPoolExecutor

            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explorer-prefetch")
        self._reading[i] = self._prefetcher.submit(self._reader.read, self.layer_keys[i])

    def _buffered(self, i: int) -> bool:
        """Whether decoder layer ``i`` is read whole into the read buffer (large direct reads, see
        :class:`~explorer.shards.RunReader`): when its stored bytes beside its weights in memory take at most half
        the memory available now. Otherwise its tensors are read one at a time from the shards' mapping."""
        keys = self.layer_keys[i]
        if self.buffered_reads is False or not keys or not self._reader.readable(keys):
            return False
        if self.buffered_reads:
            return True
        weights = self._kept_layer_bytes(i) if self.keep_fp8 else self.layer_nbytes(i)
        need = self._reader.nbytes(keys) + (weights if self.device.type == "cpu" else 0)
        return need <= 0.5 * (_available_memory(torch.device("cpu")) + self._reader.capacity)

    def _unalias(self, i: int) -> None:
        """Copy out of the read buffer whatever decoder layer ``i`` kept as a view of it (a tensor transformers
        took as it was stored): the next layer's read overwrites the buffer."""
        for mod in self.view.decoder_layers[i].modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in list(store.items()):
                    if t is not None and self._reader.holds(t):
                        store[name] = (nn.Parameter(t.detach().clone(), requires_grad=False)
                                       if isinstance(t, nn.Parameter) else t.clone())

    def _own_shards(self, i: int) -> list[str]:
        """Shards that hold decoder layer ``i``'s tensors and nothing else's."""
        if not hasattr(self, "_shard_owner"):
            owner: dict[str, set] = {}
            for j, keys in self.layer_keys.items():
                for k in keys:
                    owner.setdefault(self._wmap[k], set()).add(j)
            for k in self.rest_keys + self.ignored_keys:
                owner.setdefault(self._wmap[k], set()).add(-1)
            self._shard_owner = owner
        return [sh for sh, who in self._shard_owner.items() if who == {i}]

    def load_layer(self, i: int) -> None:
        ahead = self._reading.pop(i, None)
        self._settle(release=False)  # a read ahead of another layer (one loaded out of turn) fills the same buffer
        if ahead is not None:
            self._held = ahead.result()
        elif self._buffered(i):
            self._held = self._reader.read(self.layer_keys[i])
        try:
            keys, stacks = self._fp8_expert_stacks(i) if self.keep_fp8 else (self.layer_keys[i], {})
            self._load(keys)
            self._keep(i, stacks)
        finally:
            self._held = {}
        self._unalias(i)
        for shard in self._own_shards(i):  # read: unmap them, so their pages are cheap to reclaim
            self._handles.pop(shard, None)
            if self.drop_read_pages:
                _drop_pages(self.folder / shard)
        layer = self.view.decoder_layers[i]
        kept = {id(getattr(lay.experts, name)) for lay in self.view if lay.layer_idx == i and lay.fp8_kept
                for name in lay.fp8_kept}
        left = [n for n, p in layer.named_parameters() if p.device.type == "meta" and id(p) not in kept]
        if left:
            raise LayerwiseError(f"{self.folder}: decoder layer {i} has {len(left)} weight(s) the checkpoint does not "
                                 f"hold ({', '.join(left[:3])}); transformers would fill them with random numbers")
        if i not in self._checked:  # the load-time self-check, on weights this pass reads anyway
            self._self_check(i)
            self._checked.add(i)
        self.prefetch(i + 1)  # after the check: a read running beside it slowed it to the read's pace (measured)
        for fn in self.on_load:
            fn(i)

    def _self_check(self, i: int) -> None:
        """The view held against each MoE block's own forward. Experts kept in FP8 are dequantised for it while
        the layer's dequantised experts take at most ``SELF_CHECK_BYTES``; beyond, the check is left out (said by
        :meth:`describe`): the family's view is checked wherever it is read dequantised."""
        from .selfcheck import check_layer

        mine = [lay for lay in self.view if lay.layer_idx == i]
        if any(lay.fp8_kept for lay in mine) and self._kept_dequantised_bytes(i) > SELF_CHECK_BYTES:
            self.unchecked.add(i)
            return
        patched = [lay.block.__dict__.pop("forward", None) for lay in mine]  # the block's own forward
        kept = [lay.experts.__dict__.pop("explorer_fp8", None) for lay in mine]
        real = []
        try:
            for lay, stacks in zip(mine, kept):
                if stacks:  # the block's own forward needs the plain tensors: dequantised for the check only
                    real.append((lay, {n: lay.experts._parameters[n] for n in stacks}))
                    for n, st in stacks.items():
                        lay.experts._parameters[n] = nn.Parameter(st.dequantise(), requires_grad=False)
                check_layer(lay, self.view.model_type, masked=lay.index == 0)
        finally:
            for lay, params in real:
                lay.experts._parameters.update(params)
            for lay, stacks in zip(mine, kept):
                if stacks:
                    lay.experts.__dict__["explorer_fp8"] = stacks
            for lay, fwd in zip(mine, patched):
                if fwd is not None:
                    lay.block.forward = fwd

    # ---- block FP8 experts kept in FP8 ----------------------------------------------------------------------
    def _decide_keep_fp8(self, keep: bool | None) -> bool:
        """Keep the experts of a block FP8 checkpoint in FP8 (dequantised one expert at a time as computed) when
        asked, or, by default, when the largest layer dequantised would take more than half the memory available
        now: a DeepSeek-V3 layer is 22.5 GB in bf16 and 11.3 GB in FP8."""
        if keep and not self.fp8:
            raise LayerwiseError(f"{self.folder} is not a block FP8 checkpoint: there are no per-expert FP8 weights "
                                 "to keep in FP8")
        if not self.fp8 or keep is False:
            return False
        if not any(self._expert_keys(lay) for lay in self.view):
            if keep:
                raise LayerwiseError(f"{self.folder}: its experts are not stored as per-expert gate/up/down FP8 "
                                     "weights, so they cannot be kept in FP8 here")
            return False
        if keep:
            return True
        biggest = max(self.layer_nbytes(i) for i in range(len(self.view.decoder_layers)))
        return biggest > 0.5 * _available_memory(self.device)

    def _expert_keys(self, lay) -> dict[str, list[tuple[str, ...]]] | None:
        """Checkpoint keys of ``lay``'s experts, per fused tensor: gate_up_proj <- (gate_proj, up_proj) and
        down_proj <- (down_proj,) of each expert, each an FP8 weight with its scales; None where the checkpoint or
        the family's layout differs (then the layer is read dequantised)."""
        if not lay.gated or lay.transposed or lay.gate_up_bias is not None or lay.down_bias is not None:
            return None
        prefix = self._module_names.get(id(lay.experts))
        if prefix is None:
            return None
        want = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
        out = {}
        for fused, parts in want.items():
            rows = []
            for e in range(lay.num_experts):
                ks = tuple(f"{prefix}.{e}.{p}.weight" for p in parts)
                if not all(k in self._wmap and k + "_scale_inv" in self._wmap for k in ks):
                    return None
                rows.append(ks)
            out[fused] = rows
        return out

    def _fp8_expert_stacks(self, i: int) -> tuple[list[str], dict]:
        """(keys left for transformers' conversion, {MoE layer: {fused name: BlockFP8Stack}}) of decoder layer
        ``i``: its experts read as FP8 bytes into one stacked tensor per fused weight, scales beside."""
        from .weightformats import BlockFP8Stack

        taken, stacks = set(), {}
        for lay in self.view:
            if lay.layer_idx != i:
                continue
            keys = self._expert_keys(lay)
            if keys is None:
                continue
            mine = {}
            for fused, rows in keys.items():
                first = [self._slice(k) for k in rows[0]]
                parts = [s.get_shape()[0] for s in first]
                cols = first[0].get_shape()[1]
                data = torch.empty(len(rows), sum(parts), cols, dtype=torch.float8_e4m3fn, device=self.device)
                scales = [None] * len(parts)
                for e, ks in enumerate(rows):
                    start = 0
                    for j, k in enumerate(ks):
                        w = self._slice(k)[...]
                        sc = self._slice(k + "_scale_inv")[...].float()
                        if w.dtype != torch.float8_e4m3fn or list(w.shape) != [parts[j], cols]:
                            raise LayerwiseError(f"{self.folder}: {k} is {w.dtype} {list(w.shape)}, not an FP8 weight "
                                                 f"of the shape the other experts have ({[parts[j], cols]})")
                        if scales[j] is None:
                            scales[j] = torch.empty(len(rows), *sc.shape, dtype=torch.float32, device=self.device)
                        data[e, start:start + parts[j]] = w.to(self.device)
                        scales[j][e] = sc.to(self.device)
                        start += parts[j]
                        taken.update((k, k + "_scale_inv"))
                mine[fused] = BlockFP8Stack(data, scales, parts, self.fp8, self.dtype)
            stacks[lay.index] = mine
        return [k for k in self.layer_keys[i] if k not in taken], stacks

    def _keep(self, i: int, stacks: dict) -> None:
        """Hang the FP8 stacks on their experts; their blocks run the explorer's view (the family's own forward
        needs the plain tensors), unless a pass already set the blocks' forward."""
        mine = []
        for index, st in stacks.items():
            lay = self.view[index]
            lay.experts.__dict__["explorer_fp8"] = st
            if "forward" not in lay.block.__dict__:
                fwd = (lambda hs, *a, _l=lay, **k: _l.forward(hs))
                lay.block.forward = fwd
                mine.append((lay, fwd))
            self.loaded_bytes += sum(s.nbytes for s in st.values())
        self.peak_bytes = max(self.peak_bytes, self.loaded_bytes + self._reader.capacity)
        self._mine[i] = mine

    def _kept_layer_bytes(self, i: int) -> int:
        """Bytes decoder layer ``i`` takes with its experts kept in FP8 (1 byte a weight, plus scales)."""
        total = 0
        for n, p in self.view.decoder_layers[i].named_parameters():
            kept = n.endswith(("experts.gate_up_proj", "experts.down_proj")) and self.fp8 is not None
            total += p.numel() * (1 if kept else p.element_size())
        return total

    def _expert_param_bytes(self, i: int) -> int:
        return sum(p.numel() * p.element_size() for n, p in self.view.decoder_layers[i].named_parameters()
                   if n.endswith(("experts.gate_up_proj", "experts.down_proj")))

    def _kept_dequantised_bytes(self, i: int) -> int:
        return sum(s.data.numel() * torch.finfo(self.dtype).bits // 8
                   for lay in self.view if lay.layer_idx == i and lay.fp8_kept for s in lay.fp8_kept.values())

    def unload_layer(self, i: int) -> None:
        for fn in self.on_unload:
            fn(i)
        for lay, fwd in self._mine.pop(i, []):
            if lay.block.__dict__.get("forward") is fwd:
                del lay.block.forward
        for lay in self.view:
            if lay.layer_idx == i:
                lay.experts.__dict__.pop("explorer_fp8", None)
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
        if self.keep_fp8:
            biggest = max(self._kept_layer_bytes(i) for i in range(n))
            fmt = (", block FP8 experts kept in FP8 and dequantised one expert at a time as computed (the rest of "
                   "each layer dequantised as read)")
            big = [i for i in range(n) if self._expert_param_bytes(i) > SELF_CHECK_BYTES]
            if big:
                fmt += (f"; the self-check is left out on {len(big)} layer(s) whose experts dequantised exceed "
                        f"{SELF_CHECK_BYTES / 2**30:g} GiB")
        spill = self.spill_dir or Path(tempfile.gettempdir())
        reads, cached = self._reads_said(n)
        return (f"layer by layer: {n} decoder layers read from disk one at a time, computing in {_name(self.dtype)} "
                f"on {self.device}{upcast}{fmt}; at most {biggest / 2**20:,.0f} MiB of layer weights plus "
                f"{self.rest_bytes / 2**20:,.0f} MiB of embedding and head in memory; the hidden states between "
                f"layers in memory up to {self.hidden_budget / 2**20:,.0f} MiB, memory-mapped files under {spill} "
                "beyond" + reads
                + ("; each layer's pages dropped from the page cache once read (the checkpoint exceeds half the "
                   "memory)" if self.drop_read_pages and cached else ""))

    def _reads_said(self, n: int) -> tuple[str, bool]:
        """(how the layers are read, in words; whether any of it goes through the page cache)."""
        whole = [i for i in range(n) if self._buffered(i)]
        if not whole:
            return "; each tensor read from the shards' mapping as it is converted", True
        size = max(self._reader.nbytes(self.layer_keys[i]) for i in whole)
        how = "directly from the disk (no page cache)" if self._reader.direct else "through the page cache"
        part = "" if len(whole) == n else f" ({len(whole)} of {n} layers; the others tensor by tensor)"
        return (f"; each layer read whole ahead of its turn into one reused {size / 2**20:,.0f} MiB buffer, "
                f"{how}{part}"), not self._reader.direct or len(whole) < n

    # ---- running ------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the engine is running batches through its layers now (not a layer's load-time self-check)."""
        return self._running

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
                        progress: Callable[[int, int], None] | None = None,
                        after_layer: Callable[[int], None] | None = None
                        ) -> Iterator[tuple[int, object, torch.Tensor | None]]:
        """(batch index, batch, logits or None) for every batch, as ``model(...)`` would give them, computed layer
        by layer. ``before(bi)`` runs before each batch enters each layer (the observer's per-batch state);
        ``after_layer(i)`` once every batch went through decoder layer ``i``, while its weights are still loaded;
        ``progress(layers done, layers)``."""
        before = before or (lambda bi: None)
        n = len(self.view.decoder_layers)
        hidden = _HiddenStore(sum(b.input_ids.numel() for b in batches), self.hidden_budget, self.spill_dir)
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

        try:
            yield from self._passes(batches, before, logits, progress, n, hidden, calls, catcher, after_layer)
        finally:
            self.last_hidden = hidden.where()
            hidden.close()
            self._settle()

    def _passes(self, batches, before, logits, progress, n, hidden, calls, catcher, after_layer):
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
                    if after_layer is not None:
                        after_layer(i)
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
        self._settle()
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)
            self._prefetcher = None

    def _settle(self, release: bool = True) -> None:
        """Wait for reads ahead still running, and give the read buffer back (between passes it holds nothing)."""
        for f in self._reading.values():
            f.cancel() or f.exception()
        self._reading.clear()
        if release:
            self._reader.release()


def _available_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: the GPU's free memory, or the kernel's MemAvailable on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: never keep FP8 by default


def _ct_part(key: str) -> tuple[str | None, str | None]:
    """(module prefix with its dot, part name) of a compressed-tensors key: 'a.b.weight_scale' -> ('a.b.',
    'weight_scale'); (None, None) for a key of no quantised part."""
    for part in CT_WEIGHT_PARTS + CT_ACTIVATION_PARTS + ("weight",):
        if key.endswith("." + part):
            return key[: -len(part)], part
    return None, None


def _drop_pages(path: Path) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except OSError:
        pass  # a hint only


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _inputs(b, device) -> dict:
    return {"input_ids": b.input_ids.to(device), "attention_mask": b.attention_mask().to(device), "use_cache": False}


def engine_of(model) -> LayerwiseModel | None:
    """The layer-by-layer engine running ``model``, or None for a model in memory."""
    return getattr(model, "explorer_layerwise", None)


def _default_hidden_budget() -> int:
    """Bytes of hidden states kept in memory between layers: ``EXPLORER_HIDDEN_BUDGET_MB`` if set, else a quarter
    of the memory available now (at least 256 MiB)."""
    env = os.environ.get("EXPLORER_HIDDEN_BUDGET_MB")
    if env:
        return int(float(env) * 2**20)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = 4 * 2**30
    return max(avail // 4, 256 * 2**20)


class _HiddenStore:
    """Each batch's hidden states between decoder layers: tensors in memory while the pass's total fits the
    budget; otherwise one memory-mapped file per batch (written in place by each layer, so the resident set holds
    about one batch, and the page cache decides the rest). The files go when the pass ends."""

    def __init__(self, tokens: int, budget: int, spill_dir: Path | None):
        self.tokens, self.budget, self.spill_dir = tokens, budget, spill_dir
        self.items: list[torch.Tensor] = []
        self.folder: Path | None = None
        self.decided = False
        self.total = 0

    def append(self, h: torch.Tensor) -> None:
        if not self.decided:  # the first batch gives the bytes per token (several residual streams included)
            per_token = h.numel() * h.element_size() / max(h.shape[0] * h.shape[1], 1) if h.dim() >= 2 else 0
            self.total = int(per_token * self.tokens)
            self.decided = True
            if self.total > self.budget:
                base = self.spill_dir or Path(tempfile.gettempdir())
                base.mkdir(parents=True, exist_ok=True)
                self.folder = Path(tempfile.mkdtemp(prefix="explorer-hidden-", dir=base))
        if self.folder is not None and h.device.type == "cpu":
            path = self.folder / f"{len(self.items)}.bin"
            m = torch.from_file(str(path), shared=True, size=h.numel(), dtype=h.dtype).view(h.shape)
            m.copy_(h)
            h = m
        self.items.append(h)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.items[i]

    def __setitem__(self, i: int, h: torch.Tensor | None) -> None:
        old = self.items[i]
        if h is not None and self.folder is not None and old is not None and old.shape == h.shape \
                and old.dtype == h.dtype and h.device.type == "cpu":
            old.copy_(h)  # written into its file: the layer's output is freed
        else:
            self.items[i] = h

    def where(self) -> str:
        if self.folder is not None:
            return f"hidden states in memory-mapped files under {self.folder.parent} ({self.total / 2**20:,.0f} MiB)"
        return f"hidden states in memory ({self.total / 2**20:,.0f} MiB)"

    def close(self) -> None:
        self.items = []
        if self.folder is not None:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)


def _trunk(model) -> nn.Module:
    """The decoder stack without its LM head, where the model has one apart (``base_model``): a pass that reads
    no logits skips the head's product (a quarter of the demo model's forward; 2-9% of real MoE models')."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model and getattr(model, "lm_head", None) is not None:
        return base
    return model


def forward_batches(model, batches, before: Callable[[int], None] | None = None, logits: bool = True,
                    progress: Callable[[int, int], None] | None = None,
                    after_layer: Callable[[int], None] | None = None
                    ) -> Iterator[tuple[int, object, torch.Tensor | None]]:
    """(batch index, batch, logits) of every batch (logits None, and the head skipped, where ``logits`` is False):
    one forward per batch for a model in memory (or dispatched by accelerate), layer by layer for a layer-by-layer
    model. The one loop the statistics, perplexity and preview passes share. ``progress(done, total)`` counts
    batches in memory, decoder layers layer by layer.
    ``after_layer(i)``: layer by layer, once every batch went through decoder layer ``i`` and while its weights are
    loaded; in memory, for every decoder layer after the last batch (what a hook gathered for layer ``i`` is then
    complete either way)."""
    engine = engine_of(model)
    batches = list(batches)
    if engine is not None:
        yield from engine.forward_batches(batches, before, logits, progress, after_layer)
        return
    from .devices import input_device

    device = input_device(model)
    run = model if logits else _trunk(model)
    for bi, b in enumerate(batches):
        if before is not None:
            before(bi)
        out = run(**_inputs(b, device))
        if progress is not None:
            progress(bi + 1, len(batches))
        yield bi, b, out.logits if logits else None
    if after_layer is not None:
        from .moe import decoder_layers_of

        for i in range(len(decoder_layers_of(model))):
            after_layer(i)


__all__ = ["LayerwiseModel", "LayerwiseError", "forward_batches", "engine_of"]
