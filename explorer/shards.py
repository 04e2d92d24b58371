"""Reading a checkpoint's safetensors shards: which shard holds each key (inside the folder only), opening a
shard with damage said in words, and the key ``save_pretrained`` writes for an in-memory name. Used by loading,
the layer-by-layer engine, the out-of-core editor and the quantised export; below all of them.
"""
from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PlanError
from .hubcache import inside_model

if TYPE_CHECKING:
    import torch

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


ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
             "BOOL": "bool"}  # safetensors dtype name -> torch dtype name
_ALIGN = 4096  # direct I/O wants the file offset, the length and the buffer aligned to the device's blocks
_GAP = 1 << 20  # bytes of other tensors read through rather than starting another read
_NO_DIRECT = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}  # a file system without direct I/O answers one of these


def safetensors_header(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """key -> (dtype name, shape, first byte, end byte) in the file, from the shard's own header."""
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PlanError(f"{path} is damaged or incomplete (no safetensors header); copy the model again")
        n = struct.unpack("<Q", head)[0]
        try:
            meta = json.loads(f.read(n))
        except ValueError as err:
            raise PlanError(f"{path} is damaged or incomplete (its safetensors header: {err}); copy the model "
                            "again") from err
    return {k: (v["dtype"], list(v["shape"]), 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in meta.items() if k != "__metadata__"}


class RunReader:
    """The tensors of a set of keys read with one large read per run of adjacent bytes in each shard, into one
    page-aligned buffer that the next read reuses; with direct I/O where the file system has it (the bytes go from
    the disk into the buffer, not through the page cache). Measured on this project's 2-core VM over 13.8 GB of
    shards: 1.5-1.9 GB/s and 0.6 s of CPU direct, against 0.62 GB/s and 20 s of CPU through the page cache (the
    kernel's copy out of it), CPU the layer-by-layer engine's products need. The tensors returned are views of
    the buffer, valid until the next read: a caller keeps copies, never the views."""

    def __init__(self, folder: Path, wmap: dict[str, str]):
        self.folder, self.wmap = Path(folder), wmap
        self._headers: dict[str, dict] = {}
        self._buf = None
        self.direct = hasattr(os, "O_DIRECT")  # False once a file system refused it

    def _entry(self, key: str) -> tuple[str, tuple[str, list[int], int, int]]:
        shard = self.wmap[key]
        if shard not in self._headers:
            self._headers[shard] = safetensors_header(self.folder / shard)
        return shard, self._headers[shard][key]

    def _runs(self, keys: list[str]) -> list[tuple[str, int, int, list[str]]]:
        """(shard, aligned first byte, aligned end, keys in it) per run."""
        by_shard: dict[str, list] = {}
        for k in keys:
            shard, (_, _, start, end) = self._entry(k)
            by_shard.setdefault(shard, []).append((start, end, k))
        runs = []
        for shard, spans in sorted(by_shard.items()):
            spans.sort()
            cur = None
            for start, end, k in spans:
                if cur is not None and start - cur[2] <= _GAP:
                    cur[2] = max(cur[2], end)
                    cur[3].append(k)
                else:
                    cur = [shard, start, end, [k]]
                    runs.append(cur)
        return [(s, a // _ALIGN * _ALIGN, -(-b // _ALIGN) * _ALIGN, ks) for s, a, b, ks in runs]

    def readable(self, keys: list[str]) -> bool:
        """Whether every key's dtype has a torch dtype here (else the caller reads them another way)."""
        return all(self._entry(k)[1][0] in ST_DTYPES for k in keys)

    def nbytes(self, keys: list[str]) -> int:
        """The buffer's bytes for ``keys``: their runs, aligned."""
        return sum(b - a for _, a, b, _ in self._runs(keys))

    @property
    def capacity(self) -> int:
        return len(self._buf) if self._buf is not None else 0

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lies in the buffer (a view a caller must copy before the next read)."""
        if self._buf is None or t.device.type != "cpu" or t.numel() == 0:
            return False
        base = self._base
        return base <= t.data_ptr() < base + len(self._buf)

    def release(self) -> None:
        """Give the buffer back (views still held keep it alive until they go)."""
        self._buf = None

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        import ctypes
        import mmap

        import torch

        runs = self._runs(keys)
        need = sum(b - a for _, a, b, _ in runs)
        if self._buf is None or len(self._buf) < need:
            self._buf = None
            self._buf = mmap.mmap(-1, max(need, _ALIGN))
            self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        view = memoryview(self._buf)
        out: dict[str, torch.Tensor] = {}
        at = 0
        for shard, a, b, ks in runs:
            got = self._read_run(self.folder / shard, a, view[at:at + b - a])
            for k in ks:
                dtype, shape, start, end = self._headers[shard][k]
                if end - a > got:
                    raise PlanError(f"{self.folder / shard} is damaged or incomplete ({k} ends past its end); copy "
                                    "the model again")
                t = torch.frombuffer(self._buf, dtype=getattr(torch, ST_DTYPES[dtype]), offset=at + start - a,
                                     count=math.prod(shape)) if end > start else \
                    torch.empty(0, dtype=getattr(torch, ST_DTYPES[dtype]))
                out[k] = t.view(shape)
            at += b - a
        del view
        return out

    def _read_run(self, path: Path, offset: int, into: memoryview) -> int:
        """Bytes read from ``offset`` into ``into`` (fewer at the file's end)."""
        fd = None
        if self.direct:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as err:
                if err.errno not in _NO_DIRECT:
                    raise
                self.direct = False  # tmpfs and some network file systems: through the page cache instead
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < len(into):
                try:
                    n = os.preadv(fd, [into[done:done + (256 << 20)]], offset + done)
                except OSError as err:
                    if err.errno not in _NO_DIRECT or not self.direct:
                        raise
                    self.direct = False
                    os.close(fd)
                    fd = os.open(path, os.O_RDONLY)
                    continue
                if n <= 0:
                    break
                done += n
            return done
        finally:
            os.close(fd)
