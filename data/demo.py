"""The built-in demo dataset: ten classes of procedurally drawn shapes and patterns.

Each image has random colours, position, size and pixel noise, so the class is carried only by
the shape, which a small model learns in a few epochs on a CPU. It is written once as an
ImageFolder tree (`train/<class>/*.png`, `val/<class>/*.png`) and reused by later runs.
"""
import fcntl
import os
import shutil
import tempfile
from typing import Callable, Dict

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 1
COMPLETE_MARKER = '.complete'
NOISE_STD = 12.0


def _contrasting_colours(rng: np.random.Generator):
    """A foreground and a background colour whose brightness differs by at least 80/255."""
    while True:
        foreground, background = rng.integers(0, 256, size=(2, 3))
        if abs(int(foreground.mean()) - int(background.mean())) >= 80:
            return tuple(int(c) for c in foreground), tuple(int(c) for c in background)


def _box(rng: np.random.Generator, size: int):
    """A random square box covering 40-75% of the image side."""
    side = rng.uniform(0.4, 0.75) * size
    x0, y0 = rng.uniform(0, size - side, size=2)
    return x0, y0, x0 + side, y0 + side


def _circle(draw, rng, size, colour):
    draw.ellipse(_box(rng, size), fill=colour)


def _ring(draw, rng, size, colour):
    box = _box(rng, size)
    draw.ellipse(box, outline=colour, width=max(2, int((box[2] - box[0]) * 0.15)))


def _square(draw, rng, size, colour):
    draw.rectangle(_box(rng, size), fill=colour)


def _triangle(draw, rng, size, colour):
    x0, y0, x1, y1 = _box(rng, size)
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _cross(draw, rng, size, colour):
    x0, y0, x1, y1 = _box(rng, size)
    arm = (x1 - x0) * 0.15
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    draw.rectangle((cx - arm, y0, cx + arm, y1), fill=colour)
    draw.rectangle((x0, cy - arm, x1, cy + arm), fill=colour)


def _stripes(horizontal: bool) -> Callable:
    def draw_stripes(draw, rng, size, colour):
        period = int(rng.integers(max(4, size // 8), max(5, size // 4)))
        offset = int(rng.integers(0, period))
        for start in range(-period + offset, size, period):
            band = (0, start, size, start + period // 2) if horizontal else \
                (start, 0, start + period // 2, size)
            draw.rectangle(band, fill=colour)
    return draw_stripes


def _checkerboard(draw, rng, size, colour):
    cell = int(rng.integers(max(3, size // 10), max(4, size // 5)))
    for row in range(0, size, cell):
        for col in range(0, size, cell):
            if (row // cell + col // cell) % 2 == 0:
                draw.rectangle((col, row, col + cell - 1, row + cell - 1), fill=colour)


def _dots(draw, rng, size, colour):
    spacing = int(rng.integers(max(5, size // 7), max(6, size // 4)))
    radius = spacing * 0.25
    for cy in range(spacing // 2, size, spacing):
        for cx in range(spacing // 2, size, spacing):
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)


def _gradient(draw, rng, size, colour):
    angle = rng.uniform(0, 2 * np.pi)
    for step in range(size):
        t = step / (size - 1)
        shade = tuple(int(c * t) for c in colour)
        if abs(np.cos(angle)) > abs(np.sin(angle)):
            draw.line((step, 0, step, size), fill=shade)
        else:
            draw.line((0, step, size, step), fill=shade)


CLASSES: Dict[str, Callable] = {
    'checkerboard': _checkerboard,
    'circle': _circle,
    'cross': _cross,
    'dots': _dots,
    'gradient': _gradient,
    'horizontal_stripes': _stripes(horizontal=True),
    'ring': _ring,
    'square': _square,
    'triangle': _triangle,
    'vertical_stripes': _stripes(horizontal=False),
}


def draw_image(class_name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One `size` x `size` RGB image of `class_name`."""
    foreground, background = _contrasting_colours(rng)
    image = Image.new('RGB', (size, size), background)
    CLASSES[class_name](ImageDraw.Draw(image), rng, size, foreground)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, NOISE_STD, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def demo_dataset_dir(cache_root: str, image_size: int, train_per_class: int,
                     val_per_class: int) -> str:
    """The folder for one set of generation parameters: changing them makes a new dataset."""
    name = f'shapes-v{FORMAT_VERSION}-{image_size}px-{train_per_class}-{val_per_class}'
    return os.path.join(cache_root, name)


def write_demo_dataset(root: str, image_size: int, train_per_class: int,
                       val_per_class: int, seed: int = 0) -> bool:
    """Write the dataset to `root` unless a complete copy is there; True if this call drew it.

    Runs that start together (processes of one job, or separate runs sharing the cache) may all
    ask for it: one draws it while holding a lock on `.<name>.lock` beside it, and the others
    wait for the lock and then find it complete. It is drawn in a temporary sibling folder and
    renamed into place with its completion marker, so `root` is either absent or complete, and
    a complete copy, which other runs may be reading, is never deleted or replaced.
    """
    if is_complete(root):
        return False
    parent, name = os.path.split(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, f'.{name}.lock'), 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if is_complete(root):
            return False
        if os.path.exists(root):  # incomplete, so never published: no run reads it
            shutil.rmtree(root)
        staging = tempfile.mkdtemp(prefix=f'.{name}-', dir=parent)
        try:
            draw_dataset(staging, image_size, train_per_class, val_per_class, seed)
            os.replace(staging, root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return True


def is_complete(root: str) -> bool:
    return os.path.exists(os.path.join(root, COMPLETE_MARKER))


def draw_dataset(folder: str, image_size: int, train_per_class: int, val_per_class: int,
                 seed: int) -> None:
    """`train/<class>/*.png` and `val/<class>/*.png` in `folder`, then the completion marker."""
    rng = np.random.default_rng(seed)
    for split, per_class in (('train', train_per_class), ('val', val_per_class)):
        for class_name in CLASSES:
            class_folder = os.path.join(folder, split, class_name)
            os.makedirs(class_folder)
            for index in range(per_class):
                draw_image(class_name, image_size, rng).save(
                    os.path.join(class_folder, f'{class_name}_{index:05d}.png'))
    open(os.path.join(folder, COMPLETE_MARKER), 'w').close()
