"""`create_logger(output_dir, rank)`: coloured console output and a plain log file per run."""
import logging
import os
import sys

from termcolor import colored

LOGGER_NAME = 'focal'


# Library loggers whose messages belong in the run's log (e.g. the checkpoint filter's notes).
ATTACHED_LOGGERS = ('models',)


def create_logger(output_dir: str, rank: int = 0, name: str = LOGGER_NAME) -> logging.Logger:
    """The run's logger. Rank 0 logs INFO to the console and to `<output_dir>/log_rank0.txt`;
    other ranks log only warnings, to the console and their own file, so that a problem on any
    rank is visible. The `models` package logs through the same handlers. Calling it again
    replaces the handlers (tests run several runs in one process)."""
    logger = logging.getLogger(name)
    attached = [logging.getLogger(library) for library in ATTACHED_LOGGERS]
    logger.propagate = False
    for each in [logger] + attached:
        each.setLevel(logging.INFO)
        for handler in list(each.handlers):
            handler.close()
            each.removeHandler(handler)

    plain = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
    colour = colored('[%(asctime)s %(name)s]', 'green') + \
        colored('(%(filename)s %(lineno)d)', 'yellow') + ': %(levelname)s %(message)s'
    level = logging.INFO if rank == 0 else logging.WARNING

    console = logging.StreamHandler(sys.stdout)
    console.setLevel(level)
    console.setFormatter(logging.Formatter(colour if sys.stdout.isatty() else plain,
                                           datefmt='%Y-%m-%d %H:%M:%S'))

    os.makedirs(output_dir, exist_ok=True)
    log_file = logging.FileHandler(os.path.join(output_dir, f'log_rank{rank}.txt'), mode='a')
    log_file.setLevel(level)
    log_file.setFormatter(logging.Formatter(plain, datefmt='%Y-%m-%d %H:%M:%S'))
    for each in [logger] + attached:
        each.addHandler(console)
        each.addHandler(log_file)
    return logger
