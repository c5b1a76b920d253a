"""`RunOutputs`: what a run writes in its folder OUTPUT/MODEL.NAME/TAG (the folder lock, the
log, its config record, `metrics.jsonl`, TensorBoard scalars, checkpoints), owned by one object
that releases them on every exit path.

Only the main process writes (other ranks write their own log only); on other ranks the other
methods do nothing. A folder that cannot be created or written (a file in the way, no
permission, a read-only file system, a name too long) is a `RunFolderError` naming the path.
"""
import contextlib
import errno
import fcntl
import glob
import json
import logging
import math
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import yaml
from torch.utils.tensorboard import SummaryWriter

from checkpoint import copy_checkpoint, save_checkpoint, write_atomically
from logger import create_logger
from utils import UserError

LOCK_FILE = 'run.lock'
METRICS_FILE = 'metrics.jsonl'
# The config record of each kind of run: training's is the run's config; --eval and
# --throughput keep theirs apart from it.
CONFIG_FILES = {'train': 'config.yaml', 'eval': 'eval_config.yaml',
                'throughput': 'throughput_config.yaml'}
# Left by a write that was killed: checkpoints, config records and the rewritten metrics file
# go to `<name>.tmp.<pid>` first, then are renamed.
STALE_TEMPORARY_PATTERNS = ('*.pth.tmp.*', '*.yaml.tmp.*', f'{METRICS_FILE}.tmp.*')


class RunFolderBusyError(UserError):
    """Another process holds the lock of the run folder."""


class RunFolderError(UserError):
    """The run folder cannot be created, or a file in it cannot be written."""


def os_problem(error: OSError) -> str:
    """What an `OSError` from creating or writing a path means, in a few words."""
    path = os.fsdecode(error.filename) if error.filename is not None else ''
    if error.errno == errno.ENAMETOOLONG:
        longest = max(path.split(os.sep), key=lambda name: len(os.fsencode(name)))
        return (f"a name in it is {len(os.fsencode(longest))} bytes long, more than the file "
                f"system allows (usually 255)")
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        blocking = path
        while os.path.dirname(blocking) != blocking and not os.path.isfile(blocking):
            blocking = os.path.dirname(blocking)
        return f"{blocking if os.path.isfile(blocking) else path} is a file, not a folder"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if error.errno == errno.EROFS:
        return "the file system is read-only"
    return error.strerror or str(error)


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, so that it serialises as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def metrics_lines(path: str) -> List[Tuple[str, Any]]:
    """(line, record) of each line of the `metrics.jsonl` at `path` (none when it does not
    exist), each line ending in a newline; the record is None for a line cut short by a kill.
    The one reader of the file: the run itself and the scripts read it through here."""
    if not os.path.isfile(path):
        return []
    parsed = []
    with open(path) as f:
        for line in f:
            line = line if line.endswith('\n') else line + '\n'
            try:
                parsed.append((line, json.loads(line)))
            except json.JSONDecodeError:
                parsed.append((line, None))
    return parsed


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of the `metrics.jsonl` at `path`, without lines cut short by a kill."""
    return [record for _, record in metrics_lines(path) if isinstance(record, dict)]


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
            try:
                os.makedirs(folder, exist_ok=True)
                self._lock()
            except OSError as error:
                raise RunFolderError(f"cannot create the run folder {folder}: "
                                     f"{os_problem(error)}; choose another --output or --tag") from None

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

    @contextlib.contextmanager
    def _writing(self, path: str) -> Iterator[None]:
        """Turn an `OSError` of a write in the folder into a `RunFolderError`."""
        try:
            yield
        except OSError as error:
            raise RunFolderError(
                f"cannot write {path}: {os_problem(error)}; the files written before are intact: "
                f"make {self.folder} writable and rerun (a training run resumes)") from None

    def create_logger(self, rank: int) -> logging.Logger:
        """The run's logger (`logger.create_logger`), writing `log_rank<rank>.txt` here."""
        with self._writing(os.path.join(self.folder, f'log_rank{rank}.txt')):
            return create_logger(self.folder, rank)

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
            with self._writing(self.folder):
                self._tb_writer = SummaryWriter(self.folder)
        return self._tb_writer

    def add_scalars(self, scalars: Dict[str, float], step: int) -> None:
        if self.is_main:
            with self._writing(self.folder):
                for name, value in scalars.items():
                    self.tb_writer.add_scalar(name, value, step)
                self.tb_writer.flush()

    def write_config(self, kind: str, config: Dict[str, Any], derived: Dict[str, Any]) -> None:
        """The config record of a run of `kind` ('train', 'eval' or 'throughput', see
        `CONFIG_FILES`): `config` as YAML, loadable with --cfg, then the values the run
        derived from it (`derived`) as comments, which --cfg does not read."""
        if not self.is_main:
            return
        text = yaml.safe_dump(config, sort_keys=False)
        text += ('# Derived by the run from the values above, which it left as they are: '
                 'a run from this file\n# derives them again.\n')
        text += ''.join(f'#   {key}: {value}\n' for key, value in derived.items())
        path = os.path.join(self.folder, CONFIG_FILES[kind])
        with self._writing(path):
            write_atomically(path, lambda f: f.write(text.encode()))

    def append_metrics(self, record: Dict[str, Any]) -> None:
        """One line of strict JSON (NaN and infinities become null) in `metrics.jsonl`."""
        if self.is_main:
            with self._writing(self.metrics_path), open(self.metrics_path, 'a') as f:
                f.write(json.dumps(json_safe(record), allow_nan=False) + '\n')

    @staticmethod
    def _training_epoch(record: Any) -> Optional[int]:
        """The epoch of a training record (an epoch's line), None for other records
        (evaluations, throughput)."""
        epoch = record.get('epoch') if isinstance(record, dict) and 'train_loss' in record else None
        return epoch if isinstance(epoch, int) else None

    def training_record_epochs(self) -> List[int]:
        """The epochs that `metrics.jsonl` holds training records of (read on every rank)."""
        epochs = (self._training_epoch(record) for _, record in metrics_lines(self.metrics_path))
        return sorted(epoch for epoch in epochs if epoch is not None)

    def drop_training_metrics_from(self, epoch: int) -> List[int]:
        """Remove the training records of `epoch` and later epochs, which a resumed run trains
        again (they were written before a checkpoint that the run did not live to save), and
        lines cut short by a kill; returns the epochs removed. The file is rewritten through a
        rename, like a checkpoint."""
        if not self.is_main:
            return []
        kept, dropped = [], []
        for line, record in metrics_lines(self.metrics_path):
            line_epoch = self._training_epoch(record)
            if line_epoch is not None and line_epoch >= epoch:
                dropped.append(line_epoch)
            elif record is not None:
                kept.append(line)
        if dropped:
            with self._writing(self.metrics_path):
                write_atomically(self.metrics_path, lambda f: f.write(''.join(kept).encode()))
        return dropped

    def save_checkpoint(self, state: Dict[str, Any], name: str) -> Optional[str]:
        """Save `state` as `name` in the folder (main process only); returns its path."""
        if not self.is_main:
            return None
        path = os.path.join(self.folder, name)
        with self._writing(path):
            save_checkpoint(state, path)
        return path

    def copy_checkpoint(self, source: str, name: str) -> Optional[str]:
        """Copy the checkpoint file `source` to `name` in the folder (main process only)."""
        if not self.is_main:
            return None
        path = os.path.join(self.folder, name)
        with self._writing(path):
            copy_checkpoint(source, path)
        return path
