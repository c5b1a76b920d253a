"""Image classification datasets: the ImageNet folder layout and zipped ImageNet with map files,
with optional in-memory caching and tolerant reading of unreadable images.

A sample is `(source, class_index)` where `source` is a file path, a zip member path
(`train.zip@/n01/x.JPEG`) or, once cached, the encoded bytes themselves.

What is wrong with the dataset as a whole (a missing folder, a map file that does not match its
archive) is a `DataError` at start-up; what is wrong with one image (corrupt, unreadable, a
pixel format with no 8-bit meaning) skips that image with a warning and a count.
"""
import io
import multiprocessing
import os
import re
import sys
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from utils import UserError

from .zipreader import ZipReadError, archive_members, is_zip_path, read_zip_member

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

Source = Union[str, bytes]
Sample = Tuple[Source, int]


class DataError(UserError):
    """Missing, empty or malformed dataset."""


def folder_samples(root: str, classes: Optional[Sequence[str]] = None
                   ) -> Tuple[List[Sample], List[str]]:
    """Samples of an ImageFolder tree `root/<class>/<image>`. Class indices follow the sorted
    folder names, the order the released ImageNet checkpoints were trained with, unless
    `classes` gives the class list (the training classes, for a validation split): each folder
    name then maps onto its index there, and a folder that `classes` lacks is an error. A class
    folder without images is an error too: it would shift the indices of the others."""
    if not os.path.isdir(root):
        raise DataError(f"data folder not found: {root}")
    try:
        found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except OSError as error:
        raise DataError(f"cannot read the data folder {root}: {error.strerror}") from None
    if classes is None:
        classes = found
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise DataError(f"{root} has class folders that the training classes lack: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
                        f"({len(classes)} training classes)")
    class_index = {name: index for index, name in enumerate(classes)}
    samples = []
    for class_name in found:
        class_samples = []
        for folder, _, file_names in sorted(os.walk(os.path.join(root, class_name))):
            for file_name in sorted(file_names):
                if file_name.lower().endswith(IMG_EXTENSIONS):
                    class_samples.append((os.path.join(folder, file_name), class_index[class_name]))
        if not class_samples:
            raise DataError(f"no images found in {os.path.join(root, class_name)}: remove the "
                            f"empty class folder, or add its images (expected one of "
                            f"{', '.join(IMG_EXTENSIONS)})")
        samples += class_samples
    if not samples:
        raise DataError(f"no images found in {root} (expected {root}/<class>/<image> with one of "
                        f"{', '.join(IMG_EXTENSIONS)})")
    return samples, list(classes)


# A class index in a map file: ASCII digits only (`int` would also take '²' or '١').
_CLASS_INDEX = re.compile(r'[0-9]+')


def zip_samples(data_path: str, split: str) -> Tuple[List[Sample], List[str]]:
    """Samples listed in `<data_path>/<split>_map.txt` (UTF-8), one `member<TAB>class_index`
    line per image, read from `<data_path>/<split>.zip`.

    The map is checked against the archive's member list here, at start-up: a map line naming a
    member the archive lacks is an error, not a skipped image, since a map that does not fit
    its archive (say, names without the archive's folder prefix) would skip most images. So is
    an archive that is not a readable zip (truncated, say)."""
    map_file = os.path.join(data_path, f'{split}_map.txt')
    archive = os.path.join(data_path, f'{split}.zip')
    for required in (map_file, archive):
        if not os.path.isfile(required):
            raise DataError(f"--zip needs {required}, which does not exist")
    try:
        members = set(archive_members(archive))
    except ZipReadError as error:
        raise DataError(f"{error}: it may be truncated or damaged; copy or create it again") from None
    samples, missing = [], []
    for line_number, line in enumerate(read_map_lines(map_file), 1):
        if not line.strip():
            continue
        fields = line.split('\t')
        if len(fields) < 2 or not _CLASS_INDEX.fullmatch(fields[1].strip()):
            raise DataError(f"{map_file}:{line_number}: expected 'member<TAB>class_index' with a "
                            f"class index of digits 0-9, got {line.strip()!r}")
        if fields[0] not in members:
            missing.append((line_number, fields[0]))
        samples.append((f'{archive}@/{fields[0]}', int(fields[1])))
    if missing:
        raise DataError(missing_members_message(map_file, archive, members, missing))
    if not samples:
        raise DataError(f"{map_file} lists no images")
    num_classes = max(target for _, target in samples) + 1
    return samples, [str(i) for i in range(num_classes)]


def read_map_lines(map_file: str) -> List[str]:
    """The lines of a map file, which must be UTF-8 text (a byte-order mark is allowed)."""
    try:
        with open(map_file, 'rb') as f:
            data = f.read()
    except OSError as error:
        raise DataError(f"cannot read {map_file}: {error.strerror}") from None
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as error:
        line_number = data.count(b'\n', 0, error.start) + 1
        raise DataError(f"{map_file}:{line_number}: not UTF-8 text (byte 0x{data[error.start]:02x}): save "
                        f"the map file as UTF-8, with member names as the archive stores them") from None
    return [line.rstrip('\r') for line in text.split('\n')]


