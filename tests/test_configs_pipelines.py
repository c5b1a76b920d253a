"""The data pipeline of every shipped config, and of every run a reproduction script launches (the
config file with the script's flags): the exact training and evaluation transforms and the
mixup/cutmix that `build_loader` gives the run, on small images of several shapes.

Each random step is also run at its extremes, in place, on what it receives in the pipeline:
every RandAugment / AutoAugment / AugMix op at magnitude 0 and at its upper bound (10 unless
`mmax`), with and without timm's random sign flip; crops at the corners of their scale and aspect
ranges; random erasing at the corners of its area, aspect and count ranges; flips and colour
jitter at their limits; mixup and cutmix at lambda 0 and 1. Then random draws run the whole
pipeline. A step type without a known way to reach its extremes fails the test, so a new
augmentation cannot slip in unexercised.
"""
import copy
import io
import pickle
import random
import re
import traceback
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms
from yacs.config import CfgNode as CN

import main
from config import get_config
from conftest import REPO_ROOT, REPRODUCTION_SCRIPTS, SHIPPED_CONFIGS, dry_run_commands, main_arguments
from data.build import build_loader
from data.transforms import TransformError, augment_ops, build_transform, posterize

# Steps without randomness: the random draws below are all they need.
DETERMINISTIC_STEPS = (transforms.ToTensor, MaybeToTensor, transforms.Normalize, transforms.Resize,
                       transforms.CenterCrop)
# Steps whose randomness has no magnitude (a crop position): random draws only.
POSITION_ONLY_STEPS = (transforms.RandomCrop,)
# timm's _randomly_negate flips the sign when random.random() > 0.5.
SIGN_DRAWS = {'kept': 0.0, 'flipped': 0.99}
DRAWS_PER_IMAGE = 6

pytestmark = pytest.mark.usefixtures('one_thread')  # as in a DataLoader worker, which has one


def small_images():
    """RGB images (what ImageDataset gives the transform) smaller than every crop: noise, a flat
    grey one (autocontrast and equalize meet no range), a portrait and a thin strip."""
    rng = np.random.default_rng(0)
    noise, portrait, strip = (Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                              for width, height in [(40, 30), (23, 31), (64, 9)])
    return [noise, Image.new('RGB', (20, 20), (128, 128, 128)), portrait, strip]


EXTREMES_ON = 2  # the first images of small_images() meet every extreme; all of them the random draws


def with_attributes(step, **attributes):
    forced = copy.copy(step)
    for name, value in attributes.items():
        setattr(forced, name, value)
    return forced


def op_extremes(op):
    """(label, callable) running the AugmentOp `op` at magnitude 0 and at its upper bound, with
    and without the random sign flip, every time (probability 1, no magnitude noise)."""
    upper = op.magnitude_max or auto_augment._LEVEL_DENOM
    for magnitude in (0, upper):
        forced = with_attributes(op, prob=1.0, magnitude=magnitude, magnitude_std=0)
        for sign, draw in SIGN_DRAWS.items():
            def run(img, forced=forced, draw=draw):
                with mock.patch('random.random', return_value=draw):
                    return forced(img)
            yield f"{op.name} at magnitude {magnitude}, sign {sign}", run


def step_extremes(step):
    """(label, callable) for each extreme setting of a pipeline step; an unknown step fails."""
    ops = augment_ops(step)
    if ops:
        for op in ops:
            yield from op_extremes(op)
    elif isinstance(step, RandomResizedCropAndInterpolation):
        for scale in step.scale:
            for ratio in step.ratio:
                yield f"crop scale {scale} ratio {ratio}", with_attributes(step, scale=(scale, scale),
                                                                           ratio=(ratio, ratio))
    elif isinstance(step, (transforms.RandomHorizontalFlip, transforms.RandomVerticalFlip)):
        yield "flip", with_attributes(step, p=1.0)
    elif isinstance(step, transforms.ColorJitter):
        for end in (0, 1):
            ranges = {name: [getattr(step, name)[end]] * 2 for name in ('brightness', 'contrast', 'saturation', 'hue')
                      if getattr(step, name) is not None}
            yield f"colour jitter at {ranges}", with_attributes(step, **ranges)
    elif isinstance(step, RandomErasing):
        for count in {step.min_count, step.max_count}:
            for area in (step.min_area, step.max_area):
                for log_ratio in step.log_aspect_ratio:
                    yield (f"random erasing of {count} area(s) {area} at log aspect {log_ratio:.2f}",
                           with_attributes(step, probability=1.0, min_count=count, max_count=count,
                                           min_area=area, max_area=area, log_aspect_ratio=(log_ratio, log_ratio)))
    elif not isinstance(step, DETERMINISTIC_STEPS + POSITION_ONLY_STEPS):
        pytest.fail(f"no known extremes for the transform step {step!r}: add them to step_extremes")


