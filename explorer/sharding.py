"""FSDP2 (PyTorch's ``fully_shard``) for distilling a student larger than one device.

Under ``torchrun`` / ``accelerate launch`` with ``explorer distill --shard``, the student and the frozen teacher
are each sharded across the processes decoder layer by decoder layer: a process holds 1/N of every weight and
gathers one layer at a time for its forward and backward. Each process trains on its share of every global batch,
as under DDP, and FSDP2 averages the gradients. What the explorer reads outside a forward (the best weights kept,
the export) goes through the helpers here, since a sharded parameter holds only this process's rows.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .moe import decoder_layers_of


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def inference(model: nn.Module):
    """``torch.inference_mode`` for a forward without gradients, ``no_grad`` for a sharded model: FSDP2 reuses its
    gathering buffers in the training step, and a buffer made in inference mode cannot be written outside it."""
    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


def mesh_for(device: torch.device):
    """One flat mesh over every process of the launcher (gloo on CPU, NCCL on CUDA: the process group accelerate
    or torchrun set up)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("--shard needs a launcher: start with torchrun or accelerate launch")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of the unsharded module tree with every parameter on the meta device (no data; buffers, which are
    small and partly not in the state dict, copied): what the gathered weights are put back into for the export,
    with the student's own per-layer shapes and attributes."""
    memo: dict = {id(b): b.detach().clone() for b in model.buffers()}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def shard(model: nn.Module, mesh) -> None:
    """Each decoder layer its own FSDP2 unit (gathered one at a time), the rest (embedding, head) the root's."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers_of(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def snapshot(model: nn.Module) -> dict:
    """This process's part of every weight, on the CPU (sharded: its rows only; whole otherwise)."""
    return {k: _local(v).detach().cpu().clone() for k, v in model.state_dict().items()}


def restore(model: nn.Module, state: dict) -> None:
    """Put back what ``snapshot`` took from this process."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    with torch.no_grad():
        for k, v in model.state_dict().items():
            _local(v).copy_(state[k])


def share(model: nn.Module) -> tuple[int, int]:
    """(parameters this process holds, parameters of the whole model)."""
    return (sum(_local(p).numel() for p in model.parameters()), sum(p.numel() for p in model.parameters()))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded scalar (a gradient norm) as one value every process agrees on."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered(model: nn.Module, shell: nn.Module, main: bool) -> nn.Module | None:
    """The whole model on the main process (every process must call this: the weights are gathered), None on the
    others. ``shell`` is the ``skeleton`` taken before sharding."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    shell.load_state_dict(full, assign=True)
    return shell


__all__ = ["is_sharded", "inference", "mesh_for", "skeleton", "shard", "snapshot", "restore", "share", "full_tensor", "gathered"]
