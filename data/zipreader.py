"""Read members of zip archives addressed as `path/to/archive.zip@/member/name` (the official
ImageNet zip convention), keeping one open handle per archive and process.

Whatever stops a read (an archive that is not a readable zip, a missing member, corrupt member
data) is raised as `ZipReadError`, an `OSError` like any other unreadable file, with a message
that names the archive and member.
"""
import lzma
import os
import zipfile
import zlib
from typing import Dict, List, Tuple

ZIP_SEPARATOR = '.zip@/'

_open_archives: Dict[Tuple[int, str], zipfile.ZipFile] = {}


class ZipReadError(OSError):
    """A zip archive, or a member of one, that cannot be read."""


def is_zip_path(path: str) -> bool:
    return ZIP_SEPARATOR in path


def split_zip_path(path: str) -> Tuple[str, str]:
    """`'a/train.zip@/n01/x.JPEG'` -> `('a/train.zip', 'n01/x.JPEG')`."""
    archive, member = path.split(ZIP_SEPARATOR, 1)
    return archive + '.zip', member


def _open(archive: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive, 'r')
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise ZipReadError(f"{archive} is not a readable zip archive ({error})") from None


def open_archive(archive: str) -> zipfile.ZipFile:
    """This process's handle of `archive`. Handles are keyed by process id: a handle inherited
    through fork shares its file offset with the parent and would return garbage."""
    key = (os.getpid(), archive)
    if key not in _open_archives:
        _open_archives[key] = _open(archive)
    return _open_archives[key]


def archive_members(archive: str) -> List[str]:
    """The member names of `archive`, from its central directory. The handle is closed after:
    the calling process may never read a member, and a handle of ImageNet's train.zip holds
    hundreds of MB of member records."""
    with _open(archive) as handle:
        return handle.namelist()


def read_zip_member(path: str) -> bytes:
    """The bytes of one member."""
    archive, member = split_zip_path(path)
    handle = open_archive(archive)
    try:
        return handle.read(member)
    except KeyError:
        raise ZipReadError(f"{archive} has no member {member!r}") from None
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, RuntimeError,
            OSError) as error:  # corrupt data or header, unsupported compression, encryption, I/O
        raise ZipReadError(f"member {member!r} of {archive} cannot be read ({error})") from None
