"""Data parallelism with torch.distributed: the one place where processes meet.

Launched by ``torchrun`` (which sets RANK, WORLD_SIZE, MASTER_ADDR, …), every process holds a
shard of each half-set's particles: particle j of a half belongs to rank j mod world size. A
minibatch is the same set of particles whatever the number of processes; each rank computes
the sums over its part of it, and :func:`all_reduce_sums` adds them up, so every rank takes
the same step and holds the same maps. Gloo on CPU, NCCL on CUDA. Only rank 0 writes files.
Without torchrun (or with one process) everything here is a no-op.
"""

from __future__ import annotations

import atexit
import os

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor


def init(device: torch.device) -> None:
    """Join the process group that torchrun describes (no-op for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(torch_dist.destroy_process_group)


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes files and prints."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """On CUDA, each process on a machine takes the GPU of its LOCAL_RANK (unless one was named),
    made the current device before :func:`init` starts NCCL."""
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def shard(index: np.ndarray) -> np.ndarray:
    """The positions of ``index`` (an array of particle numbers of a half) that this rank owns."""
    return np.nonzero(np.asarray(index) % world_size() == rank())[0]


def all_reduce_sums(*values: Tensor | float) -> list[Tensor]:
    """Sums over ranks of tensors and numbers (numbers come back as float64 0-d tensors), in one
    collective: everything is packed into one float64 buffer (complex as real pairs)."""
    tensors = [torch.as_tensor(v, dtype=torch.float64) if not isinstance(v, Tensor) else v for v in values]
    if world_size() == 1:
        return tensors
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    flat = [(torch.view_as_real(t) if t.is_complex() else t).reshape(-1).to(device, torch.float64) for t in tensors]
    buffer = torch.cat(flat)
    torch_dist.all_reduce(buffer)
    out, start = [], 0
    for t, f in zip(tensors, flat):
        part = buffer[start:start + f.numel()]
        start += f.numel()
        real_dtype = t.real.dtype if t.is_complex() else t.dtype
        part = part.to(t.device, real_dtype)
        out.append(torch.view_as_complex(part.reshape(*t.shape, 2)) if t.is_complex() else part.reshape(t.shape))
    return out


def broadcast_object(value):
    """``value`` as rank 0 has it, on every rank (for decisions that must agree)."""
    if world_size() == 1:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        torch_dist.barrier()