def missing_members_message(map_file: str, archive: str, members: set,
                            missing: List[Tuple[int, str]]) -> str:
    """The first map line whose member the archive lacks, how many more there are, and the
    archive's name for that member if it differs only by a folder prefix (or a leading '/')."""
    line_number, member = missing[0]
    more = f" (and lacks {len(missing) - 1} more that the map names)" if len(missing) > 1 else ''
    shorter = [member.lstrip('/')] + ['/'.join(member.split('/')[i:]) for i in range(1, member.count('/') + 1)]
    similar = next((name for name in shorter if name in members), None) or \
        next((name for name in members if name.endswith('/' + member)), None)
    hint = f"; the archive has {similar!r}" if similar else ''
    return (f"{map_file}:{line_number}: {archive} has no member {member!r}{more}{hint}: make the map's "
            f"member names those of the archive, or remove the lines of images it lacks")


def read_source(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source
    if is_zip_path(source):
        return read_zip_member(source)
    with open(source, 'rb') as f:
        return f.read()


def describe(source: Source, samples_index: int) -> str:
    return source if isinstance(source, str) else f"cached image #{samples_index}"


# One-channel Pillow modes deeper than 8 bits and the value that stands for white in each: 16-bit
# PNG, TIFF and PGM images open as I;16* (or as I, Pillow's 32-bit integers), float TIFFs as F.
# Pillow's own conversion to RGB clips them to 0-255, which turns them white or black.
WIDE_MODE_WHITE = {'I;16': 65535, 'I;16L': 65535, 'I;16B': 65535, 'I;16N': 65535, 'I': 65535, 'F': 1.0}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded image: 16-bit images scaled from 0-65535 and float images from
    0-1 to 0-255; every other mode (L, P, RGBA, CMYK, ...) through Pillow's conversion. Raises
    ValueError for a 16-bit or float image with values outside that range (or not finite),
    which has no 8-bit meaning that could be assumed."""
    white = WIDE_MODE_WHITE.get(image.mode)
    if white is None:
        return image.convert('RGB')
    if image.mode.startswith('I;16'):
        image = image.convert('I')
    low, high = image.getextrema()
    if image.mode == 'F' and np.isnan(np.asarray(image)).any():
        low = float('nan')  # getextrema skips NaN
    if not (0 <= low and high <= white):
        kind = 'float' if image.mode == 'F' else 'integer'
        raise ValueError(f"{kind} pixel values span [{low}, {high}], outside the [0, {white}] this "
                         f"reader scales to 8 bits: convert the image to 8-bit RGB")
    return image.point(lambda value: value * (255 / white) + 0.5).convert('L').convert('RGB')


def decode_rgb(encoded: bytes) -> Image.Image:
    """The 8-bit RGB image of an encoded file (see `to_rgb`)."""
    if not encoded:
        raise ValueError("empty file (0 bytes)")
    with Image.open(io.BytesIO(encoded)) as image:
        image.load()
        return to_rgb(image)


class ImageDataset(torch.utils.data.Dataset):
    """Decoded RGB images and class indices.

    An image that cannot be read or decoded is reported on stderr with its path and counted in
    `num_unreadable` (shared with DataLoader workers); `__getitem__` then returns None and the
    collate functions below leave it out.
    """

    def __init__(self, samples: List[Sample], classes: Sequence[str],
                 transform: Optional[Callable] = None) -> None:
        self.samples = samples
        self.classes = list(classes)
        self.transform = transform
        self._unreadable = multiprocessing.Value('i', 0)

    @property
    def num_unreadable(self) -> int:
        return self._unreadable.value

    def cache(self, indices: Sequence[int]) -> None:
        """Replace the sources at `indices` by their encoded bytes. A source that cannot be read
        keeps its path: reading it for a batch then reports and skips it."""
        for index in indices:
            source, target = self.samples[index]
            try:
                self.samples[index] = (read_source(source), target)
            except OSError:
                continue

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        source, target = self.samples[index]
        try:
            image = decode_rgb(read_source(source))
        except Image.UnidentifiedImageError:
            return self._skip(source, index, "not an image format PIL can read")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            return self._skip(source, index, str(error))
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    def _skip(self, source: Source, index: int, reason: str) -> None:
        """Count and report an unreadable image; the collate functions leave out its None."""
        with self._unreadable.get_lock():
            self._unreadable.value += 1
        print(f"warning: skipping unreadable image {describe(source, index)}: {reason}",
              file=sys.stderr, flush=True)
        return None


def collate_eval(batch: list):
    """Stack the readable samples; unreadable ones are left out so that no image is counted
    twice. Returns None when the whole batch is unreadable."""
    readable = [item for item in batch if item is not None]
    if not readable:
        return None
    return torch.utils.data.default_collate(readable)


def collate_train(batch: list):
    """Stack the batch, filling the places of unreadable samples with copies of readable ones
    so that every step sees the same batch size (mixup needs it even, DDP and torch.compile
    like it constant). Returns None when the whole batch is unreadable."""
    readable = [item for item in batch if item is not None]
    if not readable:
        return None
    filled = readable + [readable[i % len(readable)] for i in range(len(batch) - len(readable))]
    return torch.utils.data.default_collate(filled)
