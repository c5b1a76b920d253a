"""Train or evaluate a Focal Transformer (or a timm baseline) on ImageNet-style data.

    python main.py --cfg configs/demo.yaml                        # built-in demo, CPU or GPU
    torchrun --nproc_per_node 8 main.py --cfg configs/focal_tiny.yaml --data-path /imagenet
    python -m torch.distributed.launch --nproc_per_node 8 main.py --cfg ... --data-path ...
    python main.py --cfg configs/focal_tiny.yaml --data-path /imagenet --eval --resume CKPT

A run reads its config, joins the process group, builds data, model, optimizer and schedule,
resumes from its newest checkpoint if there is one, then alternates training epochs with
evaluations, saving checkpoints, metrics and TensorBoard scalars in OUTPUT/MODEL.NAME/TAG.

The config stays as the user gave it (file, --opts and flags): what the run derives from it
(the class count of the data, the learning rates scaled to the total batch) is applied beside
it and recorded next to it, so that config.yaml and the checkpoints hold the same config and a
run from either derives the same values again.
"""
import argparse
import copy
import datetime
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from yacs.config import CfgNode as CN

from checkpoint import (BEST_CHECKPOINT, TrainingParts, epoch_checkpoint_name, load_for_evaluation,
                        load_pretrained, non_finite_tensors, read_checkpoint, training_state)
from config import ConfigError, accumulation_steps, config_record, config_to_dict, defaults_note, get_config
from data import Loaders, build_loader, loader_worker_deaths_reported, prepare_demo_data
from distributed import (DistContext, barrier, broadcast_buffers, check_processes_agree,
                         init_distributed, leave_process_group, stop_watching, writing_files)
from engine import (EvalResult, NonFiniteGuard, StepSettings, evaluate, measure_throughput,
                    throughput_batch, train_one_epoch)
from lr_scheduler import build_scheduler, scaled_learning_rates
from models import build_model
from optimizer import build_optimizer
from resume import Progress, flatten, resume_training
from run_outputs import RunOutputs
from utils import UserError, code_version, run_folder, seed_everything

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


def with_num_classes(config: CN, num_classes: int) -> CN:
    """A frozen copy of `config` for building the model with the class count of the data,
    which the saved config does not take (see the module's docstring)."""
    model_config = config.clone()
    model_config.defrost()
    model_config.MODEL.NUM_CLASSES = num_classes
    model_config.freeze()
    return model_config


