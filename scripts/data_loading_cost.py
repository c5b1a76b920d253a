"""CPU cost of the data pipeline on one core: JPEG decoding alone, decoding + the training
transform of a config (the paper's recipe by default), decoding + its evaluation transform, and
the loading cores a GPU needs at a given training speed. Prints a Markdown table.

    python scripts/data_loading_cost.py                                  # a generated 500x375 JPEG
    python scripts/data_loading_cost.py --images /data/imagenet/train/n01440764
    python scripts/data_loading_cost.py --cfg configs/baselines/vit_base_384.yaml --gpu-images-per-s 800

Each measurement runs in this process pinned to one core with one PyTorch thread, as a DataLoader
worker runs, counts CPU time (not the time other processes hold the core) and reports the median
of --rounds rounds; on a shared machine the spread still shows some noise (caches, memory).
"""
import argparse
import io
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable, List

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, features

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

from config import load_config  # noqa: E402
from data.images import IMG_EXTENSIONS  # noqa: E402
from data.transforms import build_transform  # noqa: E402


def photo_like_jpeg(width: int = 500, height: int = 375, quality: int = 90) -> bytes:
    """A JPEG of ImageNet's typical size (500x375) and byte count (about 100 KB at quality 90, near ImageNet's average):
    smooth colour gradients and shapes under fine noise, which compress like a photograph rather
    than like pure noise (far larger) or flat colour (far smaller)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [127 + 80 * np.sin(x / (20 + 15 * c) + y / (35 + 10 * c) + c) for c in range(3)]
    image = np.stack(channels, axis=-1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 80)
        image[(x - cx) ** 2 + (y - cy) ** 2 < r ** 2] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 20, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, 'JPEG', quality=quality)
    return buffer.getvalue()


def read_images(paths: List[str]) -> List[bytes]:
    """The encoded bytes of the image files in `paths` (files, or folders searched recursively)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(folder, name) for folder, _, names in os.walk(path)
                            for name in names if name.lower().endswith(IMG_EXTENSIONS))
        else:
            files.append(path)
    if not files:
        sys.exit(f"error: no images found in {' '.join(paths)}")
    encoded = []
    for file in files:
        with open(file, 'rb') as f:
            encoded.append(f.read())
    return encoded


def decode(encoded: bytes) -> Image.Image:
    """What ImageDataset does with an image's bytes."""
    with Image.open(io.BytesIO(encoded)) as image:
        return image.convert('RGB')


def images_per_s(work: Callable[[bytes], object], encoded: List[bytes], seconds: float, rounds: int) -> List[float]:
    """Images per CPU second of `work` over `rounds` rounds of about `seconds` of CPU time each.
    CPU time (of this one-threaded process) is what a loader worker costs a core; unlike wall
    time it does not count the time other processes of a shared machine hold the core."""
    rates = []
    for round_index in range(rounds):
        random.seed(round_index)
        np.random.seed(round_index)
        torch.manual_seed(round_index)
        count, start = 0, time.process_time()
        while time.process_time() - start < seconds:
            work(encoded[count % len(encoded)])
            count += 1
        rates.append(count / (time.process_time() - start))
    return rates


def pin_to_one_core() -> str:
    """Pin this process to one of the cores it may use; returns which, for the table."""
    torch.set_num_threads(1)
    if hasattr(os, 'sched_setaffinity'):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"core {core} of {os.cpu_count()}"
    return "one thread (no core pinning on this OS)"


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', default='configs/focal_tiny.yaml', help='config whose transforms to measure')
    parser.add_argument('--images', nargs='+', help='image files or folders (default: a generated 500x375 JPEG)')
    parser.add_argument('--seconds', type=float, default=2.0, help='length of one round')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--gpu-images-per-s', type=float, default=2000.0,
                        help='training speed of one GPU, for the loading cores it needs')
    args = parser.parse_args()

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(args.cfg if os.path.isfile(args.cfg) else os.path.join(repo, args.cfg))
    train, evaluate = build_transform(True, config), build_transform(False, config)
    encoded = read_images(args.images) if args.images else [photo_like_jpeg()]
    where = pin_to_one_core()
    sizes = sorted({decode(data).size for data in encoded})
    source = (f"{len(encoded)} image(s) from {' '.join(args.images)}" if args.images else "a generated JPEG")
    print(f"{source}, {sizes[0][0]}x{sizes[0][1]}{' and others' if len(sizes) > 1 else ''}, "
          f"{sum(map(len, encoded)) / len(encoded) / 1000:.0f} KB on average; {args.cfg} at "
          f"{config.DATA.IMG_SIZE} px, AUG.AUTO_AUGMENT {config.AUG.AUTO_AUGMENT}, AUG.REPROB {config.AUG.REPROB}")
    print(f"{cpu_name()}, {where}, one PyTorch thread; Pillow {PIL.__version__} "
          f"(libjpeg-turbo: {features.check_feature('libjpeg_turbo')}), torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, timm {timm.__version__}; median of {args.rounds} rounds "
          f"of {args.seconds:g} CPU s\n")

    rows = [('decode (PIL, to RGB)', decode),
            ('decode + training transform', lambda data: train(decode(data))),
            ('decode + evaluation transform', lambda data: evaluate(decode(data)))]
    print(f"| per image, one core | images per CPU s (median) | spread over rounds | CPU ms/image | cores per GPU at "
          f"{args.gpu_images_per_s:g} images/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, work in rows:
        rates = images_per_s(work, encoded, args.seconds, args.rounds)
        rate = statistics.median(rates)
        print(f"| {label} | {rate:.0f} | {min(rates):.0f}-{max(rates):.0f} | {1000 / rate:.2f} | "
              f"{args.gpu_images_per_s / rate:.1f} |")


if __name__ == '__main__':
    main()
