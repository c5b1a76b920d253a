"""Image classification datasets: the ImageNet folder layout and zipped ImageNet with map files,
with optional in-memory caching and tolerant reading of unreadable images.

A sample is `(source, class_index)` where `source` is a file path, a zip member path
(`train.zip@/n01/x.JPEG`) or, once cached, the encoded bytes themselves.
"""
import io
import multiprocessing
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from utils import UserError

from .zipreader import is_zip_path, read_zip_member

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
    found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
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


def zip_samples(data_path: str, split: str) -> Tuple[List[Sample], List[str]]:
    """Samples listed in `<data_path>/<split>_map.txt`, one `member<TAB>class_index` per line,
    read from `<data_path>/<split>.zip`."""
    map_file = os.path.join(data_path, f'{split}_map.txt')
    archive = os.path.join(data_path, f'{split}.zip')
    for required in (map_file, archive):
        if not os.path.isfile(required):
            raise DataError(f"--zip needs {required}, which does not exist")
    samples = []
    with open(map_file) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip('\n').split('\t')
            if len(fields) < 2 or not fields[1].strip().isdigit():
                raise DataError(f"{map_file}:{line_number}: expected 'member<TAB>class_index', "
                                f"got {line.strip()!r}")
            samples.append((f'{archive}@/{fields[0]}', int(fields[1])))
    if not samples:
        raise DataError(f"{map_file} lists no images")
    num_classes = max(target for _, target in samples) + 1
    return samples, [str(i) for i in range(num_classes)]


def read_source(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source
    if is_zip_path(source):
        return read_zip_member(source)
    with open(source, 'rb') as f:
        return f.read()


def describe(source: Source, samples_index: int) -> str:
    return source if isinstance(source, str) else f"cached image #{samples_index}"


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
        """Replace the sources at `indices` by their encoded bytes."""
        for index in indices:
            source, target = self.samples[index]
            self.samples[index] = (read_source(source), target)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        source, target = self.samples[index]
        try:
            encoded = read_source(source)
            if not encoded:
                raise ValueError("empty file (0 bytes)")
            with Image.open(io.BytesIO(encoded)) as image:
                image = image.convert('RGB')
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
