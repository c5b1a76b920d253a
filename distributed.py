"""Process-group set-up for torchrun, `torch.distributed.launch` and plain single-process runs
(the launcher's variables checked together first), the few collective helpers the training
code needs (all no-ops without a process group), among them the start-up check that every
process holds the same data, config and code, and the watch that stops every process when one
of them fails.

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
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from utils import UserError

FAILURES_KEY = 'focal/failures'
NOTICED_KEY = 'focal/failures_noticed'
REPORTED_KEY = 'focal/failures_reported'
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
        `wait_seconds`) until each of them that has not failed too has noticed. The store may
        live in process 0 and end with it, so process 0 also waits for the other failed
        processes to finish their reports: processes that fail together (on an error every
        process finds) would otherwise lose the store mid-report, and torch prints a stack."""
        self.stop()
        try:
            self.store.set(failure_key(self.rank), message)
            self.store.add(FAILURES_KEY, 1)
            deadline = time.monotonic() + wait_seconds
            while time.monotonic() < deadline:
                failures = int(self.store.add(FAILURES_KEY, 0))
                noticed = int(self.store.add(NOTICED_KEY, 0)) >= self.world_size - failures
                reported = self.rank != 0 or int(self.store.add(REPORTED_KEY, 0)) >= failures - 1
                if noticed and reported:
                    break
                time.sleep(REPORT_POLL_SECONDS)
            if self.rank != 0:
                self.store.add(REPORTED_KEY, 1)  # its last use of the store
        except Exception:  # the store is gone: the others are stopping already
            pass


_watch: Optional[PeerWatch] = None


class LaunchError(UserError):
    """The launcher's variables do not describe a job this process can join."""


class ProcessesDisagreeError(UserError):
    """The processes of a job hold different data, config or code."""


LAUNCHERS = ("torchrun and torch.distributed.launch set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
             "and MASTER_PORT for each process")
