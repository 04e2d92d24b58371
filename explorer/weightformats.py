"""The quantised weight formats the largest MoE checkpoints ship in, as the out-of-core apply reads and writes them.

- Block-wise FP8 (DeepSeek-V3/R1, Kimi-K2, GLM-4.5/4.6, Qwen3-*-FP8, MiniMax-M2; ``quant_method: fp8``):
  ``W`` in ``float8_e4m3fn`` [out, in] with ``W_scale_inv`` float32 [ceil(out/bh), ceil(in/bw)], one scale per
  ``weight_block_size`` block (128x128 in the published models); the real weight is ``W * scale`` blockwise.
- MXFP4 (gpt-oss; ``quant_method: mxfp4``): ``*_blocks`` uint8 [..., n/32, 16] holding two e2m1 values per byte
  (low nibble first) and ``*_scales`` uint8 [..., n/32], an e8m0 exponent biased by 127 per 32 values.
- compressed-tensors (llm-compressor's output; ``quant_method: compressed-tensors``): per module ``weight_packed``
  (int32 words of 4- or 8-bit codes) or ``weight`` (FP8 / int8 codes) beside ``weight_scale`` (and
  ``weight_zero_point``, ``weight_shape``); read for the layer-by-layer engine by compressed-tensors' own
  decompressors (:class:`CompressedTensorsReader`).

Dropping experts or whole layers copies these bytes and their scales as they are; merging and slimming
dequantise the members, edit in float32, and quantise the result back to the same format.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .errors import ExplorerError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


class WeightFormatError(ExplorerError):
    """A quantised checkpoint is not what its config says (a scale grid that does not fit its weight, ...)."""


def quant_config(folder: Path) -> dict | None:
    """The checkpoint's ``quantization_config`` (text config included), or None."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    return q if isinstance(q, dict) else None


def fp8_block(qc: dict | None) -> tuple[int, int] | None:
    """(bh, bw) of a block-wise FP8 checkpoint, else None."""
    if not qc or qc.get("quant_method") != "fp8":
        return None
    b = qc.get("weight_block_size") or [128, 128]
    return int(b[0]), int(b[1])


def is_mxfp4(qc: dict | None) -> bool:
    return bool(qc) and qc.get("quant_method") == "mxfp4"


def scale_grid(shape, block: tuple[int, int]) -> list[int]:
    return [math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])]


def check_fp8_grid(name: str, shape, scale_shape, block: tuple[int, int]) -> None:
    """A weight and its scales must agree on the block grid; say which tensor and how when they do not."""
    want = scale_grid(shape, block)
    if list(scale_shape) != want:
        raise WeightFormatError(
            f"{name}: FP8 weight {list(shape)} with weight_block_size {list(block)} needs a scale grid {want}, but "
            f"{name}_scale_inv is {list(scale_shape)}; the checkpoint's scales do not fit its weights (a damaged "
            "or differently blocked checkpoint): refused rather than dequantised wrongly")


def check_fp8_readable(name: str, shape, block: tuple[int, int]) -> None:
    """transformers dequantises with a block of rows / scale-rows: a weight that does not fill whole blocks is
    read with the wrong block (or not at all), so say so instead of letting it happen."""
    if shape[0] % block[0] or shape[1] % block[1]:
        raise WeightFormatError(
            f"{name}: FP8 weight {list(shape)} does not fill whole {list(block)} blocks; transformers derives the block "
            f"from the scale grid and would read it with the wrong block or fail (\"not divisible by scale grid\")")


INT_DTYPES = ("I8", "I16", "I32", "I64", "U16", "U32", "U64")


def check_int_weights(heads: dict, qc: dict | None) -> None:
    """Refuse weights stored as integers in a checkpoint that says it is not quantised: transformers would cast
    them to floats silently, and every number computed after would be wrong."""
    if qc:
        return  # packed formats (compressed-tensors, GPTQ, AWQ) keep integer tensors on purpose
    for k, (_, dtype) in sorted(heads.items()):
        if dtype in INT_DTYPES and (k.endswith((".weight", "_proj", "_bias", ".bias")) or ".experts." in k):
            raise WeightFormatError(f"tensor {k} is stored as {dtype} (integers), but the config declares no "
                                    "quantization: its weights would be cast to floats and be wrong. The "
                                    "checkpoint is damaged or was converted wrongly")


