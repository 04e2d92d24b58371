"""Several processes (``torchrun`` / ``accelerate launch``) sharing one pass: each runs its own contiguous share of
the batches, and the running sums are added with ``torch.distributed``. Contiguous shares of the single process's
batches keep every per-batch choice (padding, the dense sample) as one process makes it, so the result equals the
single-process one up to the order of float additions."""
from __future__ import annotations

import os

import torch


def group():
    """torch.distributed when this process is one of several, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def share(n: int) -> range:
    """The batches (of ``n``) this process runs: all of them alone, a contiguous share of several."""
    dist = group()
    if dist is None:
        return range(n)
    w, r = dist.get_world_size(), dist.get_rank()
    return range(r * n // w, (r + 1) * n // w)


def is_main() -> bool:
    dist = group()
    return dist is None or dist.get_rank() == 0


def add(tensors: list[torch.Tensor], op: str = "sum") -> None:
    """Every process's tensors added (or their maximum, ``op='max'``) in place."""
    dist = group()
    if dist is None:
        return
    red = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    for t in tensors:
        dist.all_reduce(t, op=red)


def gather(obj) -> list:
    """Every process's ``obj``, in rank order (one process: ``[obj]``)."""
    dist = group()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj):
    """The main process's ``obj`` in every process."""
    dist = group()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def start(device: str | None) -> str | None:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPUs, nccl on GPUs); returns the
    device this process computes on (its own GPU). Outside torchrun: nothing, ``device`` as given."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
