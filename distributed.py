"""Process-group set-up for torchrun, `torch.distributed.launch` and plain single-process runs,
the few collective helpers the training code needs (all no-ops without a process group), and
the watch that stops every process when one of them fails.

Why the watch: a process that stops with an error leaves the others waiting in the next
collective (a barrier, DDP's broadcasts, an all-reduce), which only the process group's
timeout would end, half an hour later. torchrun stops the workers of its own machine when one
fails, but not those of other machines, and launchers such as `srun` start processes with no
agent at all. So a failing process reports its error in the group's key-value store, and every
other process polls the store from a thread and, seeing the report, says which process failed
and exits at once, even from inside a blocked collective.
"""
import contextlib
import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from utils import UserError

FAILURES_KEY = 'focal/failures'
NOTICED_KEY = 'focal/failures_noticed'
# How often a failed process checks whether the others have noticed its report.
REPORT_POLL_SECONDS = 0.05


def failure_key(rank: int) -> str:
    return f'focal/failure/{rank}'


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class PeerWatch:
    """A daemon thread that ends this process (status 1, one `error:` line) soon after another
    process of the group reports a failure in `store` (see `report`).

    It exits with `os._exit`: the main thread may be blocked in a collective the failed process
    will never join, and no exception reaches it there. Files being written when the report
    arrives are finished first (`writing`), so the exit never leaves a run folder half-saved.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int,
                 poll_seconds: float = 0.5) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.poll_seconds = poll_seconds
        self._stopped = threading.Event()
        self._writing = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name='peer-watch', daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_seconds):
            try:
                if int(self.store.add(FAILURES_KEY, 0)) == 0:
                    continue
                failed = [rank for rank in range(self.world_size)
                          if rank != self.rank and self.store.check([failure_key(rank)])]
                if not failed or self._stopped.is_set():
                    continue  # only this process failed, and its main thread handles that
                message = self.store.get(failure_key(failed[0])).decode(errors='replace')
                self.store.add(NOTICED_KEY, 1)
            except Exception:  # the store is gone: the group is ending anyway
                return
            with self._writing:
                print(f"error: process {failed[0]} of {self.world_size} stopped, so process "
                      f"{self.rank} stops too. Its error: {message}", file=sys.stderr, flush=True)
                # The store may live in this process: let the failed one see the notice first.
                time.sleep(REPORT_POLL_SECONDS * 4)
                os._exit(1)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Defer an exit for a peer's failure until the block (a file write) is done."""
        with self._writing:
            yield

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def report(self, message: str, wait_seconds: float = 5.0) -> None:
        """Tell the other processes that this one failed with `message`, then wait (at most
        `wait_seconds`) until each of them that has not failed too has noticed: the store may
        live in this process and end with it."""
        self.stop()
        try:
            self.store.set(failure_key(self.rank), message)
            self.store.add(FAILURES_KEY, 1)
            deadline = time.monotonic() + wait_seconds
            while time.monotonic() < deadline:
                failures = int(self.store.add(FAILURES_KEY, 0))
                if int(self.store.add(NOTICED_KEY, 0)) >= self.world_size - failures:
                    break
                time.sleep(REPORT_POLL_SECONDS)
        except Exception:  # the store is gone: the others are stopping already
            pass


_watch: Optional[PeerWatch] = None


def init_distributed(local_rank_arg: Optional[int], device_kind: str = 'auto') -> DistContext:
    """Join the process group the launcher describes in `RANK`/`WORLD_SIZE`/`LOCAL_RANK` and
    start the `PeerWatch`.

    `python main.py` without those variables is a single process and creates no group; every
    helper below then acts locally. The backend is NCCL on CUDA and gloo on CPU.
    """
    global _watch
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
        _watch = PeerWatch(dist.distributed_c10d._get_default_store(), rank, world_size)
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


def broadcast_buffers(module: nn.Module) -> None:
    """Give every process the floating-point buffers (e.g. batch-norm statistics) of process
    0, as DDP does before each of its forward passes: evaluation runs the unwrapped model,
    whose buffers each process last updated with its own batch."""
    if is_distributed():
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.broadcast(buffer, src=0)


@contextlib.contextmanager
def writing_files() -> Iterator[None]:
    """Files written in this block are finished before a peer's failure ends the process."""
    with _watch.writing() if _watch is not None else contextlib.nullcontext():
        yield


def stop_watching() -> None:
    """Stop reacting to other processes' failures (this process is failing itself)."""
    if _watch is not None:
        _watch.stop()


def leave_process_group(failure: Optional[str] = None) -> None:
    """Leave the process group; with `failure`, first tell the other processes (they stop at
    once). After a finished run every process waits for the others: on torch 2.4, destroying a
    gloo group while its worker thread still releases the last collective's tensors deadlocks
    on the GIL (seen after `--eval`, which ends right after an all-reduce). Not after a
    failure, where the others may never arrive."""
    global _watch
    if not is_distributed():
        return
    if failure is None:
        dist.barrier()
    if _watch is not None and failure is not None:
        _watch.report(failure)
    elif _watch is not None:
        _watch.stop()
    _watch = None
    dist.destroy_process_group()
