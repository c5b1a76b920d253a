"""Fine-tuning knobs of the image transforms: AUG.HFLIP, AUG.SCALE, AUG.RATIO, DATA.MEAN and
DATA.STD reach the training and evaluation transforms, and their defaults give the ImageNet
pipeline the recipe has always used."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

from config import ConfigError, get_defaults, merge_config_file, validate_config
from data.build import build_transform

# The AUG and DATA keys of the README's fine-tuning example: no flips, milder crops, the data
# set's own statistics.
FINE_TUNING_YAML = """AUG:
  HFLIP: 0.0
  SCALE: [0.5, 1.0]
  RATIO: [0.9, 1.1]
DATA:
  MEAN: [0.5, 0.4, 0.3]
  STD: [0.2, 0.25, 0.3]
"""


def load(tmp_path, text: str = ''):
    path = tmp_path / 'config.yaml'
    path.write_text(text)
    config = get_defaults()
    merge_config_file(config, str(path))
    validate_config(config)
    return config


def steps_of(transform: transforms.Compose, kind: type) -> list:
    return [step for step in transform.transforms if isinstance(step, kind)]


def normalize_of(transform: transforms.Compose):
    (normalize,) = steps_of(transform, transforms.Normalize)
    return (torch.as_tensor(normalize.mean).tolist(), torch.as_tensor(normalize.std).tolist())


def photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))


def seeded(transform, image: Image.Image, seed: int) -> torch.Tensor:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return transform(image)


def test_defaults_are_imagenet_statistics_and_crops():
    config = get_defaults()
    assert tuple(config.DATA.MEAN) == IMAGENET_DEFAULT_MEAN
    assert tuple(config.DATA.STD) == IMAGENET_DEFAULT_STD
    assert config.AUG.HFLIP == 0.5
    assert tuple(config.AUG.SCALE) == (0.08, 1.0)
    assert tuple(config.AUG.RATIO) == (3 / 4, 4 / 3)


def test_defaults_give_the_previous_pipeline(tmp_path):
    """The pipeline as built before these keys existed (timm's defaults for crops, flips and
    statistics): same steps and the same output for the same random draws."""
    config = load(tmp_path)
    aug = config.AUG
    previous_train = create_transform(
        input_size=224, is_training=True, color_jitter=aug.COLOR_JITTER,
        auto_augment=aug.AUTO_AUGMENT, re_prob=aug.REPROB, re_mode=aug.REMODE,
        re_count=aug.RECOUNT, interpolation=config.DATA.INTERPOLATION)
    previous_eval = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    train, evaluate = build_transform(True, config), build_transform(False, config)
    assert [repr(step) for step in train.transforms] == [repr(step) for step in previous_train.transforms]
    assert [repr(step) for step in evaluate.transforms] == [repr(step) for step in previous_eval.transforms]
    image = photo()
    for seed in range(4):
        assert torch.equal(seeded(train, image, seed), seeded(previous_train, image, seed))
    assert torch.equal(evaluate(image), previous_eval(image))


def test_each_key_reaches_the_transforms(tmp_path):
    config = load(tmp_path, FINE_TUNING_YAML.replace('HFLIP: 0.0', 'HFLIP: 0.25'))
    train, evaluate = build_transform(True, config), build_transform(False, config)
    (crop,) = steps_of(train, RandomResizedCropAndInterpolation)
    assert crop.scale == (0.5, 1.0) and crop.ratio == (0.9, 1.1)
    (flip,) = steps_of(train, transforms.RandomHorizontalFlip)
    assert flip.p == 0.25
    for transform in (train, evaluate):
        mean, std = normalize_of(transform)
        assert mean == pytest.approx([0.5, 0.4, 0.3]) and std == pytest.approx([0.2, 0.25, 0.3])
    (rand_augment,) = steps_of(train, RandAugment)
    assert rand_augment.ops[0].hparams['img_mean'] == (128, 102, 76)  # fill: the mean in 0-255


def test_readme_fine_tuning_example_turns_flips_off(tmp_path):
    train = build_transform(True, load(tmp_path, FINE_TUNING_YAML))
    assert not steps_of(train, transforms.RandomHorizontalFlip)
    (crop,) = steps_of(train, RandomResizedCropAndInterpolation)
    assert crop.scale == (0.5, 1.0)
    assert train(photo()).shape == (3, 224, 224)


@pytest.mark.parametrize('text, message', [
    ('AUG:\n  HFLIP: 1.5\n', 'AUG.HFLIP must be a probability in [0, 1]'),
    ('AUG:\n  SCALE: [0.9, 0.5]\n', 'AUG.SCALE must be [low, high] with 0 < low <= high <= 1'),
    ('AUG:\n  SCALE: [0.0, 1.0]\n', 'AUG.SCALE must be'),
    ('AUG:\n  SCALE: [0.5, 1.0, 1.0]\n', 'AUG.SCALE must be'),
    ('AUG:\n  RATIO: [-1.0, 1.0]\n', 'AUG.RATIO must be [low, high] with 0 < low <= high'),
    ('AUG:\n  RATIO: [1.5, 1.0]\n', 'AUG.RATIO must be'),
    ('DATA:\n  MEAN: [0.5, 0.5]\n', 'DATA.MEAN must be 3 numbers'),
    ('DATA:\n  MEAN: [a, b, c]\n', 'DATA.MEAN must be 3 numbers'),
    ('DATA:\n  STD: [0.2, 0.0, 0.2]\n', 'DATA.STD must be 3 positive numbers'),
])
def test_bad_value_is_a_config_error_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace('[', r'\[').replace(']', r'\]')):
        load(tmp_path, text)
