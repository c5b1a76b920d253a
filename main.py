"""Train or evaluate a Focal Transformer (or a timm baseline) on ImageNet-style data.

    python main.py --cfg configs/demo.yaml                        # built-in demo, CPU or GPU
    torchrun --nproc_per_node 8 main.py --cfg configs/focal_tiny.yaml --data-path /imagenet
    python -m torch.distributed.launch --nproc_per_node 8 main.py --cfg ... --data-path ...
    python main.py --cfg configs/focal_tiny.yaml --data-path /imagenet --eval --resume CKPT

A run reads its config, joins the process group, builds data, model, optimizer and schedule,
resumes from its newest checkpoint if there is one, then alternates training epochs with
evaluations, saving checkpoints, metrics and TensorBoard scalars in OUTPUT/MODEL.NAME/TAG.
"""
import argparse
import datetime
import json
import os
import sys
import time
from typing import List, Optional

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.utils.tensorboard import SummaryWriter
from yacs.config import CfgNode as CN

from checkpoint import (BEST_CHECKPOINT, epoch_checkpoint_name, latest_checkpoint,
                        load_for_evaluation, load_pretrained, restore_training, save_checkpoint,
                        training_state)
from config import (ConfigError, accumulation_steps, config_to_dict, dump_config, get_config,
                    run_folder)
from data import build_loader, prepare_demo_data
from distributed import barrier, cleanup, init_distributed
from engine import (EvalResult, NonFiniteGuard, StepSettings, evaluate, measure_throughput,
                    train_one_epoch)
from logger import create_logger
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from utils import UserError, seed_everything

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('Focal Transformer training and evaluation')
    parser.add_argument('--cfg', required=True, metavar='FILE', help='config file')
    parser.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE',
                        help="override config entries: KEY VALUE pairs, e.g. TRAIN.EPOCHS 10")
    parser.add_argument('--batch-size', type=int, help='batch size per process')
    parser.add_argument('--data-path', help='ImageNet root; omit it for the built-in demo data')
    parser.add_argument('--zip', action='store_true', help='read train.zip/val.zip with map files')
    parser.add_argument('--cache-mode', choices=['no', 'full', 'part'],
                        help="zip mode: 'full' caches all images in memory, 'part' this "
                             "process's shard, 'no' none")
    parser.add_argument('--resume', help='checkpoint to resume training from, or to evaluate')
    parser.add_argument('--pretrained', help='checkpoint to fine-tune from (other resolution or '
                                             'class count allowed)')
    parser.add_argument('--accumulation-steps', type=int, help='gradient accumulation steps')
    parser.add_argument('--use-checkpoint', action='store_true', help='gradient checkpointing')
    parser.add_argument('--amp-opt-level', choices=['O0', 'O1', 'O2'],
                        help='apex-style alias: O0 disables mixed precision, O1/O2 enable it')
    parser.add_argument('--amp-dtype', choices=['auto', 'bf16', 'fp16', 'none'],
                        help='autocast dtype (default auto: bf16 or fp16 on GPU, off on CPU)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights')
    parser.add_argument('--epochs', type=int, help='total training epochs')
    parser.add_argument('--output', metavar='PATH', help='root of the run folders (default output)')
    parser.add_argument('--tag', help='run name inside OUTPUT/MODEL.NAME')
    parser.add_argument('--eval', action='store_true', help='evaluate --resume and exit')
    parser.add_argument('--throughput', action='store_true', help='measure images/s and exit')
    parser.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto',
                        help='auto: CUDA when available')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None,
                        help='set by torch.distributed.launch; LOCAL_RANK wins when set')
    return parser.parse_args(argv)


