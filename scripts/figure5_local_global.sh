#!/usr/bin/env bash
# Figure 5: Focal-T with local attention only, global attention only, and both.
# Rows shared with Table 2 reuse its run folders. Environment: see common.sh; extra args go to main.py.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
for config in \
    configs/ablations/focal_tiny_local_only.yaml \
    configs/ablations/focal_tiny_global_only.yaml \
    configs/focal_tiny.yaml \
; do
    train_and_eval "$config" "$@"
done
