"""Small helpers shared by the training code: the user-error type and seeding."""
import random

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