# After this long in the rendezvous, and then every minute, a process says what it waits for.
RENDEZVOUS_NOTICE_SECONDS = 5.0
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Launch:
    """This process's place in its job as the launcher describes it; `master` is
    (MASTER_ADDR, MASTER_PORT) when there are several processes."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master: Optional[Tuple[str, int]] = None


def read_launch(environ: Mapping[str, str], local_rank_arg: Optional[int] = None) -> Launch:
    """The job that RANK, WORLD_SIZE, LOCAL_RANK (else the launcher's `--local-rank`),
    LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT describe, checked together; a `LaunchError`
    names the one that is missing or out of range. None of them set: a single process."""
    def integer(name: str, low: int) -> Optional[int]:
        text = environ.get(name)
        if text is None:
            return None
        try:
            value = int(text)
        except ValueError:
            raise LaunchError(f"{name}={text!r} is not an integer ({LAUNCHERS})") from None
        if value < low:
            raise LaunchError(f"{name}={value} is out of range: it must be at least {low}")
        return value

    rank, world_size = integer('RANK', 0), integer('WORLD_SIZE', 1)
    local_rank, local_world_size = integer('LOCAL_RANK', 0), integer('LOCAL_WORLD_SIZE', 1)
    local_given = f'LOCAL_RANK={local_rank}'
    if local_rank is None:
        local_rank, local_given = local_rank_arg or 0, f'--local-rank {local_rank_arg}'
        if local_rank < 0:
            raise LaunchError(f"{local_given} is out of range: it must be at least 0")
    if world_size is None and (rank is not None or local_rank > 0):
        given = f"RANK={rank}" if rank is not None else local_given
        raise LaunchError(f"{given} is set but WORLD_SIZE is not: a process of a job needs both "
                          f"RANK and WORLD_SIZE ({LAUNCHERS})")
    world_size = world_size or 1
    if rank is None and world_size > 1:
        raise LaunchError(f"WORLD_SIZE={world_size} is set but RANK is not ({LAUNCHERS})")
    rank = rank or 0
    if rank >= world_size:
        raise LaunchError(f"RANK={rank} is out of range for WORLD_SIZE={world_size}: ranks are 0 "
                          f"to {world_size - 1}")
    if local_world_size is not None and local_rank >= local_world_size:
        raise LaunchError(f"{local_given} is out of range for LOCAL_WORLD_SIZE="
                          f"{local_world_size}: local ranks are 0 to {local_world_size - 1}")
    if local_rank > rank:
        raise LaunchError(f"{local_given} is out of range for RANK={rank}: a process's "
                          f"rank on its machine is at most its rank in the job")
    if world_size == 1:
        return Launch(rank, world_size, local_rank)
    address = environ.get('MASTER_ADDR', '')
    if not address:
        raise LaunchError(f"WORLD_SIZE={world_size} needs MASTER_ADDR, the address of process 0's "
                          f"machine ({LAUNCHERS})")
    port = integer('MASTER_PORT', 1)
    if port is None:
        raise LaunchError(f"WORLD_SIZE={world_size} needs MASTER_PORT, a free port on process 0's "
                          f"machine ({LAUNCHERS})")
    if port > 65535:
        raise LaunchError(f"MASTER_PORT={port} is out of range: ports are 1 to 65535")
    return Launch(rank, world_size, local_rank, (address, port))


@contextlib.contextmanager
def announced_wait(message: str, first_after: float, every: float = 60.0) -> Iterator[None]:
    """While the block runs: after `first_after` seconds, then every `every` seconds, print
    `message` and the seconds waited so far on stderr."""
    done = threading.Event()
    start = time.monotonic()

    def announce() -> None:
        delay = first_after
        while not done.wait(delay):
            print(f"{message} ({time.monotonic() - start:.0f} s so far)", file=sys.stderr, flush=True)
            delay = every

    thread = threading.Thread(target=announce, name='wait-notice', daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def init_distributed(local_rank_arg: Optional[int], device_kind: str = 'auto') -> DistContext:
    """Join the process group the launcher describes (`read_launch`) and start the `PeerWatch`.

    `python main.py` without those variables is a single process and creates no group; every
    helper below then acts locally. The backend is NCCL on CUDA and gloo on CPU. A process still
    waiting for the others after a few seconds says so, and for what, on stderr.
    """
    global _watch
    launch = read_launch(os.environ, local_rank_arg)
    rank, world_size, local_rank = launch.rank, launch.world_size, launch.local_rank
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
        address, port = launch.master
        waiting = (f"warning: process {rank} of {world_size} is waiting for the other processes of "
                   f"its job at {address}:{port} (MASTER_ADDR:MASTER_PORT, where process 0 listens; "
                   f"every process needs the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE); it gives "
                   f"up after {RENDEZVOUS_TIMEOUT}")
        try:
            with announced_wait(waiting, RENDEZVOUS_NOTICE_SECONDS):
                dist.init_process_group(
                    backend='nccl' if use_cuda else 'gloo', init_method='env://',
                    world_size=world_size, rank=rank, timeout=RENDEZVOUS_TIMEOUT)
        except dist.DistError as error:  # e.g. the port is taken, the address unknown
            raise LaunchError(f"process {rank} of {world_size} cannot join its job at {address}:{port}: "
                              f"{first_line(error)}") from None
        _watch = PeerWatch(dist.distributed_c10d._get_default_store(), rank, world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_processes_agree(facts: Dict[str, Any]) -> None:
    """Stop every process with the same `ProcessesDisagreeError` unless all processes of the
    group hold equal `facts` (one `all_gather_object`). `facts` maps what each value is (e.g.
    'the class names') to the value; the error names the first one, in their order, on which a
    process differs from process 0, and the processes that differ."""
    if not is_distributed():
        return
    gathered: List[Dict[str, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, facts)
    reference = gathered[0]
    for what in dict.fromkeys(what for held in gathered for what in held):
        differing = [rank for rank, held in enumerate(gathered) if held.get(what) != reference.get(what)]
        if differing:
            first = differing[0]
            which = f"process {first} differs" if len(differing) == 1 else \
                f"processes {', '.join(map(str, differing))} differ"
            raise ProcessesDisagreeError(
                f"the {len(gathered)} processes of this job disagree on {what}: "
                f"{difference(reference.get(what), gathered[first].get(what), first)} ({which} from "
                f"process 0); every process must read the same data with the same config and code")


def difference(reference: Any, other: Any, rank: int) -> str:
    """How `other` (process `rank`'s value) differs from process 0's `reference`: for lists,
    their first differing entry."""
    if isinstance(reference, list) and isinstance(other, list):
        for index, (mine, theirs) in enumerate(zip(reference, other)):
            if mine != theirs:
                return f"entry {index} is {mine!r} in process 0 but {theirs!r} in process {rank}"
        return f"process 0 has {len(reference)} entries, process {rank} {len(other)}"
    return f"{reference!r} in process 0 but {other!r} in process {rank}"


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