def checkpoint_heads(folder: Path) -> dict:
    """key -> (shape, dtype) of every tensor in a local folder's shards, from their headers alone."""
    from safetensors import SafetensorError, safe_open

    heads = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(shard, "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    heads[k] = (list(sl.get_shape()), sl.get_dtype())
        except SafetensorError as err:
            raise WeightFormatError(f"{shard.name} is damaged or incomplete (safetensors: {err}); copy or export "
                                    "the model again") from err
    return heads


def check_checkpoint(folder: Path) -> list[str]:
    """A local checkpoint's tensors against what its config says, from the safetensors headers alone: no
    integer weights in an unquantised model; every FP8 weight's scale grid fits it. Returns the FP8 weights that
    do not fill whole blocks (DeepSeek-V3's 576-row ``kv_a_proj_with_mqa``): transformers would read them with
    the wrong block, so the explorer dequantises those checkpoints itself (``explorer.layerwise``)."""
    qc = quant_config(folder)
    heads = checkpoint_heads(folder)
    check_int_weights(heads, qc)
    block = fp8_block(qc)
    partial = []
    if block is None:
        return partial
    for k, (shape, dtype) in heads.items():
        if dtype.startswith("F8") and len(shape) == 2 and k + "_scale_inv" in heads:
            check_fp8_grid(k, shape, heads[k + "_scale_inv"][0], block)
            try:
                check_fp8_readable(k, shape, block)
            except WeightFormatError:
                partial.append(k)
    return partial


def dequant_fp8(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 weight of a block-wise FP8 tensor [out, in] and its [ceil(out/bh), ceil(in/bw)] scales."""
    check_fp8_grid("weight", w.shape, scale.shape, block)
    (rows, cols), (gh, gw) = w.shape, scale.shape
    if rows == gh * block[0] and cols == gw * block[1]:  # whole blocks: one float32 copy, scaled in place
        out = w.to(torch.float32).view(gh, block[0], gw, block[1]).mul_(scale.float()[:, None, :, None])
        return out.view(rows, cols)
    s = scale.float().repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
    return w.float() * s


def quant_fp8(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scales) of ``x`` [out, in]: one scale per block, its largest value at 448."""
    rows, cols = x.shape
    gh, gw = scale_grid(x.shape, block)
    pad = torch.zeros(gh * block[0], gw * block[1], dtype=torch.float32)
    pad[:rows, :cols] = x.float()
    blocks = pad.reshape(gh, block[0], gw, block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(gh * block[0], gw * block[1])
    return q[:rows, :cols].to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [..., n] of MXFP4 ``blocks`` [..., n/32, 16] (uint8, low nibble first) and ``scales`` [..., n/32]."""
    lo, hi = blocks & 0x0F, blocks >> 4
    vals = torch.stack([FP4_VALUES[lo.long()], FP4_VALUES[hi.long()]], dim=-1).reshape(*blocks.shape[:-1], 32)
    exp = scales.to(torch.int32) - 127
    out = vals * torch.pow(2.0, exp.float())[..., None]
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def quant_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [..., n/32, 16], scales uint8 [..., n/32]) of ``x`` [..., n]: per 32 values the power of two
    that brings their largest to at most 6 (e2m1's largest), then round to the nearest e2m1 value."""
    if x.shape[-1] % 32:
        raise WeightFormatError(f"MXFP4 packs 32 values per scale; a last dimension of {x.shape[-1]} cannot be held")
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = g.abs().amax(-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax)).clamp(-127, 127)
    v = g / torch.pow(2.0, exp)[..., None]
    mags = FP4_VALUES[:8]
    code = (v.abs()[..., None] - mags).abs().argmin(-1)  # nearest magnitude
    code = code + 8 * ((v < 0) & (code > 0)).long()
    code = code.to(torch.uint8).reshape(*g.shape[:-1], 16, 2)
    packed = code[..., 0] | (code[..., 1] << 4)
    return packed.contiguous(), (exp + 127).to(torch.uint8).contiguous()


# ---- compressed-tensors ---------------------------------------------------------------------------------------
CT_WEIGHT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
                   "weight_global_scale")
CT_ACTIVATION_PARTS = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
                       "k_scale", "v_scale")  # calibrated activation ranges: a dequantised model computes without


def is_compressed_tensors(qc: dict | None) -> bool:
    return bool(qc) and qc.get("quant_method") == "compressed-tensors"


