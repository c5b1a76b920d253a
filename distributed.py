"""Process-group set-up for torchrun, `torch.distributed.launch` and plain single-process runs,
plus the few collective helpers the training code needs (all no-ops without a process group)."""
import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from utils import UserError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(local_rank_arg: Optional[int], device_kind: str = 'auto') -> DistContext:
    """Join the process group the launcher describes in `RANK`/`WORLD_SIZE`/`LOCAL_RANK`.

    `python main.py` without those variables is a single process and creates no group; every
    helper below then acts locally. The backend is NCCL on CUDA and gloo on CPU.
    """
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', local_rank_arg or 0))
    use_cuda = torch.cuda.is_available() if device_kind == 'auto' else device_kind == 'cuda'
    if use_cuda and local_rank >= torch.cuda.device_count():
        found = f"only {torch.cuda.device_count()} CUDA devices are" if torch.cuda.is_available() \
            else "no CUDA device is"
        raise UserError(f"--device cuda: process {local_rank} of this machine needs CUDA device "
                        f"{local_rank} but {found} visible; use --device cpu or start fewer processes")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    if world_size > 1:
        dist.init_process_group(
            backend='nccl' if use_cuda else 'gloo', init_method='env://',
            world_size=world_size, rank=rank, timeout=datetime.timedelta(minutes=30))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes (in place) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_processes_agree(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is True in every process: keeps ranks taking the same branch
    (e.g. skipping a backward pass) so that DDP's collectives stay matched."""
    if not is_distributed():
        return flag
    value = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def cleanup(finished: bool) -> None:
    """Leave the process group. After a finished run every process first waits for the others:
    on torch 2.4, destroying a gloo group while its worker thread still releases the last
    collective's tensors deadlocks on the GIL (seen after `--eval`, which ends right after an
    all-reduce). Not after an error, where the others may never arrive."""
    if is_distributed():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