def resolve_amp_dtype(config: CN, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for full precision. `AMP_OPT_LEVEL O0` and `AMP_DTYPE none`
    disable AMP; 'auto' is bf16 on GPUs that support it, fp16 on older GPUs, off on CPU."""
    if config.AMP_OPT_LEVEL == 'O0' or config.AMP_DTYPE == 'none':
        return None
    if config.AMP_DTYPE == 'auto':
        if device.type != 'cuda':
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return AMP_DTYPES[config.AMP_DTYPE]


def scale_learning_rates(config: CN, world_size: int) -> None:
    """Scale BASE_LR, WARMUP_LR and MIN_LR from 'per 512 images' to the total batch per
    optimizer step (batch x processes x accumulation steps), as in the paper's recipe."""
    factor = config.DATA.BATCH_SIZE * world_size * accumulation_steps(config) / 512.0
    config.defrost()
    config.TRAIN.BASE_LR *= factor
    config.TRAIN.WARMUP_LR *= factor
    config.TRAIN.MIN_LR *= factor
    config.freeze()


def build_criterion(config: CN, mixup_active: bool) -> torch.nn.Module:
    """Soft-target cross entropy with mixup/cutmix (which also smooths labels), else label
    smoothing, else plain cross entropy."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return torch.nn.CrossEntropyLoss()


def append_jsonl(path: str, record: dict) -> None:
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def log_accuracy(logger, result: EvalResult, what: str = 'network') -> None:
    logger.info(f' * Acc@1 {result.acc1:.3f} Acc@5 {result.acc5:.3f}')
    logger.info(f'Accuracy of the {what} on the {result.num_images} test images: '
                f'{result.acc1:.1f}%, loss {result.loss:.4f}')


def run(args: argparse.Namespace) -> None:
    config = get_config(args)
    if config.EVAL_MODE and not config.MODEL.RESUME:
        raise ConfigError("--eval needs a checkpoint to evaluate: pass --resume CKPT")
    ctx = init_distributed(args.local_rank, args.device)
    if ctx.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN picks its fastest convolutions once
    seed_everything(config.SEED + ctx.rank)
    out_dir = run_folder(config)
    logger = create_logger(out_dir, ctx.rank)
    logger.info(f"run folder {out_dir}, process {ctx.rank}/{ctx.world_size} on {ctx.device}")

    # Data: the user's ImageNet-style folders or zips, or the built-in demo dataset.
    if not config.DATA.DATA_PATH:
        demo_path, written = prepare_demo_data(config, ctx.is_main)
        logger.info(f"no --data-path given: using the built-in demo dataset (10 classes of "
                    f"procedural shapes) {'written to' if written else 'cached in'} {demo_path}")
        barrier()
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    loaders = build_loader(config, ctx.rank, ctx.world_size, with_train=training)
    if loaders.num_classes != config.MODEL.NUM_CLASSES:
        logger.info(f"MODEL.NUM_CLASSES set to {loaders.num_classes}, the number of classes in "
                    f"the data (config said {config.MODEL.NUM_CLASSES})")
        config.defrost()
        config.MODEL.NUM_CLASSES = loaders.num_classes
        config.freeze()
    logger.info(f"{len(loaders.dataset_train) if training else 'no'} training and "
                f"{len(loaders.dataset_val)} validation images in {loaders.num_classes} classes")
    if ctx.is_main:
        dump_config(config, os.path.join(out_dir, 'config.yaml'))
    logger.info(config.dump())

    # Model, precision and the (optionally DDP-wrapped, compiled) module that runs batches.
    try:
        model = build_model(config)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ConfigError(f"cannot build {config.MODEL.TYPE} model {config.MODEL.NAME!r}: "
                          f"{error}") from None
    logger.info(f"{config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                f"parameters")
    if config.MODEL.PRETRAINED:
        load_pretrained(config.MODEL.PRETRAINED, model)
        logger.info(f"fine-tuning from {config.MODEL.PRETRAINED}")
    model.to(ctx.device)
    amp_dtype = resolve_amp_dtype(config, ctx.device)
    logger.info(f"mixed precision: {amp_dtype or 'off'}")
    runner = model
    if ctx.world_size > 1:
        runner = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == 'cuda' else None)
    if config.COMPILE:
        runner = torch.compile(runner)

    if config.THROUGHPUT_MODE:
        images_per_second = measure_throughput(runner, loaders.loader_val, ctx.device, amp_dtype)
        logger.info(f"batch_size {config.DATA.BATCH_SIZE} throughput {images_per_second:.2f}")
        if ctx.is_main:
            append_jsonl(os.path.join(out_dir, 'metrics.jsonl'),
                         {'throughput': images_per_second, 'batch_size': config.DATA.BATCH_SIZE})
            with SummaryWriter(out_dir) as tb_writer:
                tb_writer.add_scalar('throughput', images_per_second, config.DATA.BATCH_SIZE)
        return

    if config.EVAL_MODE:
        checkpoint = load_for_evaluation(config.MODEL.RESUME, model)
        trained_epochs = checkpoint.get('epoch')
        logger.info(f"evaluating {config.MODEL.RESUME}")
        result = evaluate(runner, loaders.loader_val, ctx.device, amp_dtype)
        log_accuracy(logger, result)
        if ctx.is_main:
            append_jsonl(os.path.join(out_dir, 'metrics.jsonl'), {
                'epoch': trained_epochs if isinstance(trained_epochs, int) else None, 'acc1': result.acc1, 'acc5': result.acc5,
                'loss': result.loss, 'max_acc1': result.acc1, 'ema_acc1': None,
                'num_images': result.num_images, 'checkpoint': config.MODEL.RESUME})
        return

    # Optimizer, schedule, loss, scaler and EMA.
    scale_learning_rates(config, ctx.world_size)
    logger.info(f"learning rates for the total batch: base {config.TRAIN.BASE_LR:.3e}, warm-up "
                f"{config.TRAIN.WARMUP_LR:.3e}, min {config.TRAIN.MIN_LR:.3e}")
    optimizer = build_optimizer(config, model)
    accumulation = accumulation_steps(config)
    steps_per_epoch = len(loaders.loader_train) // accumulation
    if steps_per_epoch == 0:
        raise ConfigError(
            f"one optimizer step needs {config.DATA.BATCH_SIZE * accumulation * ctx.world_size} "
            f"training images (batch x accumulation x processes) but there are only "
            f"{len(loaders.dataset_train)}: lower --batch-size or --accumulation-steps")
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    criterion = build_criterion(config, loaders.mixup_fn is not None)
    scaler = torch.amp.GradScaler(ctx.device.type) if amp_dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None

    # Resume: the newest checkpoint of this run folder wins over MODEL.RESUME.
    start_epoch, max_accuracy = config.TRAIN.START_EPOCH, 0.0
    resume_path = (latest_checkpoint(out_dir) if config.TRAIN.AUTO_RESUME else None) \
        or config.MODEL.RESUME
    if resume_path:
        start_epoch, max_accuracy = restore_training(resume_path, model, optimizer, scheduler,
                                                     scaler, ema)
        logger.info(f"resumed from {resume_path}: continuing at epoch {start_epoch}, "
                    f"best Acc@1 so far {max_accuracy:.2f}%")

    tb_writer = SummaryWriter(out_dir) if ctx.is_main else None
    settings = StepSettings(accumulation_steps=accumulation, clip_grad=config.TRAIN.CLIP_GRAD,
                            amp_dtype=amp_dtype, print_freq=config.PRINT_FREQ)
    guard = NonFiniteGuard(config.TRAIN.MAX_NONFINITE_STEPS, logger)
    plain_config = config_to_dict(config)
    logger.info("start training")
    start_time = time.time()
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        # Seeding per epoch (and rank) makes a resumed run draw the same augmentations, drop
        # paths and mixes as an uninterrupted one.
        seed_everything(config.SEED + 10007 * epoch + ctx.rank)
        loaders.loader_train.sampler.set_epoch(epoch)
        train_loss = train_one_epoch(
            runner, criterion, loaders.loader_train, optimizer, scheduler, scaler, ema,
            loaders.mixup_fn, epoch, config.TRAIN.EPOCHS, steps_per_epoch, settings, guard,
            ctx.device, logger, tb_writer)
        if loaders.dataset_train.num_unreadable:
            logger.warning(f"{loaders.dataset_train.num_unreadable} unreadable training images "
                           f"skipped so far by this process")

        result = evaluate(runner, loaders.loader_val, ctx.device, amp_dtype)
        log_accuracy(logger, result)
        ema_result = evaluate(ema.module, loaders.loader_val, ctx.device, amp_dtype) \
            if ema is not None else None
        if ema_result is not None:
            log_accuracy(logger, ema_result, 'EMA network')
        is_best = result.acc1 > max_accuracy
        max_accuracy = max(max_accuracy, result.acc1)
        logger.info(f'Max accuracy: {max_accuracy:.2f}%')

        if ctx.is_main:
            state = training_state(model, optimizer, scheduler, scaler, ema, epoch,
                                   max_accuracy, plain_config)
            if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
                path = os.path.join(out_dir, epoch_checkpoint_name(epoch))
                save_checkpoint(state, path)
                logger.info(f"saved {path}")
            if is_best:
                save_checkpoint(state, os.path.join(out_dir, BEST_CHECKPOINT))
            append_jsonl(os.path.join(out_dir, 'metrics.jsonl'), {
                'epoch': epoch, 'acc1': result.acc1, 'acc5': result.acc5, 'loss': result.loss,
                'max_acc1': max_accuracy,
                'ema_acc1': ema_result.acc1 if ema_result is not None else None,
                'train_loss': train_loss, 'lr': optimizer.param_groups[0]['lr'],
                'num_images': result.num_images})
            for name, value in (('val/acc1', result.acc1), ('val/acc5', result.acc5),
                                ('val/loss', result.loss)):
                tb_writer.add_scalar(name, value, epoch)
            if ema_result is not None:
                tb_writer.add_scalar('val/ema_acc1', ema_result.acc1, epoch)
            tb_writer.flush()
        barrier()
    if tb_writer is not None:
        tb_writer.close()
    logger.info(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def main(argv: Optional[List[str]] = None) -> int:
    """Run and return the exit status: 0, or 1 with one line on stderr for a user error."""
    args = parse_args(argv)
    finished = False
    try:
        run(args)
        finished = True
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        cleanup(finished)
    return 0


if __name__ == '__main__':
    sys.exit(main())
