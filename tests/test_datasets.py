"""Reading datasets: what stops a run at start-up (a map file that does not fit its zip, an
unreadable archive or map) and what only skips one image with a warning and a count (a corrupt
or vanished member, a pixel format with no 8-bit meaning); 16-bit and float images converted by
their real range."""
import io
import os
import re
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from data import demo, images
from data.images import DataError, ImageDataset, decode_rgb, zip_samples


def png_bytes(colour=(10, 200, 30), size=(6, 5)) -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', size, colour).save(buffer, 'PNG')
    return buffer.getvalue()


def write_zip_split(root, split: str, members: dict, map_text, compression=zipfile.ZIP_STORED) -> str:
    """`<root>/<split>.zip` with `members` (name -> bytes) and `<split>_map.txt` holding
    `map_text` (bytes are written as they are)."""
    with zipfile.ZipFile(root / f'{split}.zip', 'w', compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    map_file = root / f'{split}_map.txt'
    map_file.write_bytes(map_text if isinstance(map_text, bytes) else map_text.encode())
    return str(map_file)


def encoded(image: Image.Image, file_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, file_format)
    return buffer.getvalue()


def test_zip_map_and_archive_that_agree_give_every_sample(tmp_path):
    """A byte-order mark and Windows line ends are fine; classes follow the largest index."""
    write_zip_split(tmp_path, 'train', {'n01/a.png': png_bytes(), 'n02/b.png': png_bytes()},
                    '\ufeffn01/a.png\t0\r\nn02/b.png\t2\r\n\r\n'.encode('utf-8'))
    samples, classes = zip_samples(str(tmp_path), 'train')
    archive = str(tmp_path / 'train.zip')
    assert samples == [(f'{archive}@/n01/a.png', 0), (f'{archive}@/n02/b.png', 2)]
    assert classes == ['0', '1', '2']


def test_map_line_naming_a_member_the_zip_lacks_stops_at_start_up_naming_the_line(tmp_path):
    map_file = write_zip_split(tmp_path, 'val', {'a.png': png_bytes()}, 'a.png\t0\nb.png\t1\nc.png\t1\n')
    with pytest.raises(DataError) as error:
        zip_samples(str(tmp_path), 'val')
    message = str(error.value)
    assert message.startswith(f"{map_file}:2: {tmp_path / 'val.zip'} has no member 'b.png' "
                              f"(and lacks 1 more that the map names)")


@pytest.mark.parametrize('map_name, archive_name', [
    ('n01/a.png', 'train/n01/a.png'), ('train/n01/a.png', 'n01/a.png'), ('/n01/a.png', 'n01/a.png')])
def test_map_names_whose_folder_prefix_differs_from_the_archives_get_a_hint(tmp_path, map_name, archive_name):
    write_zip_split(tmp_path, 'train', {archive_name: png_bytes(), 'n02/a.png': png_bytes()}, f'{map_name}\t0\n')
    with pytest.raises(DataError, match=rf"has no member '{map_name}'; the archive has '{archive_name}'"):
        zip_samples(str(tmp_path), 'train')


def test_truncated_zip_stops_at_start_up_naming_the_archive(tmp_path):
    write_zip_split(tmp_path, 'train', {'a.png': png_bytes(), 'b.png': png_bytes()}, 'a.png\t0\nb.png\t0\n')
    archive = tmp_path / 'train.zip'
    archive.write_bytes(archive.read_bytes()[:-60])  # loses the central directory, as a cut download does
    with pytest.raises(DataError, match=rf"^{archive} is not a readable zip archive .*truncated"):
        zip_samples(str(tmp_path), 'train')


def test_map_file_that_is_not_utf8_names_its_line(tmp_path):
    map_file = write_zip_split(tmp_path, 'train', {'a.png': png_bytes()},
                               'a.png\t0\ncaf\u00e9.png\t0\n'.encode('latin-1'))
    with pytest.raises(DataError, match=rf"^{map_file}:2: not UTF-8 text \(byte 0xe9\)"):
        zip_samples(str(tmp_path), 'train')


@pytest.mark.parametrize('label', ['\u00b2', '\u0661', '\U0001d7d1'])
def test_class_index_that_is_not_ascii_digits_names_the_line(tmp_path, label):
    """'²', the Arabic-Indic '١' and the mathematical '𝟑' pass str.isdigit; int() fails on the first
    and silently reads the others as 1 and 3."""
    map_file = write_zip_split(tmp_path, 'train', {'a.png': png_bytes(), 'b.png': png_bytes()},
                               f'a.png\t0\nb.png\t{label}\n')
    with pytest.raises(DataError, match=rf"^{map_file}:2: expected 'member<TAB>class_index'"):
        zip_samples(str(tmp_path), 'train')


def test_member_gone_mid_training_is_skipped_with_a_warning_and_counted(tmp_path, capsys):
    """The map was checked at start-up; a member missing later (the archive replaced under a
    running job) is one unreadable image, not a crash of the loader."""
    write_zip_split(tmp_path, 'train', {'a.png': png_bytes()}, 'a.png\t0\n')
    archive = tmp_path / 'train.zip'
    dataset = ImageDataset([(f'{archive}@/a.png', 0), (f'{archive}@/gone.png', 0)], ['0'])
    dataset.cache([1])  # cache-mode part/full: what cannot be read stays a path
    image, target = dataset[0]
    assert image.size == (6, 5) and target == 0
    assert dataset[1] is None
    assert dataset.num_unreadable == 1
    assert f"warning: skipping unreadable image {archive}@/gone.png: {archive} has no member 'gone.png'" in \
        capsys.readouterr().err


def test_corrupt_member_data_is_skipped_not_raised(tmp_path, capsys):
    data = png_bytes(size=(64, 64))
    write_zip_split(tmp_path, 'train', {'a.png': data, 'b.png': data}, 'a.png\t0\nb.png\t0\n',
                    compression=zipfile.ZIP_DEFLATED)
    archive = tmp_path / 'train.zip'
    raw = bytearray(archive.read_bytes())
    start = raw.index(b'a.png') + len(b'a.png')  # the first member's compressed data follows its name
    raw[start:start + 20] = bytes(20)
    archive.write_bytes(bytes(raw))
    samples, _ = zip_samples(str(tmp_path), 'train')
    dataset = ImageDataset(samples, ['0'])
    dataset.cache(range(2))
    assert dataset[0] is None and dataset[1] is not None
    assert dataset.num_unreadable == 1
    assert f"warning: skipping unreadable image {archive}@/a.png: member 'a.png' of {archive} cannot be read" in \
        capsys.readouterr().err


def gray_levels(image: Image.Image) -> list:
    rgb = np.asarray(image)
    assert image.mode == 'RGB' and (rgb == rgb[..., :1]).all()
    return rgb[0, :, 0].tolist()


@pytest.mark.parametrize('file_format', ['PNG', 'TIFF', 'PPM'])
def test_16_bit_grayscale_is_scaled_from_0_65535(file_format):
    """Pillow's own conversion turns these white (every value above 255 clips)."""
    levels = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    image = decode_rgb(encoded(Image.fromarray(levels), file_format))
    assert gray_levels(image) == [0, 1, 4, 128, 255]


def test_32_bit_integer_tiff_with_16_bit_values_is_scaled_alike():
    levels = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.int32)
    image = decode_rgb(encoded(Image.fromarray(levels), 'TIFF'))
    assert gray_levels(image) == [0, 1, 4, 128, 255]


