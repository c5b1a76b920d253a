#!/usr/bin/env bash
# Table 2, Focal-Tiny: train with the paper recipe (300 epochs), evaluate, measure throughput.
# Environment: NPROC, BATCH, DATA, OUTPUT, TAG, DRY_RUN (see common.sh); extra args go to main.py.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
train_and_eval configs/focal_tiny.yaml "$@"
