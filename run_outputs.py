"""`RunOutputs`: what a run writes in its folder OUTPUT/MODEL.NAME/TAG (the folder lock,
`metrics.jsonl`, TensorBoard scalars, checkpoints), owned by one object that releases them on
every exit path.

Only the main process writes; on other ranks every method does nothing.
"""
import errno
import fcntl
import glob
import json
import math
import os
from typing import Any, Dict, List, Optional

from torch.utils.tensorboard import SummaryWriter

from checkpoint import save_checkpoint
from utils import UserError

LOCK_FILE = 'run.lock'
METRICS_FILE = 'metrics.jsonl'
# Left by a write that was killed: checkpoints and the rewritten metrics file go to
# `<name>.tmp.<pid>` first, then are renamed.
STALE_TEMPORARY_PATTERNS = ('*.pth.tmp.*', f'{METRICS_FILE}.tmp.*')


class RunFolderBusyError(UserError):
    """Another process holds the lock of the run folder."""


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, so that it serialises as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


class RunOutputs:
    """The run folder of one run, locked against a second run for as long as this object is
    open. The lock is an `fcntl.flock` on `run.lock` (which holds the owner's pid), so the
    operating system releases it when the process dies, however it dies."""

    def __init__(self, folder: str, is_main: bool) -> None:
        self.folder = folder
        self.is_main = is_main
        self.metrics_path = os.path.join(folder, METRICS_FILE)
        self._lock_file = None
        self._tb_writer: Optional[SummaryWriter] = None
        if is_main:
            os.makedirs(folder, exist_ok=True)
            self._lock()

    def _lock(self) -> None:
        lock_file = open(os.path.join(self.folder, LOCK_FILE), 'a+')
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                lock_file.close()
                raise
            lock_file.seek(0)
            owner = lock_file.read().strip() or 'unknown'
            lock_file.close()
            raise RunFolderBusyError(
                f"run folder {self.folder} is in use by process {owner}: wait for that run to "
                f"end, or start this one with another --tag") from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f'{os.getpid()}\n')
        lock_file.flush()
        self._lock_file = lock_file

    def close(self) -> None:
        """Close the TensorBoard writer and release the lock (idempotent)."""
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file releases the flock
            self._lock_file = None

    def __enter__(self) -> 'RunOutputs':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def remove_stale_temporary_files(self) -> List[str]:
        """Delete the partial files of earlier runs that were killed while saving (safe: the
        lock says no other run writes here); returns their paths."""
        if not self.is_main:
            return []
        stale = sorted(path for pattern in STALE_TEMPORARY_PATTERNS
                       for path in glob.glob(os.path.join(glob.escape(self.folder), pattern)))
        for path in stale:
            os.remove(path)
        return stale

    @property
    def tb_writer(self) -> Optional[SummaryWriter]:
        """The TensorBoard writer of the folder, opened on first use; None on other ranks."""
        if self.is_main and self._tb_writer is None:
            self._tb_writer = SummaryWriter(self.folder)
        return self._tb_writer

    def add_scalars(self, scalars: Dict[str, float], step: int) -> None:
        if self.is_main:
            for name, value in scalars.items():
                self.tb_writer.add_scalar(name, value, step)
            self.tb_writer.flush()

    def append_metrics(self, record: Dict[str, Any]) -> None:
        """One line of strict JSON (NaN and infinities become null) in `metrics.jsonl`."""
        if self.is_main:
            with open(self.metrics_path, 'a') as f:
                f.write(json.dumps(json_safe(record), allow_nan=False) + '\n')

    def drop_training_metrics_from(self, epoch: int) -> List[int]:
        """Remove the training records of `epoch` and later epochs, which a resumed run trains
        again (they were written before a checkpoint that the run did not live to save);
        returns their epochs. The file is rewritten through a rename, like a checkpoint."""
        if not self.is_main or not os.path.isfile(self.metrics_path):
            return []
        kept, dropped = [], []
        with open(self.metrics_path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if 'train_loss' in record and isinstance(record.get('epoch'), int) \
                        and record['epoch'] >= epoch:
                    dropped.append(record['epoch'])
                else:
                    kept.append(line if line.endswith('\n') else line + '\n')
        if dropped:
            tmp_path = f'{self.metrics_path}.tmp.{os.getpid()}'
            with open(tmp_path, 'w') as f:
                f.writelines(kept)
            os.replace(tmp_path, self.metrics_path)
        return dropped

    def save_checkpoint(self, state: Dict[str, Any], name: str) -> Optional[str]:
        """Save `state` as `name` in the folder (main process only); returns its path."""
        if not self.is_main:
            return None
        path = os.path.join(self.folder, name)
        save_checkpoint(state, path)
        return path