def check_output(output, like, what):
    """An output of a step's extreme setting has the type, size and mode (or shape, dtype and
    finite values) of the step's own output, which the next step expects."""
    if isinstance(like, Image.Image):
        assert isinstance(output, Image.Image), what
        assert (output.size, output.mode) == (like.size, like.mode), what
    else:
        assert output.shape == like.shape and output.dtype == like.dtype, what
        assert torch.isfinite(output).all(), what


def exercise_training_transform(pipeline, img_size):
    """Each step at its extremes on what it receives from the steps before, then random draws."""
    images = small_images()
    for image_index, image in enumerate(images[:EXTREMES_ON]):
        for step in pipeline.transforms:
            received = image
            image = step(received.clone() if torch.is_tensor(received) else received)
            for label, extreme in step_extremes(step):
                # clone: random erasing works in place
                output = extreme(received.clone() if torch.is_tensor(received) else received)
                check_output(output, image, f"{label} on image {image_index}")
    for image in images:
        for draw in range(DRAWS_PER_IMAGE):
            random.seed(draw)
            np.random.seed(draw)
            torch.manual_seed(draw)
            output = pipeline(image)
            assert output.shape == (3, img_size, img_size) and torch.isfinite(output).all()


def exercise_mixup(mixup_fn, batch, num_classes):
    """Both mixup and cutmix (whichever the config enables) at lambda 0 and 1 and drawn."""
    targets = torch.arange(len(batch)) % num_classes
    modes = [dict(mix_prob=1.0, switch_prob=switch) for switch in (0.0, 1.0)] \
        if mixup_fn.mixup_alpha > 0 and mixup_fn.cutmix_alpha > 0 else [dict(mix_prob=1.0)]
    for mode in modes:
        forced = with_attributes(mixup_fn, **mode)
        for lam in (0.0, 1.0, None):
            beta = np.random.beta if lam is None else \
                (lambda a, b, size=None, lam=lam: lam if size is None else np.full(size, lam))
            with mock.patch('numpy.random.beta', beta):
                mixed, soft_targets = forced(batch.clone(), targets.clone())
            what = f"mixup {mode} at lambda {lam}"
            assert mixed.shape == batch.shape and torch.isfinite(mixed).all(), what
            assert soft_targets.shape == (len(batch), num_classes), what
            assert torch.allclose(soft_targets.sum(1), torch.ones(len(batch))), what
            assert (soft_targets >= 0).all(), what


class StatePickler(pickle.Pickler):
    """Pickles tensors by value: torch's own pickle of equal tensors differs from one to another."""

    def reducer_override(self, obj):
        return (torch.tensor, (obj.tolist(),)) if torch.is_tensor(obj) else NotImplemented


EXERCISED = set()  # the state of each pipeline exercised without failure in this session


def state_of(*pipeline_parts) -> bytes:
    """The exact state of pipeline objects (their pickle: every attribute, op and parameter);
    configs that build pipelines in the same state are exercised once."""
    buffer = io.BytesIO()
    StatePickler(buffer).dump(pipeline_parts)
    return buffer.getvalue()


def exercise_pipelines(config: CN, data_path: str, training: bool) -> None:
    """The data pipelines `build_loader` gives `config` on `data_path`: the evaluation transform
    and, for a training run, the training transform and mixup/cutmix."""
    config = config.clone()
    config.defrost()
    config.DATA.DATA_PATH, config.DATA.NUM_WORKERS = data_path, 0
    loaders = build_loader(config, with_train=True)
    img_size = config.DATA.IMG_SIZE
    evaluation = loaders.dataset_val.transform
    state = state_of(evaluation.transforms)
    if state not in EXERCISED:
        for image in small_images():
            output = evaluation(image)
            assert output.shape == (3, img_size, img_size) and torch.isfinite(output).all()
        EXERCISED.add(state)
    pipeline = loaders.dataset_train.transform
    state = state_of(pipeline.transforms, loaders.mixup_fn, loaders.num_classes)
    if training and state not in EXERCISED:
        exercise_training_transform(pipeline, img_size)
        if loaders.mixup_fn is not None:
            batch = torch.stack([pipeline(image) for image in small_images()])
            exercise_mixup(loaders.mixup_fn, batch, loaders.num_classes)
        EXERCISED.add(state)


def main_config(arguments):
    return get_config(main.parse_args(arguments))