def test_float_tiff_is_scaled_from_0_1():
    """Pillow's own conversion turns these black (every value rounds to 0 or 1)."""
    levels = np.array([[0.0, 0.25, 0.5, 0.998, 1.0]], dtype=np.float32)
    image = decode_rgb(encoded(Image.fromarray(levels), 'TIFF'))
    assert gray_levels(image) == [0, 64, 128, 254, 255]


@pytest.mark.parametrize('values, span', [
    (np.array([[0.0, 0.5, 3.0]], dtype=np.float32), r'float pixel values span \[0.0, 3.0\]'),
    (np.array([[0.0, np.nan, 0.5]], dtype=np.float32), r'float pixel values span \[nan, 0.5\]'),
    (np.array([[-5, 0, 100]], dtype=np.int32), r'integer pixel values span \[-5, 100\]'),
    (np.array([[0, 70000]], dtype=np.int32), r'integer pixel values span \[0, 70000\]'),
])
def test_wide_image_outside_its_range_is_skipped_with_the_reason(tmp_path, capsys, values, span):
    path = tmp_path / 'odd.tif'
    Image.fromarray(values).save(path)
    dataset = ImageDataset([(str(path), 0)], ['0'])
    assert dataset[0] is None and dataset.num_unreadable == 1
    err = capsys.readouterr().err
    assert f'warning: skipping unreadable image {path}: ' in err
    assert re.search(span + r', outside the \[0, [0-9.]+\] this reader scales to 8 bits', err), err