def build_criterion(config: CN, mixup_active: bool) -> torch.nn.Module:
    """Soft-target cross entropy with mixup/cutmix (which also smooths labels), else label
    smoothing, else plain cross entropy."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return torch.nn.CrossEntropyLoss()


def log_accuracy(logger, result: EvalResult, what: str = 'network') -> None:
    logger.info(f' * Acc@1 {result.acc1:.3f} Acc@5 {result.acc5:.3f}')
    logger.info(f'Accuracy of the {what} on the {result.num_images} test images: '
                f'{result.acc1:.1f}%, loss {result.loss:.4f}')


class TrainingDivergedError(UserError):
    """An epoch ended with non-finite weights, optimizer state or validation loss."""


@dataclass
class RunSetup:
    """What every mode of a run works with: the config in force (as given), the process group,
    the logger, the data, the model (with the data's class count), the module that trains on
    batches (the model, DDP-wrapped and/or compiled) and the one that evaluates them (the
    model, compiled or not, never DDP-wrapped: processes evaluate different numbers of
    batches, see `engine.evaluate`)."""
    config: CN
    ctx: DistContext
    logger: logging.Logger
    loaders: Loaders
    model: torch.nn.Module
    runner: torch.nn.Module
    evaluator: torch.nn.Module
    amp_dtype: Optional[torch.dtype]


def run(args: argparse.Namespace) -> None:
    """Set up, then measure throughput, evaluate a checkpoint, or train."""
    config = get_config(args)
    if config.EVAL_MODE and not config.MODEL.RESUME:
        raise ConfigError("--eval needs a checkpoint to evaluate: pass --resume CKPT")
    ctx = init_distributed(args.local_rank, args.device)
    if ctx.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN picks its fastest convolutions once
    seed_everything(config.SEED + ctx.rank)
    with RunOutputs(run_folder(config), ctx.is_main) as outputs:
        logger = outputs.create_logger(ctx.rank)
        logger.info(f"run folder {outputs.folder}, process {ctx.rank}/{ctx.world_size} on "
                    f"{ctx.device}")
        if ctx.is_main:
            logger.log(*defaults_note(config, args.cfg))
        for path in outputs.remove_stale_temporary_files():
            logger.info(f"removed {path}, the partial file of a save that was interrupted")
        # --eval: the checkpoint's class list (ours store one) orders the validation classes.
        checkpoint = read_checkpoint(config.MODEL.RESUME) if config.EVAL_MODE else None
        setup = set_up(config, ctx, logger, outputs,
                       classes=checkpoint.get('classes') if checkpoint else None)
        with loader_worker_deaths_reported():
            if config.THROUGHPUT_MODE:
                measure(setup, outputs)
            elif config.EVAL_MODE:
                evaluate_checkpoint(setup, outputs, checkpoint)
            else:
                train(setup, outputs)


# Config keys that may differ between the processes of a job: a machine's own paths (the data
# itself is compared) and the unused official LOCAL_RANK.
PER_PROCESS_KEYS = ('DATA.DATA_PATH', 'DATA.DEMO.ROOT', 'LOCAL_RANK')


def job_facts(config: CN, loaders: Loaders) -> Dict[str, Any]:
    """What every process of a job must hold alike (`check_processes_agree`): the class names in
    the order of the model's outputs, the dataset sizes, the config keys (but PER_PROCESS_KEYS)
    and the code version."""
    facts = {
        'the class names': list(loaders.classes),
        'the number of training images': len(loaders.dataset_train) if loaders.dataset_train else None,
        'the number of validation images': len(loaders.dataset_val),
    }
    facts.update((f'config key {key}', value) for key, value in flatten(config_to_dict(config)).items()
                 if key not in PER_PROCESS_KEYS)
    facts['the code version'] = code_version()
    return facts


def set_up(config: CN, ctx: DistContext, logger: logging.Logger, outputs: RunOutputs,
           classes: Optional[List[str]] = None) -> RunSetup:
    """Data (the user's folders or zips, or the built-in demo dataset), the model at the
    data's class count and its precision, and the modules that train and evaluate on batches."""
    if not config.DATA.DATA_PATH:
        demo_path, written = prepare_demo_data(config)
        logger.info(f"no --data-path given: using the built-in demo dataset (10 classes of "
                    f"procedural shapes) {'written to' if written else 'cached in'} {demo_path}")
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    loaders = build_loader(config, ctx.rank, ctx.world_size, with_train=training,
                           classes=classes)
    if ctx.world_size > 1:
        check_processes_agree(job_facts(config, loaders))
    if loaders.num_classes != config.MODEL.NUM_CLASSES:
        logger.info(f"the model has {loaders.num_classes} outputs, the number of classes in the "
                    f"{'training data' if training else 'checkpoint or validation data'}, not "
                    f"MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES}")
    logger.info(f"{len(loaders.dataset_train) if training else 'no'} training and "
                f"{len(loaders.dataset_val)} validation images in {loaders.num_classes} classes")

    try:
        model = build_model(with_num_classes(config, loaders.num_classes))
    except TypeError as error:  # arguments in MODEL.TIMM.KWARGS that the timm model lacks
        if config.MODEL.TYPE != 'timm':
            raise
        raise ConfigError(f"MODEL.TIMM.KWARGS do not fit timm model {config.MODEL.TIMM.NAME!r}: "
                          f"{error}") from None
    logger.info(f"{config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                f"parameters")
    if config.MODEL.PRETRAINED:
        logger.info(f"fine-tuning from {config.MODEL.PRETRAINED}: its weights, adapted where this "
                    f"model differs (a warning for each change)")
        load_pretrained(config.MODEL.PRETRAINED, model)
    logger.info(config.dump())  # after the lines above, which say what the run starts from
    model.to(ctx.device)
    amp_dtype = resolve_amp_dtype(config, ctx.device)
    logger.info(f"mixed precision: {amp_dtype or 'off'}")
    compile_model = torch.compile if config.COMPILE else (lambda module: module)
    evaluator = compile_model(model)
    runner = evaluator
    if ctx.world_size > 1 and training:
        runner = compile_model(torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == 'cuda' else None))
    return RunSetup(config, ctx, logger, loaders, model, runner, evaluator, amp_dtype)


def measure(setup: RunSetup, outputs: RunOutputs) -> None:
    """--throughput: forward images per second on a batch of DATA.BATCH_SIZE validation images
    (in every process, whatever its validation shard holds)."""
    images, distinct = throughput_batch(setup.loaders.dataset_val, setup.config.DATA.BATCH_SIZE)
    if distinct < len(images):
        setup.logger.info(f"the batch of {len(images)} repeats the {distinct} validation images "
                          f"there are")
    images_per_second = measure_throughput(setup.evaluator, images, setup.ctx.device,
                                           setup.amp_dtype)
    setup.logger.info(f"batch_size {len(images)} throughput {images_per_second:.2f}")
    outputs.append_metrics({'throughput': images_per_second, 'batch_size': len(images),
                            'distinct_images': distinct, 'processes': setup.ctx.world_size})
    outputs.add_scalars({'throughput': images_per_second}, len(images))
    outputs.write_config('throughput', config_record(setup.config),
                         {'MODEL.NUM_CLASSES': setup.loaders.num_classes,
                          'processes': setup.ctx.world_size})


def evaluate_checkpoint(setup: RunSetup, outputs: RunOutputs, checkpoint: dict) -> None:
    """--eval: the accuracy of the weights of MODEL.RESUME. With --model-ema, of the EMA weights
    it holds; otherwise of its model weights and, where it holds EMA weights too, of those as
    well, as training reports both."""
    path = setup.config.MODEL.RESUME
    ema_only = setup.config.TRAIN.EMA.ENABLE
    load_for_evaluation(path, setup.model, checkpoint, ema=ema_only)
    setup.logger.info(f"evaluating {'the EMA weights of ' if ema_only else ''}{path}")
    result = evaluate(setup.evaluator, setup.loaders.loader_val, setup.ctx.device,
                      setup.amp_dtype)
    log_accuracy(setup.logger, result, 'EMA network' if ema_only else 'network')
    ema_result = result if ema_only else None
    if not ema_only and checkpoint.get('ema'):
        ema_model = copy.deepcopy(setup.model)
        load_for_evaluation(path, ema_model, checkpoint, ema=True)
        ema_result = evaluate(ema_model, setup.loaders.loader_val, setup.ctx.device,
                              setup.amp_dtype)
        log_accuracy(setup.logger, ema_result, 'EMA network')
    trained_epochs = checkpoint.get('epoch')
    outputs.append_metrics({
        'epoch': trained_epochs if isinstance(trained_epochs, int) else None,
        'acc1': result.acc1, 'acc5': result.acc5, 'loss': result.loss, 'max_acc1': result.acc1,
        'ema_acc1': ema_result.acc1 if ema_result is not None else None,
        'num_images': result.num_images, 'checkpoint': path,
        'weights': 'ema' if ema_only else 'model'})
    outputs.write_config('eval', config_record(setup.config),
                         {'MODEL.NUM_CLASSES': setup.loaders.num_classes,
                          'processes': setup.ctx.world_size})


@dataclass
class Training:
    """What training builds from the config before its first epoch: the parts a checkpoint
    saves, the schedule, the loss, how batches become optimizer steps, and the config record
    with the values the run derived from it (see the module's docstring)."""
    parts: TrainingParts
    scheduler: Any
    criterion: torch.nn.Module
    settings: StepSettings
    steps_per_epoch: int
    record: Dict[str, Any]
    derived: Dict[str, Any]


def build_training(setup: RunSetup) -> Training:
    """Learning rates scaled to the total batch, optimizer, schedule, loss, grad scaler (fp16)
    and EMA."""
    config, ctx, loaders, model = setup.config, setup.ctx, setup.loaders, setup.model
    accumulation = accumulation_steps(config)
    steps_per_epoch = len(loaders.loader_train) // accumulation
    if steps_per_epoch == 0:
        raise ConfigError(
            f"one optimizer step needs {config.DATA.BATCH_SIZE * accumulation * ctx.world_size} "
            f"training images (batch x accumulation x processes) but there are only "
            f"{len(loaders.dataset_train)}: lower --batch-size or --accumulation-steps")
    rates = scaled_learning_rates(config, config.DATA.BATCH_SIZE * ctx.world_size * accumulation)
    setup.logger.info(f"learning rates for the total batch of {rates.total_batch}: base "
                      f"{rates.base:.3e}, warm-up {rates.warmup:.3e}, min {rates.min:.3e}")
    derived = {'MODEL.NUM_CLASSES': loaders.num_classes, 'TRAIN.BASE_LR': rates.base,
               'TRAIN.WARMUP_LR': rates.warmup, 'TRAIN.MIN_LR': rates.min,
               'total_batch': rates.total_batch, 'processes': ctx.world_size,
               'accumulation_steps': accumulation, 'steps_per_epoch': steps_per_epoch}
    optimizer = build_optimizer(config, model, rates.base)
    scaler = torch.amp.GradScaler(ctx.device.type) if setup.amp_dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    return Training(
        parts=TrainingParts(model, optimizer, scaler, ema),
        scheduler=build_scheduler(config, optimizer, steps_per_epoch, rates),
        criterion=build_criterion(config, loaders.mixup_fn is not None),
        settings=StepSettings(accumulation_steps=accumulation, clip_grad=config.TRAIN.CLIP_GRAD,
                              amp_dtype=setup.amp_dtype, print_freq=config.PRINT_FREQ),
        steps_per_epoch=steps_per_epoch, record=config_record(config), derived=derived)


def resume_or_start(setup: RunSetup, outputs: RunOutputs, training: Training) -> Progress:
    """Restore the newest training state (`resume_training`) or start afresh; drop the metrics
    records of the epochs trained again, write config.yaml and set the schedule to the start."""
    progress = resume_training(outputs, setup.config, training.parts, setup.loaders.classes,
                               training.record, training.derived, setup.logger)
    retrained = outputs.drop_training_metrics_from(progress.start_epoch)
    if retrained:
        setup.logger.info(f"metrics.jsonl: removed the records of epochs {retrained}, which this "
                          f"run trains again (they were not checkpointed)")
    outputs.write_config('train', training.record, training.derived)
    training.scheduler.step_update(num_updates=progress.start_epoch * training.steps_per_epoch)
    return progress


def train_epoch(setup: RunSetup, outputs: RunOutputs, training: Training, guard: NonFiniteGuard,
                epoch: int) -> float:
    """Train `epoch`; return its mean training loss. Seeding per epoch (and rank; workers also
    by their id) makes a resumed run draw the same augmentations, drop paths and mixes as an
    uninterrupted one."""
    config, loaders = setup.config, setup.loaders
    seed_everything(config.SEED + 10007 * epoch + setup.ctx.rank)
    loaders.set_epoch(epoch)
    parts = training.parts
    train_loss = train_one_epoch(
        model=setup.runner, criterion=training.criterion, loader=loaders.loader_train,
        optimizer=parts.optimizer, scheduler=training.scheduler, scaler=parts.scaler, ema=parts.ema,
        mixup_fn=loaders.mixup_fn, epoch=epoch, num_epochs=config.TRAIN.EPOCHS,
        steps_per_epoch=training.steps_per_epoch, settings=training.settings, guard=guard,
        device=setup.ctx.device, logger=setup.logger, tb_writer=outputs.tb_writer)
    if loaders.dataset_train.num_unreadable:
        setup.logger.warning(f"{loaders.dataset_train.num_unreadable} unreadable training images "
                             f"skipped so far by this process")
    return train_loss


def evaluate_epoch(setup: RunSetup, ema: Optional[ModelEmaV3]) -> Tuple[EvalResult, Optional[EvalResult]]:
    """The validation results of the model and of its EMA (None without one), each evaluated
    with the buffers of process 0, as DDP's forward uses them."""
    broadcast_buffers(setup.model)
    result = evaluate(setup.evaluator, setup.loaders.loader_val, setup.ctx.device, setup.amp_dtype)
    log_accuracy(setup.logger, result)
    if ema is None:
        return result, None
    broadcast_buffers(ema.module)
    ema_result = evaluate(ema.module, setup.loaders.loader_val, setup.ctx.device, setup.amp_dtype)
    log_accuracy(setup.logger, ema_result, 'EMA network')
    return result, ema_result


def end_epoch(setup: RunSetup, outputs: RunOutputs, training: Training, progress: Progress,
              epoch: int, train_loss: float) -> None:
    """Evaluate `epoch`, record its metrics, and save its checkpoint (every SAVE_FREQ epochs and
    after the last) and best.pth when it is the best so far (updating `progress`). An epoch whose
    training state or validation loss is not finite records its metrics and stops the run
    without saving."""
    config, logger, parts = setup.config, setup.logger, training.parts
    result, ema_result = evaluate_epoch(setup, parts.ema)
    state = training_state(parts, epoch, progress.max_accuracy, progress.best_epoch,
                           training.record, training.derived, setup.loaders.classes)
    non_finite = non_finite_tensors(state)
    diverged = bool(non_finite) or not math.isfinite(result.loss)
    is_best = not diverged and result.acc1 > progress.max_accuracy
    if is_best:
        progress.max_accuracy, progress.best_epoch = result.acc1, epoch
        state.update(max_accuracy=result.acc1, best_epoch=epoch)
    logger.info(f'Max accuracy: {progress.max_accuracy:.2f}%')

    # Metrics first: a run killed before its checkpoint trains this epoch again and
    # replaces them; one killed after it has them. A peer's failure waits for the writes.
    with writing_files():
        outputs.append_metrics({
            'epoch': epoch, 'acc1': result.acc1, 'acc5': result.acc5, 'loss': result.loss,
            'max_acc1': progress.max_accuracy,
            'ema_acc1': ema_result.acc1 if ema_result is not None else None,
            'train_loss': train_loss, 'lr': parts.optimizer.param_groups[0]['lr'],
            'num_images': result.num_images})
        scalars = {'val/acc1': result.acc1, 'val/acc5': result.acc5, 'val/loss': result.loss}
        if ema_result is not None:
            scalars['val/ema_acc1'] = ema_result.acc1
        outputs.add_scalars(scalars, epoch)
        if diverged:
            what = f"{len(non_finite)} tensors of the training state (e.g. {non_finite[0]})" \
                if non_finite else "the validation loss"
            raise TrainingDivergedError(
                f"training diverged in epoch {epoch}: {what} not finite; stopped without "
                f"saving, so the last checkpoint is the last good state. Lower TRAIN.BASE_LR, "
                f"check the data, or try AMP_DTYPE bf16/none")
        if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
            path = outputs.save_checkpoint(state, epoch_checkpoint_name(epoch))
            logger.info(f"saved {path}")
        if is_best:
            outputs.save_checkpoint(state, BEST_CHECKPOINT)


def train(setup: RunSetup, outputs: RunOutputs) -> None:
    """Build the training (`build_training`), resume or start (`resume_or_start`), then per
    epoch: train (`train_epoch`), then evaluate, record and save (`end_epoch`)."""
    training = build_training(setup)
    progress = resume_or_start(setup, outputs, training)
    guard = NonFiniteGuard(setup.config.TRAIN.MAX_NONFINITE_STEPS, setup.logger)
    setup.logger.info("start training")
    start_time = time.time()
    for epoch in range(progress.start_epoch, setup.config.TRAIN.EPOCHS):
        train_loss = train_epoch(setup, outputs, training, guard, epoch)
        end_epoch(setup, outputs, training, progress, epoch, train_loss)
        barrier()
    setup.logger.info(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def main(argv: Optional[List[str]] = None) -> int:
    """Run and return the exit status: 0, or 1 with one line on stderr for a user error. A
    process that fails tells the others of its process group, which then stop too."""
    args = parse_args(argv)
    try:
        run(args)
    except UserError as error:
        stop_watching()
        print(f"error: {error}", file=sys.stderr, flush=True)
        leave_process_group(failure=str(error))
        return 1
    except BaseException as error:  # a bug (or an interruption): it keeps its traceback
        stop_watching()
        summary = (str(error).strip().splitlines() or [''])[0]
        leave_process_group(failure=f"{type(error).__name__}: {summary} (see that process's "
                                    f"traceback)")
        raise
    leave_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
