#!/usr/bin/env bash
# Evaluate the nine released ImageNet-1K checkpoints (downloaded once into CKPT_DIR) and measure
# their throughput; results go to OUTPUT/<MODEL.NAME>/released/metrics.jsonl. The official README
# reports top-1 82.2 / 83.6 / 84.0 (Focal-T/S/B), 82.7 / 83.8 / 84.2 (the same with the
# convolutional embedding, useconv) and 82.4 / 83.6 / 84.0 (Focal-fast-T/S/B).
# Environment: CKPT_DIR (default .cache/checkpoints), NPROC, BATCH, DATA, OUTPUT, DRY_RUN (see common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CKPT_DIR="${CKPT_DIR:-.cache/checkpoints}"
URL_ROOT=https://projects4jw.blob.core.windows.net/model/focal-transformer/imagenet1k
require_data

# download URL FILE: fetch URL into FILE's folder under a temporary name, then rename it to FILE,
# so that FILE is absent or complete: an interrupted download leaves nothing a later run would
# take for the checkpoint, and scripts downloading at once never read each other's partial file.
download() {
    mkdir -p "$(dirname "$2")"
    curl -fL -o "$2.part.$$" "$1" || { rm -f "$2.part.$$"; return 1; }
    mv -f "$2.part.$$" "$2"
}

for entry in focal_tiny:focal-tiny-is224-ws7.pth focal_small:focal-small-is224-ws7.pth \
             focal_base:focal-base-is224-ws7.pth \
             focal_tiny_useconv:focal-tiny-useconv-is224-ws7.pth \
             focal_small_useconv:focal-small-useconv-is224-ws7.pth \
             focal_base_useconv:focal-base-useconv-is224-ws7.pth \
             focalv2_tiny_useconv:focalv2-tiny-useconv-is224-ws7.pth \
             focalv2_small_useconv:focalv2-small-useconv-is224-ws7.pth \
             focalv2_base_useconv:focalv2-base-useconv-is224-ws7.pth; do
    config="configs/${entry%%:*}.yaml"
    checkpoint="$CKPT_DIR/${entry#*:}"
    if [[ ! -f "$checkpoint" ]]; then
        run download "$URL_ROOT/${entry#*:}" "$checkpoint"
    fi
    args=(--cfg "$config" --data-path "$DATA" --output "$OUTPUT" --tag released)
    run torchrun --standalone --nproc_per_node="$NPROC" main.py "${args[@]}" --batch-size "$BATCH" \
        --eval --resume "$checkpoint" "$@"
    run "$PYTHON" main.py "${args[@]}" --batch-size "$THROUGHPUT_BATCH" --throughput "$@"
done
