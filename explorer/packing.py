"""compressed-tensors ``pack-quantized``, as the explorer writes it: integer codes packed in int32 beside one scale
per group (the format vLLM and llm-compressor read, and transformers dequantises on load), the config groups that
declare it, and the one loop that rewrites a folder's shards tensor by tensor. Beside the other weight formats
(``weightformats``); the quantise operation decides what is rounded and how."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

EXPERT_TARGETS = ["re:.*(?<!shared_)experts.*"]  # compressed-tensors targets: routed experts, not shared ones


def scheme(bits: int, gs: int):
    """(QuantizationArgs, QuantizationScheme) of symmetric ``bits``-bit integer groups of ``gs`` inputs."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=gs)
    return args, QuantizationScheme(targets=EXPERT_TARGETS, weights=args)


def experts_group(args) -> dict:
    return {"group_0": {"targets": EXPERT_TARGETS, "weights": args.model_dump()}}


def packed(key: str, w_dq: torch.Tensor, scale: torch.Tensor, scheme) -> dict:
    """``key``'s dequantised [out, in] weight as compressed-tensors' packed tensors (codes = round(w / scale))."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    out = PackedQuantizationCompressor.compress({"weight": w_dq, "weight_scale": scale.to(w_dq.dtype)}, scheme)
    base = key[: -len("weight")]
    return {base + name: v.contiguous() for name, v in out.items()}


def packed_note(bits, gs) -> str:
    return (f"experts stored packed ({bits}-bit codes, one scale per {gs} inputs; compressed-tensors pack-quantized): "
            "transformers dequantises them while loading")


def rewrite_shard(folder: Path, shard: Path, tensors: dict) -> None:
    """Write ``shard`` anew with ``tensors`` and point the folder's index at their names."""
    from safetensors.torch import save_file

    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        wm = {k: v for k, v in data["weight_map"].items() if v != shard.name}
        wm.update({k: shard.name for k in tensors})
        data["weight_map"] = dict(sorted(wm.items()))
        data.get("metadata", {}).pop("total_size", None)
        index.write_text(json.dumps(data, indent=2))


def rewrite_shards(folder: Path, change: Callable[[str], Callable[[torch.Tensor], dict] | None]) -> None:
    """Each shard of ``folder`` that holds a key ``change`` picks (it returns a function of the tensor giving the
    tensors to store in its place, or None to keep it) is read and written anew, one shard in memory at a time."""
    from safetensors import safe_open

    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            fns = {k: change(k) for k in f.keys()}
            if not any(fns.values()):
                continue
            out = {}
            for k, fn in fns.items():
                t = f.get_tensor(k)
                out.update({k: t} if fn is None else fn(t))
        rewrite_shard(Path(folder), shard, out)
        del out


def declare(folder: Path, groups: dict) -> None:
    """config.json says which modules are compressed-tensors pack-quantized (transformers dequantises on load);
    groups add to those an earlier pass declared."""
    cfg_path = Path(folder) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qc = cfg.get("quantization_config") or {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {}, "ignore": ["lm_head"]}
    qc["config_groups"] = {**qc["config_groups"], **groups}
    cfg["quantization_config"] = qc
    cfg_path.write_text(json.dumps(cfg, indent=2))
