"""Small helpers shared by the training code: the user-error type, seeding, the code version and
the run folder."""
import hashlib
import os
import random
import subprocess
from typing import Optional

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, command line).

    `main.py` prints its message as one line on stderr and exits with status 1, without a
    traceback; anything else is a bug and keeps its traceback.
    """


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices); callers add their rank so that processes
    draw different augmentations."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def code_version() -> Optional[str]:
    """The git commit of this checkout, with a hash of its uncommitted changes to tracked files
    if it has any ('<commit>+<hash>'); None where git or the repository is missing."""
    def git(*args: str) -> Optional[str]:
        try:
            result = subprocess.run(['git', *args], cwd=os.path.dirname(os.path.abspath(__file__)),
                                    capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.decode(errors='replace') if result.returncode == 0 else None

    commit, changes = git('rev-parse', 'HEAD'), git('diff', 'HEAD')
    if not commit:
        return None
    return commit.strip() + (f'+{hashlib.sha256(changes.encode()).hexdigest()[:12]}' if changes else '')


def run_folder(config) -> str:
    """Where a run's checkpoints, logs and metrics go: OUTPUT/MODEL.NAME/TAG of a config."""
    return os.path.join(config.OUTPUT or 'output', config.MODEL.NAME, config.TAG)
