"""DistributedDataParallel under torchrun: set up the process group from the environment torchrun provides.

Every rank loads the same data (fixed by the seed) and trains its shard (``loop.fit`` wraps the model in DDP);
rank 0 alone writes the build folder, exports, benches and reports. Backend: NCCL for CUDA, gloo for CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tlcompile.errors import TrainError


@dataclass(frozen=True)
class DistributedRun:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> tuple[DistributedRun, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT), if any.

    Returns the run and the device this rank trains on (``cuda:LOCAL_RANK`` on GPUs).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedRun(), device
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TrainError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices; start fewer processes per "
                "node"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedRun(rank=rank, world_size=world, local_rank=local_rank), device


def barrier(run: DistributedRun) -> None:
    if run.enabled and dist.is_initialized():
        dist.barrier()


def teardown(run: DistributedRun) -> None:
    if run.enabled and dist.is_initialized():
        dist.destroy_process_group()
