"""Print the size and cost of the Focal-T/S/B dense-prediction backbones (all four stage maps with
their norms, no neck or head) at a detection input size, 1280x800 by default.

GFLOPs are multiply-adds counted on the executed graph at batch 1 (models/complexity.py).

    python scripts/backbone_stats.py [--variants focal_tiny focal_small focal_base] [--size 800 1280]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.complexity import count_gflops, count_params_m  # noqa: E402
from models.focal_backbone import BACKBONE_VARIANTS, focal_backbone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variants', nargs='+', default=list(BACKBONE_VARIANTS), choices=sorted(BACKBONE_VARIANTS))
    parser.add_argument('--size', type=int, nargs=2, default=(800, 1280), metavar=('HEIGHT', 'WIDTH'))
    parser.add_argument('--use-conv-embed', action='store_true', help='the overlapping-patch-embedding variants')
    args = parser.parse_args()
    height, width = args.size
    for variant in args.variants:
        backbone = focal_backbone(variant, use_conv_embed=args.use_conv_embed)
        print(f'{variant} backbone {width}x{height}: params_m={count_params_m(backbone):.2f} '
              f'gflops={count_gflops(backbone, (height, width)):.2f}', flush=True)


if __name__ == '__main__':
    main()
