#!/usr/bin/env bash
# Every GPU check and timing of the fused focal attention; the table it prints last says what ran
# and how to read it (scripts/gpu_checks.py; docs/benchmarks.md, "GPU checks"):
#   scripts/gpu_checks.sh correctness speed backbone   # the device tool's first call: about 4 minutes
#   scripts/gpu_checks.sh compiled                     # its second call: about 3 minutes
#   scripts/gpu_checks.sh all --dry-run                # CPU: tiny models, fused kernels interpreted
# The table, a log and the numbers go to $OUT (default gpu_checks/), rewritten after every row.
# Python packages the GPU machine lacks or has in another version (yacs, termcolor, the pinned timm)
# travel as wheels in .whl/ and are installed to $SITE (default /tmp/site), ahead of the machine's.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if compgen -G '.whl/*.whl' > /dev/null; then
  site=${SITE:-/tmp/site}
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "error: could not install the wheels in .whl/ (see docs/benchmarks.md, GPU checks)" >&2; exit 1; }
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$python" scripts/gpu_checks.py "$@"
