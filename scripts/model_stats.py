"""Print a config's model size and cost: `params_m=28.88 gflops=4.95` for configs/focal_tiny.yaml.

GFLOPs are multiply-adds counted on the executed graph at batch 1 (models/complexity.py).

    python scripts/model_stats.py --cfg configs/focal_tiny.yaml [--img-size 384] [--opts KEY VALUE ...]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import load_config  # noqa: E402
from models import build_model  # noqa: E402
from models.complexity import count_gflops, count_params_m  # noqa: E402
from utils import UserError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--cfg', required=True, help='YAML config file')
    parser.add_argument('--img-size', type=int, nargs='+', help='input size (one side, or height width); '
                        'default DATA.IMG_SIZE')
    parser.add_argument('--opts', nargs='+', default=[], help='config overrides KEY VALUE ...')
    args = parser.parse_args()
    try:
        config = load_config(args.cfg, args.opts)
    except UserError as e:
        sys.exit(f'error: {e}')
    model = build_model(config)
    size = tuple(args.img_size) if args.img_size else config.DATA.IMG_SIZE
    size = size[0] if isinstance(size, tuple) and len(size) == 1 else size
    print(f'params_m={count_params_m(model):.2f} gflops={count_gflops(model, size):.2f}')


if __name__ == '__main__':
    main()