@pytest.mark.parametrize('mode, file_format', [('L', 'PNG'), ('LA', 'PNG'), ('RGBA', 'PNG'), ('P', 'PNG'),
                                               ('CMYK', 'JPEG'), ('CMYK', 'TIFF'), ('1', 'PNG'), ('RGB', 'WEBP')])
def test_8_bit_modes_convert_as_pillow_converts_them(mode, file_format):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).convert(mode)
    data = encoded(source, file_format)
    with Image.open(io.BytesIO(data)) as reference:
        expected = np.asarray(reference.convert('RGB'))
    image = decode_rgb(data)
    assert image.mode == 'RGB' and image.size == (16, 12)
    assert np.array_equal(np.asarray(image), expected)


def test_unreadable_data_folder_is_an_error_naming_it(tmp_path, monkeypatch):
    """(Tests run as root, who reads every folder: the refusal is simulated.)"""
    def refuse(path):
        raise PermissionError(13, 'Permission denied', path)

    monkeypatch.setattr(images.os, 'scandir', refuse)
    with pytest.raises(DataError, match=f'^cannot read the data folder {tmp_path}: Permission denied$'):
        images.folder_samples(str(tmp_path))


def test_runs_drawing_the_demo_dataset_at_once_draw_it_once_and_never_replace_it(tmp_path, monkeypatch):
    """Two runs start on a fresh cache: the first is drawing when the second asks. The second
    must wait for the first's copy instead of drawing its own and replacing (deleting) the one
    the first run reads. Before the lock, the second published first and the first then
    replaced it."""
    cache = tmp_path / 'cache'
    root = str(cache / 'shapes')
    first_drawing, second_done = threading.Event(), threading.Event()
    real_draw_image = demo.draw_image

    def draw_image(*args):
        if threading.current_thread().name == 'first' and not first_drawing.is_set():
            first_drawing.set()
            second_done.wait(timeout=1)  # gives the second run time to publish, if nothing stops it
        return real_draw_image(*args)

    monkeypatch.setattr(demo, 'draw_image', draw_image)
    drew = {}

    def run(name: str) -> None:
        drew[name] = demo.write_demo_dataset(root, 32, 1, 1)
        if name == 'second':
            second_done.set()

    first = threading.Thread(target=run, args=('first',), name='first')
    first.start()
    assert first_drawing.wait(timeout=60)
    second = threading.Thread(target=run, args=('second',), name='second')
    second.start()
    first.join()
    second.join()
    assert drew == {'first': True, 'second': False}
    assert sorted(os.listdir(cache)) == ['.shapes.lock', 'shapes'], "no partial copy left behind"
    assert len(os.listdir(os.path.join(root, 'val'))) == 10
