"""Hugging Face cache snapshots: what `hf download` and every hub id leave on disk.

A snapshot folder (``models--org--name/snapshots/<revision>/``) holds symlinks into ``../../blobs``; its files lie
outside the folder by design. The explorer reads a model's files only inside its folder (an index naming
``../elsewhere/x.safetensors`` is refused), so this module says where else a folder's files may really live: its own
blob store, and nothing else. A hub id that the cache holds resolves to its snapshot folder, so a cached model
loads offline and can be cut out of core like any folder.
"""
from __future__ import annotations

import os
from pathlib import Path


def blob_store(folder: str | os.PathLike) -> Path | None:
    """The blob store of a hub cache snapshot folder, or None for any other folder."""
    f = Path(folder).expanduser().absolute()
    if f.parent.name != "snapshots" or not f.parent.parent.name.startswith(("models--", "datasets--")):
        return None
    blobs = f.parent.parent / "blobs"
    return blobs.resolve() if blobs.is_dir() else None


def model_roots(folder: str | os.PathLike) -> list[Path]:
    """The folders a model folder's files may resolve into: itself, and its blob store if it is a snapshot."""
    roots = [Path(folder).expanduser().resolve()]
    blobs = blob_store(folder)
    return roots + ([blobs] if blobs is not None else [])


def inside_model(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` (links followed) is one of the model folder's own files."""
    p = Path(path).resolve()
    return any(p == r or r in p.parents for r in model_roots(folder))


def hub_cache_dir() -> Path:
    """Where the hub cache is now (read at call time: HF_HUB_CACHE, then HF_HOME/hub, then huggingface_hub's)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The snapshot folder the hub cache holds for ``repo_id`` (with its config.json), or None."""
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(hub_cache_dir()), revision=revision)
    except Exception:  # noqa: BLE001 - an id huggingface_hub refuses as malformed is simply not cached
        return None
    return Path(hit).parent if isinstance(hit, str) else None
