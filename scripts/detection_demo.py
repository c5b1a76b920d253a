"""Focal-T + FPN inside torchvision's RetinaNet and Mask R-CNN: one training step and one inference
pass on a generated COCO-style batch, on the CPU. Prints each detector's losses and the shapes of
its outputs.

    python scripts/detection_demo.py [--variant focal_tiny] [--size 384 512] [--batch-size 2]
        [--checkpoint focal-tiny-is224-ws7.pth] [--frozen-stages 1] [--grad-checkpointing]
"""
import argparse
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torchvision.models.detection import MaskRCNN, RetinaNet

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import read_checkpoint  # noqa: E402
from models.focal_backbone import BACKBONE_VARIANTS  # noqa: E402
from models.focal_fpn import focal_fpn_backbone  # noqa: E402

Target = Dict[str, torch.Tensor]


def make_batch(batch_size: int, height: int, width: int, num_classes: int, seed: int = 0,
               max_objects: int = 3) -> Tuple[List[torch.Tensor], List[Target]]:
    """Images in [0, 1] of coloured rectangles on noise, and COCO-style targets as torchvision's
    detectors take them: boxes (N, 4) xyxy float, labels (N,) in 1..num_classes-1, masks (N, H, W) uint8."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch_size):
        image = torch.rand(3, height, width, generator=generator) * 0.2
        count = int(torch.randint(1, max_objects + 1, (1,), generator=generator))
        boxes, masks = [], []
        for _ in range(count):
            box_h = int(torch.randint(height // 8, height // 2, (1,), generator=generator))
            box_w = int(torch.randint(width // 8, width // 2, (1,), generator=generator))
            top = int(torch.randint(0, height - box_h, (1,), generator=generator))
            left = int(torch.randint(0, width - box_w, (1,), generator=generator))
            image[:, top:top + box_h, left:left + box_w] = torch.rand(3, 1, 1, generator=generator)
            mask = torch.zeros(height, width, dtype=torch.uint8)
            mask[top:top + box_h, left:left + box_w] = 1
            boxes.append([left, top, left + box_w, top + box_h])
            masks.append(mask)
        images.append(image)
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32),
                            labels=torch.randint(1, num_classes, (count,), generator=generator),
                            masks=torch.stack(masks)))
    return images, targets


def build_detectors(num_classes: int, height: int, width: int, variant: str = 'focal_tiny',
                    checkpoint: Optional[dict] = None, **backbone_kwargs) -> Dict[str, nn.Module]:
    """RetinaNet (P3-P7 from stages 1-3) and Mask R-CNN (P2-P6 from stages 0-3) on Focal + FPN, with
    the input transform set to keep (height, width) images at their size; backbone weights from the
    dict of a checkpoint file when given."""
    size = dict(min_size=min(height, width), max_size=max(height, width))
    retina_fpn = focal_fpn_backbone(variant, checkpoint, out_indices=(1, 2, 3), extra='p6p7', **backbone_kwargs)
    mask_fpn = focal_fpn_backbone(variant, checkpoint, out_indices=(0, 1, 2, 3), extra='maxpool', **backbone_kwargs)
    return {'retinanet': RetinaNet(retina_fpn, num_classes, **size),
            'mask_rcnn': MaskRCNN(mask_fpn, num_classes, **size)}


def train_step(model: nn.Module, images: List[torch.Tensor], targets: List[Target],
               lr: float = 1e-4) -> Dict[str, float]:
    """One AdamW step on the summed detection losses; returns each loss. Gradients stay in `.grad`."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    optimizer.zero_grad()
    losses = model(images, targets)
    sum(losses.values()).backward()
    optimizer.step()
    return {name: loss.item() for name, loss in losses.items()}


@torch.no_grad()
def predict(model: nn.Module, images: List[torch.Tensor]) -> List[Target]:
    model.eval()
    return model(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variant', default='focal_tiny', choices=sorted(BACKBONE_VARIANTS))
    parser.add_argument('--size', type=int, nargs=2, default=(384, 512), metavar=('HEIGHT', 'WIDTH'))
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--num-classes', type=int, default=5, help='including the background class')
    parser.add_argument('--checkpoint', help='ImageNet classification (or mmdetection) checkpoint for the backbone')
    parser.add_argument('--frozen-stages', type=int, default=-1)
    parser.add_argument('--grad-checkpointing', action='store_true')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    torch.manual_seed(args.seed)

    height, width = args.size
    images, targets = make_batch(args.batch_size, height, width, args.num_classes, args.seed)
    checkpoint = read_checkpoint(args.checkpoint) if args.checkpoint else None
    detectors = build_detectors(args.num_classes, height, width, args.variant, checkpoint,
                                frozen_stages=args.frozen_stages, use_checkpoint=args.grad_checkpointing)
    for name, model in detectors.items():
        start = time.perf_counter()
        losses = train_step(model, images, targets)
        trained = time.perf_counter()
        detections = predict(model, images)
        print(f'{name}: train step {trained - start:.1f}s, inference {time.perf_counter() - trained:.1f}s')
        print('  losses: ' + ', '.join(f'{k}={v:.4f}' for k, v in losses.items()))
        for i, output in enumerate(detections):
            print(f'  image {i}: ' + ', '.join(f'{k} {tuple(v.shape)}' for k, v in output.items()))


if __name__ == '__main__':
    main()