@pytest.mark.parametrize('path', SHIPPED_CONFIGS)
def test_config_pipelines_run_at_every_extreme(path, tiny_data, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    exercise_pipelines(main_config(['--cfg', path]), tiny_data, training=True)


@pytest.mark.parametrize('script', REPRODUCTION_SCRIPTS)
def test_script_run_pipelines_run_at_every_extreme(script, tiny_data, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    for command in dry_run_commands(script):
        arguments = main_arguments(command)
        if arguments is not None:
            config = main_config(arguments)
            exercise_pipelines(config, tiny_data, training=not (config.EVAL_MODE or config.THROUGHPUT_MODE))


def test_recipe_runs_randaugment_posterize_at_full_magnitude():
    """The issue's crash: `inc1` posterize at magnitude 10 keeps 0 bits, which Pillow 13 refuses."""
    config = main_config(['--cfg', f'{REPO_ROOT}/configs/focal_tiny.yaml'])
    (rand_augment,) = [step for step in build_transform(True, config).transforms if augment_ops(step)]
    (op,) = [op for op in rand_augment.ops if op.name == 'PosterizeIncreasing']
    image = small_images()[0]
    forced = with_attributes(op, prob=1.0, magnitude=10, magnitude_std=0)
    assert np.asarray(forced(image)).max() == 0


# Policies no shipped config uses, whose posterize ops also ask Pillow for 0 bits or fewer:
# plain Posterize below magnitude 2.5, PosterizeIncreasing at magnitude 10 and beyond with mmax,
# AutoAugment's v0 policy, and AugMix.
OTHER_POLICIES = ['rand-m9-mstd0.5', 'rand-m9-mstd0.5-inc1-mmax20', 'v0-mstd0.5', 'augmix-m10-w3']


@pytest.mark.parametrize('policy', OTHER_POLICIES)
def test_other_augmentation_policies_run_at_every_extreme(policy):
    config = main_config(['--cfg', f'{REPO_ROOT}/configs/focal_tiny.yaml',
                          '--opts', 'AUG.AUTO_AUGMENT', policy, 'DATA.IMG_SIZE', '64'])
    pipeline = build_transform(True, config)
    assert any(augment_ops(step) for step in pipeline.transforms)
    exercise_training_transform(pipeline, 64)


@pytest.mark.parametrize('mode', ['RGB', 'L'])
def test_posterize_keeps_what_pillow_before_13_computed(mode):
    """Pillow < 13 masked away all but `bits` high bits of each channel, for any `bits` (0 or less:
    none, a black image); Pillow 13 accepts only 1-8."""
    image = small_images()[0].convert(mode)
    for bits in range(-4, 10):
        mask = ~(2 ** (8 - bits) - 1) if bits < 8 else 255
        before_pillow_13 = image.point([value & mask for value in range(256)] * len(image.getbands()))
        assert np.array_equal(np.asarray(posterize(image, bits)), np.asarray(before_pillow_13)), bits
    assert posterize(image, 3).tobytes() == ImageOps.posterize(image, 3).tobytes()


def failing(img, *args, **kwargs):
    raise ValueError("bits must be between or equal to 1 and 8")


def recipe_config_with_failing_posterize(tmp_path, tiny_data, num_workers):
    """The recipe's loaders with RandAugment reduced to a posterize op that always raises."""
    config = main_config(['--cfg', f'{REPO_ROOT}/configs/focal_tiny.yaml', '--data-path', tiny_data,
                          '--output', str(tmp_path), '--batch-size', '2',
                          '--opts', 'DATA.NUM_WORKERS', str(num_workers)])
    loaders = build_loader(config)
    (rand_augment,) = [step for step in loaders.dataset_train.transform.transforms if augment_ops(step)]
    (op,) = [op for op in rand_augment.ops if op.name == 'PosterizeIncreasing']
    op.aug_fn.function = failing
    rand_augment.ops = [with_attributes(op, prob=1.0, magnitude=10, magnitude_std=0)]
    return loaders


EXPECTED_MESSAGE = (r"the training transform of focal_tiny_patch4_window7_224 \(its config: .*"
                    r"focal_tiny_patch4_window7_224/default/config.yaml\) failed in step 3/6 RandAugment, "
                    r"op PosterizeIncreasing\(0\): ValueError: bits must be")


def test_failing_step_names_the_transform_op_and_config(tmp_path, tiny_data):
    loaders = recipe_config_with_failing_posterize(tmp_path, tiny_data, num_workers=0)
    with pytest.raises(TransformError, match=EXPECTED_MESSAGE) as raised:
        loaders.dataset_train[0]
    assert isinstance(raised.value.__cause__.__cause__, ValueError)  # the original keeps its traceback


def first_batch_error(loader) -> BaseException:
    """The error of the loader's first batch. Its traceback's frames are cleared so that the
    iterator shuts its worker down at once; left to the garbage collector, that waits 5 s."""
    batches = iter(loader)
    try:
        next(batches)
    except Exception as error:
        traceback.clear_frames(error.__traceback__)
        return error
    finally:
        del batches
    pytest.fail("the first batch loaded without error")


def test_failing_step_in_a_loader_worker_names_the_transform_op_and_config(tmp_path, tiny_data):
    loaders = recipe_config_with_failing_posterize(tmp_path, tiny_data, num_workers=1)
    loaders.set_epoch(0)
    error = first_batch_error(loaders.loader_train)
    assert isinstance(error, TransformError) and re.search(EXPECTED_MESSAGE, str(error)), error
