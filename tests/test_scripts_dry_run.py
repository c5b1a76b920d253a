"""Every reproduction script's DRY_RUN=1 commands are runs main.py accepts: its arguments parse, and
the config they make (file, --opts and flags together) loads and validates."""
import os

import pytest

import main
from config import get_config
from conftest import REPO_ROOT, REPRODUCTION_SCRIPTS, dry_run_commands, main_arguments

# What a script may print besides main.py runs: eval_released.sh downloads the released checkpoints.
OTHER_COMMANDS = {'download'}


def parsed_config(arguments):
    """main.py's config for `arguments`; a bad flag fails the test with argparse's message."""
    try:
        args = main.parse_args(arguments)
    except SystemExit:
        pytest.fail(f"main.py rejects the arguments {arguments}")
    return get_config(args)


@pytest.mark.parametrize('script', REPRODUCTION_SCRIPTS)
def test_dry_run_commands_are_valid_main_runs(script, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # where the scripts run main.py from
    commands = dry_run_commands(script, DATA='/data/imagenet',
                                CKPT_DIR=os.path.join(REPO_ROOT, '.cache', 'no_checkpoints_here'))
    runs = [main_arguments(command) for command in commands]
    assert any(runs), f"{script} prints no main.py run"
    for command, arguments in zip(commands, runs):
        if arguments is None:
            assert command[0] in OTHER_COMMANDS, f"{script} prints {command}, which runs neither main.py nor a download"
            continue
        config = parsed_config(arguments)
        assert config.EVAL_MODE == ('--eval' in arguments)
        assert not config.EVAL_MODE or config.MODEL.RESUME, f"{script}: --eval without --resume in {command}"
        assert config.DATA.DATA_PATH == '/data/imagenet'  # the script's DATA reaches main.py
