# Shared settings of the reproduction scripts; they source this file.
#
# Environment (all optional):
#   NPROC     GPUs on this node (default 8)
#   BATCH     images per GPU (default 128; main.py scales the learning rate with NPROC*BATCH/512)
#   DATA      ImageNet root with train/ and val/ (default /path/to/imagenet)
#   OUTPUT    root of the run folders OUTPUT/<MODEL.NAME>/<TAG> (default output)
#   TAG       run tag (default default)
#   PYTHON    interpreter for single-process steps (default python)
#   DRY_RUN   1: print the commands without running them
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

NPROC="${NPROC:-8}"
BATCH="${BATCH:-128}"
DATA="${DATA:-/path/to/imagenet}"
OUTPUT="${OUTPUT:-output}"
TAG="${TAG:-default}"
PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-0}"
# Throughput is measured on one GPU at batch 64, as Swin and Focal report it.
THROUGHPUT_BATCH="${THROUGHPUT_BATCH:-64}"

# Print a command (shell-quoted, prefixed with '+'); run it unless DRY_RUN=1.
run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ "$DRY_RUN" != 1 ]]; then
        "$@"
    fi
}

require_data() {
    if [[ "$DRY_RUN" != 1 && ! -d "$DATA" ]]; then
        echo "error: DATA=$DATA is not a directory; set DATA to the ImageNet root (train/ and val/)" >&2
        exit 1
    fi
}

# newest_checkpoint [main.py args...]: the newest checkpoint in the run folder those args name.
newest_checkpoint() {
    "$PYTHON" -c '
import sys
from checkpoint import latest_checkpoint
from config import get_config
from main import parse_args
from utils import run_folder
print(latest_checkpoint(run_folder(get_config(parse_args(sys.argv[1:])))) or "")' "$@"
}

# train_and_eval CONFIG [main.py args...]: train CONFIG with the paper recipe on NPROC GPUs,
# evaluate its newest (final) checkpoint, then measure throughput on one GPU. Each step appends
# to OUTPUT/<MODEL.NAME>/<TAG>/metrics.jsonl. A finished run resumes at its last epoch, so a
# config that appears in several tables is trained once; later calls only repeat the evaluation.
train_and_eval() {
    local config="$1"
    shift
    require_data
    local args=(--cfg "$config" --data-path "$DATA" --output "$OUTPUT" --tag "$TAG")
    run torchrun --standalone --nproc_per_node="$NPROC" main.py "${args[@]}" --batch-size "$BATCH" "$@"
    local checkpoint="$OUTPUT/MODEL.NAME/$TAG/NEWEST_CHECKPOINT.pth"  # known once training has run
    if [[ "$DRY_RUN" != 1 ]]; then
        checkpoint="$(newest_checkpoint "${args[@]}" "$@")"
    fi
    run torchrun --standalone --nproc_per_node="$NPROC" main.py "${args[@]}" --batch-size "$BATCH" \
        --eval --resume "$checkpoint" "$@"
    run "$PYTHON" main.py "${args[@]}" --batch-size "$THROUGHPUT_BATCH" --throughput "$@"
}

# run_scripts SCRIPT...: run other reproduction scripts in order with the same environment.
run_scripts() {
    local script
    for script in "$@"; do
        echo "== $script"
        bash "$REPO_ROOT/scripts/$script"
    done
}
