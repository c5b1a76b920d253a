"""Read members of zip archives addressed as `path/to/archive.zip@/member/name` (the official
ImageNet zip convention), keeping one open handle per archive and process."""
import os
import zipfile
from typing import Dict, Tuple

ZIP_SEPARATOR = '.zip@/'

_open_archives: Dict[Tuple[int, str], zipfile.ZipFile] = {}


def is_zip_path(path: str) -> bool:
    return ZIP_SEPARATOR in path


def split_zip_path(path: str) -> Tuple[str, str]:
    """`'a/train.zip@/n01/x.JPEG'` -> `('a/train.zip', 'n01/x.JPEG')`."""
    archive, member = path.split(ZIP_SEPARATOR, 1)
    return archive + '.zip', member


def read_zip_member(path: str) -> bytes:
    """The bytes of one member. Handles are keyed by process id: a handle inherited through
    fork shares its file offset with the parent and would return garbage."""
    archive, member = split_zip_path(path)
    key = (os.getpid(), archive)
    if key not in _open_archives:
        _open_archives[key] = zipfile.ZipFile(archive, 'r')
    return _open_archives[key].read(member)
