"""`build_transform(is_train, config)`: the training and evaluation image transforms of a config.

Training is timm's ImageNet pipeline; two things are added to it:
- RandAugment / AutoAugment / AugMix ops whose Pillow call has a narrower range than timm's
  magnitudes give run on our own version of that call (`PILLOW_SAFE_OPS`), which computes what
  Pillow before 13 computed. Only posterize needs one: timm asks for 4 - int(m * 4 / 10) bits
  (0 at magnitude 10 with `inc1`, fewer with `mmax` above 10), plain `Posterize` for int(m * 4 / 10)
  (0 below magnitude 2.5); Pillow < 13 kept no bit, a black image, Pillow 13 raises.
- A step that raises names itself (the op and its arguments inside RandAugment) and the config,
  in the error a DataLoader worker passes on (`TransformError`).
"""
import os
from typing import Callable, List

from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from timm.data.auto_augment import AugmentOp, AugMixAugment, AutoAugment, RandAugment
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from yacs.config import CfgNode as CN

from utils import run_folder


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op over Pillow's, for every number of bits timm's levels give: 8 or more
    keep the image, 1-7 are Pillow's, 0 or fewer keep no bit (black, as Pillow < 13 made it by
    masking every bit away; Pillow 13 accepts only 1-8)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


# timm's op functions whose arguments can leave the range Pillow accepts -> ours.
PILLOW_SAFE_OPS = {auto_augment.posterize: posterize}


class TransformError(RuntimeError):
    """A transform step raised; the message names the step and the config."""


class AugmentOpError(RuntimeError):
    """An augmentation op raised; caught by `Pipeline`, which adds the step and the config."""


class NamedOpFunction:
    """The image function of one AugmentOp, naming the op and its arguments when it raises."""

    def __init__(self, op_name: str, function: Callable) -> None:
        self.op_name = op_name
        self.function = function

    def __call__(self, img: Image.Image, *args, **kwargs) -> Image.Image:
        try:
            return self.function(img, *args, **kwargs)
        except Exception as error:
            arguments = ', '.join(repr(arg) for arg in args)
            raise AugmentOpError(f"op {self.op_name}({arguments})") from error


def augment_ops(step) -> List[AugmentOp]:
    """The AugmentOps of a RandAugment, AutoAugment or AugMix step; none for other steps."""
    if isinstance(step, (RandAugment, AugMixAugment)):
        return list(step.ops)
    if isinstance(step, AutoAugment):
        return [op for sub_policy in step.policy for op in sub_policy]
    return []


def use_safe_named_ops(steps: list) -> None:
    """Give every AugmentOp in `steps` its `PILLOW_SAFE_OPS` function and an error that names it."""
    for step in steps:
        for op in augment_ops(step):
            if not isinstance(op.aug_fn, NamedOpFunction):
                op.aug_fn = NamedOpFunction(op.name, PILLOW_SAFE_OPS.get(op.aug_fn, op.aug_fn))


class Pipeline(transforms.Compose):
    """A Compose whose errors say which step failed (and, inside RandAugment, which op with
    which arguments) in `description`, e.g. "the training transform of focal_tiny_patch4_window7_224
    (its config: output/focal_tiny_patch4_window7_224/default/config.yaml)"."""

    def __init__(self, steps: list, description: str) -> None:
        super().__init__(steps)
        self.description = description

    def __call__(self, img):
        for index, step in enumerate(self.transforms):
            try:
                img = step(img)
            except Exception as error:
                place = f"step {index + 1}/{len(self.transforms)} {type(step).__name__}"
                cause = error
                if isinstance(error, AugmentOpError):
                    place += f", {error}"
                    cause = error.__cause__
                raise TransformError(f"{self.description} failed in {place}: "
                                     f"{type(cause).__name__}: {cause}") from error
        return img


def build_transform(is_train: bool, config: CN) -> Pipeline:
    """timm's ImageNet training pipeline (random resized crop within `AUG.SCALE` / `AUG.RATIO`,
    flip with probability `AUG.HFLIP`, RandAugment, colour jitter (which timm leaves out when
    RandAugment or AutoAugment is on), random erasing), or resize + centre crop for evaluation;
    both normalise with `DATA.MEAN` / `DATA.STD`. Images of 32 px or less use a padded random
    crop instead of the resized crop, and for evaluation a centre crop without resizing; both
    pad images smaller than the input size."""
    img_size = config.DATA.IMG_SIZE
    resize_im = img_size > 32
    mean, std = tuple(config.DATA.MEAN), tuple(config.DATA.STD)
    description = (f"the {'training' if is_train else 'evaluation'} transform of {config.MODEL.NAME} "
                   f"(its config: {os.path.join(run_folder(config), 'config.yaml')})")
    if is_train:
        aug = config.AUG
        steps = create_transform(
            input_size=img_size,
            is_training=True,
            scale=tuple(aug.SCALE),
            ratio=tuple(aug.RATIO),
            hflip=aug.HFLIP,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT != 'none' else None,
            re_prob=aug.REPROB,
            re_mode=aug.REMODE,
            re_count=aug.RECOUNT,
            interpolation=config.DATA.INTERPOLATION,
            mean=mean,
            std=std,
        ).transforms
        if not resize_im:
            steps[0] = transforms.RandomCrop(img_size, padding=4, pad_if_needed=True)
        use_safe_named_ops(steps)
        return Pipeline(steps, description)
    interpolation = InterpolationMode.BICUBIC if config.DATA.INTERPOLATION == 'bicubic' \
        else InterpolationMode.BILINEAR
    steps = []
    if resize_im:
        if config.TEST.CROP:
            steps += [transforms.Resize(int(256 / 224 * img_size), interpolation=interpolation),
                      transforms.CenterCrop(img_size)]
        else:
            steps.append(transforms.Resize((img_size, img_size), interpolation=interpolation))
    else:
        steps.append(transforms.CenterCrop(img_size))  # pads images smaller than img_size
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return Pipeline(steps, description)
