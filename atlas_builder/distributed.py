"""Distributed: the few torch.distributed calls a sharded build needs, behind one small class.

A build launched by torchrun (`torchrun --nproc-per-node N -m atlas_builder
build CONFIG`, or multi-node with torchrun's rendezvous, under Slurm or
Kubernetes) finds RANK / WORLD_SIZE / LOCAL_RANK in its environment; a plain
`atlas build` is a world of one and never touches torch.distributed.
Backend: nccl when the ranks use CUDA, gloo on the CPU. Rank 0 is the
writer: only it opens the store and writes the site; the others compute
their shard and send the results to it as pickled objects.

This module owns process-group setup and teardown, the device of each rank
and the object collectives; it knows nothing about scans or images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import AtlasError

TIMEOUT = timedelta(minutes=60)  # a rank waits this long for the others (the writer renders the site alone)


@dataclass
class Cluster:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""  # "" when not distributed

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Rank 0: opens the store, writes the site, prints the report."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each rank's own GPU (LOCAL_RANK) when the build runs on CUDA."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on the writer; None elsewhere."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world if self.writer else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """The writer's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def from_environment(device: torch.device) -> Cluster:
    """Join the process group torchrun describes in the environment (a world of one without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Cluster()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    except Exception as exc:  # rendezvous failures come in many types
        raise AtlasError(f"could not join the torch.distributed group (rank {rank} of {world}, backend {backend}): "
                         f"{exc}; launch with torchrun, e.g. `torchrun --nproc-per-node 2 -m atlas_builder build "
                         f"CONFIG`") from None
    return Cluster(rank, world, local_rank, backend)
