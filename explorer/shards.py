"""Reading a checkpoint's safetensors shards: which shard holds each key (inside the folder only), opening a
shard with damage said in words, and the key ``save_pretrained`` writes for an in-memory name. Used by loading,
the layer-by-layer engine, the out-of-core editor and the quantised export; below all of them.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import PlanError
from .hubcache import inside_model

INDEX = "model.safetensors.index.json"


def weight_map(folder: Path) -> dict[str, str]:
    """key -> shard file, every shard inside ``folder`` and readable (a weight_map naming
    ``../outside/x.safetensors`` would copy another folder's file into the output: refused)."""
    idx = folder / INDEX
    if idx.exists():
        try:
            wmap = json.loads(idx.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise PlanError(f"{idx} is not a safetensors index (no readable weight_map): {err}") from err
        if not isinstance(wmap, dict) or not wmap:
            raise PlanError(f"{idx}: weight_map is empty or not a mapping of tensor names to shard files")
    else:
        single = folder / "model.safetensors"
        if not single.exists():
            raise PlanError(f"{folder} has neither {INDEX} nor model.safetensors")
        wmap = None
    if wmap is None:
        return {k: "model.safetensors" for k in open_shard(single, lambda f: list(f.keys()))}
    for shard in sorted(set(wmap.values())):
        path = (folder / str(shard)).resolve()
        if not isinstance(shard, str) or not inside_model(folder, folder / shard):
            raise PlanError(f"{idx}: shard {shard!r} lies outside the model folder; refused")
        if not path.is_file():
            raise PlanError(f"{folder}: shard {shard} named by the index is missing")
    return wmap


def open_shard(path: Path, fn):
    """``fn`` of an opened shard; a damaged or truncated one is said in words."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            return fn(f)
    except (SafetensorError, OSError) as err:
        raise PlanError(f"{path} is damaged or incomplete (safetensors: {err}); copy the model again") from err


def disk_name(model):
    """In-memory key -> the key ``save_pretrained`` writes (transformers' reverse renamings; Kolibri's
    ``mlp.gate.e_score_correction_bias`` is ``moe.router.expert_bias`` on disk)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        rev = [c.reverse_transform() for c in get_model_conversion_mapping(model, add_legacy=False)[::-1]]
        ren = [r for r in rev if isinstance(r, WeightRenaming)]
    except Exception:  # noqa: BLE001 - an older or newer transformers without these: names as they are
        return lambda k: k
    return lambda k: apply_renamings(k, ren) if ren else k