class CompressedTensorsReader:
    """Dequantises one module's stored tensors of a compressed-tensors checkpoint with compressed-tensors' own
    decompressor for its scheme (pack-quantized, float-quantized, int-quantized, naive-quantized, ...), so every
    scheme the library writes is read as the library reads it. Which scheme a module has comes from the config's
    groups: a ``re:`` target matched against the module's checkpoint name first, else a class target (``Linear``:
    every quantised weight in a checkpoint is a Linear's)."""

    def __init__(self, qc: dict):
        try:
            from compressed_tensors.compressors.base import BaseCompressor
            from compressed_tensors.quantization import QuantizationConfig
        except ImportError as err:
            raise WeightFormatError("this checkpoint is quantised with compressed-tensors, which is not installed: "
                                    f"pip install -e \".[quant]\" (or pip install compressed-tensors); {err}") from None
        self._registry = BaseCompressor
        config = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "quant_method"})
        self.format = str(getattr(config.format, "value", config.format) or "")
        self.groups = [(name, list(g.targets or []), g) for name, g in (config.config_groups or {}).items()]
        if not self.groups:
            raise WeightFormatError("the compressed-tensors config has no config_groups: which scheme each weight "
                                    "is stored in is unknown")

    def scheme(self, module: str):
        import re

        for _, targets, g in self.groups:
            if any(t.startswith("re:") and re.match(t[3:], module) for t in targets):
                return g
        for _, targets, g in self.groups:
            if any(not t.startswith("re:") for t in targets):
                return g
        raise WeightFormatError(f"{module}: stored quantised, but no compressed-tensors config group targets it")

    def dequantise(self, module: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float weight of ``module`` from its stored parts (``weight`` / ``weight_packed``, ``weight_scale``,
        ...; names without the module prefix)."""
        scheme = self.scheme(module)
        fmt = getattr(scheme, "format", None)
        fmt = str(getattr(fmt, "value", fmt) or self.format)
        if not fmt or fmt == "mixed-precision":
            raise WeightFormatError(f"{module}: the compressed-tensors config names no format for its scheme")
        try:
            compressor = self._registry.get_value_from_registry(fmt)
            out = compressor.decompress(dict(parts), scheme)
        except WeightFormatError:
            raise
        except Exception as err:  # the library's own words, with which module and format
            raise WeightFormatError(f"{module}: compressed-tensors could not dequantise its {fmt} weight "
                                    f"({type(err).__name__}: {err})") from err
        w = out["weight"] if isinstance(out, dict) else out
        if w.dtype in (torch.int8, torch.int32, torch.uint8) or not w.is_floating_point():
            raise WeightFormatError(f"{module}: compressed-tensors returned {w.dtype} codes, not a weight")
        return w


# ---- block FP8 experts kept in FP8 -----------------------------------------------------------------------------
class BlockFP8Stack:
    """A layer's stacked expert tensor [E, R, C] kept in block FP8 in memory, each expert dequantised to ``dtype``
    only when it is computed: half a bf16 layer's bytes (DeepSeek-V3's 256 experts: 11.3 GB instead of 22.5 GB),
    so a layer of a published FP8 checkpoint fits where its dequantised copy would not. ``parts`` are the row
    counts of the separately blocked tensors stacked along R (gate and up in ``gate_up_proj``), each with its own
    scale grid, as the checkpoint stores them per expert."""

    def __init__(self, data: torch.Tensor, scales: list[torch.Tensor], parts: list[int], block: tuple[int, int],
                 dtype: torch.dtype):
        if sum(parts) != data.shape[1] or len(scales) != len(parts):
            raise WeightFormatError(f"FP8 expert stack: parts {parts} do not add up to its {data.shape[1]} rows")
        self.data, self.scales, self.parts, self.block, self.dtype = data, scales, list(parts), block, dtype
        self._last: tuple[int, torch.Tensor] | None = None  # the expert dequantised last: the loop computes an
        # expert and the statistics' dense sample reads it again at once

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + sum(s.numel() * s.element_size() for s in self.scales)

    def __len__(self) -> int:
        return self.data.shape[0]

    def is_floating_point(self) -> bool:
        return True  # what it computes in

    def __getitem__(self, e: int) -> torch.Tensor:
        """Expert ``e``'s [R, C] weight in the compute dtype."""
        e = int(e)
        if self._last is not None and self._last[0] == e:
            return self._last[1]
        w, start = torch.empty(self.data.shape[1:], dtype=self.dtype, device=self.data.device), 0
        for rows, scale in zip(self.parts, self.scales):  # each part cast into place: no concatenated copy
            w[start:start + rows].copy_(dequant_fp8(self.data[e, start:start + rows], scale[e], self.block))
            start += rows
        self._last = (e, w)
        return w

    def dequantise(self) -> torch.Tensor:
        """Every expert: [E, R, C] in the compute dtype (the layer's full dequantised size)."""
        return torch.stack([self[e] for e in range(len(self))])
