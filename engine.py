"""One training epoch, evaluation and throughput measurement: plain functions with explicit
arguments, so that they run the same under DDP, on one GPU and on a CPU in a test."""
import contextlib
import datetime
import logging
import math
import resource
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from timm.utils import AverageMeter
from torch import nn

from data.images import DataError
from distributed import all_reduce_sum
from utils import UserError


class NonFiniteLossError(UserError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass(frozen=True)
class StepSettings:
    """How a batch becomes an optimizer step.

    accumulation_steps: micro-batches per optimizer step (the loss is divided by it).
    clip_grad: gradient-norm clipping threshold; 0 means no clipping.
    amp_dtype: autocast dtype, or None for full precision.
    print_freq: log every this many optimizer steps.
    """
    accumulation_steps: int = 1
    clip_grad: float = 0.0
    amp_dtype: Optional[torch.dtype] = None
    print_freq: int = 100


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss (or, without a gradient scaler, a
    non-finite gradient norm) and raises once `limit` of them come in a row. The streak carries
    over epoch boundaries; one good step resets it."""

    def __init__(self, limit: int, logger: logging.Logger) -> None:
        self.limit = limit
        self.streak = 0
        self.logger = logger

    def record(self, step_ok: bool, epoch: int, step: int, what: str) -> None:
        if step_ok:
            self.streak = 0
            return
        self.streak += 1
        self.logger.warning(f"epoch {epoch} step {step}: non-finite {what}, optimizer step "
                            f"skipped ({self.streak} in a row, stopping at {self.limit})")
        if self.streak >= self.limit:
            raise NonFiniteLossError(
                f"training diverged: {self.streak} optimizer steps in a row had a non-finite "
                f"{what} (epoch {epoch}, step {step}); stopped without saving, the last "
                f"checkpoint is the last good state. Lower TRAIN.BASE_LR, check the data, or "
                f"try AMP_DTYPE bf16/none")


@dataclass
class EvalResult:
    acc1: float
    acc5: float
    loss: float
    num_images: int


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                          enabled=amp_dtype is not None)


def memory_used_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on a CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class StepResult:
    """What an optimizer step brings to the host, in its one sync.

    loss: the step's loss in this process (the mean over its micro-batches).
    grad_norm: the total norm of the all-reduced (and unscaled) gradients, before clipping.
    non_finite_losses: how many processes had a non-finite loss: with a grad scaler counted over
        all processes, without one in this process only (0 or 1).
    """
    loss: float
    grad_norm: float
    non_finite_losses: int

    @property
    def taken(self) -> bool:
        """Whether the optimizer stepped: whether the gradient norm is finite."""
        return math.isfinite(self.grad_norm)


def optimizer_step(optimizer: torch.optim.Optimizer, params: List[torch.Tensor],
                   scaler: Optional[torch.amp.GradScaler], clip_grad: float,
                   losses: List[torch.Tensor]) -> StepResult:
    """Clip the accumulated gradients of `params` at `clip_grad` (0: no clipping), step the
    optimizer if their norm is finite, and zero them; `losses` are the step's micro-batch losses
    (device scalars). The one host sync of the step fetches its `StepResult` and decides.

    A non-finite loss makes its gradients non-finite, and DDP's all-reduce (after the last
    micro-batch; the inner ones accumulate under no_sync) carries them into every process's
    gradients: the norm, the same everywhere, decides alike in every process. With a grad scaler
    (fp16), overflowing gradients skip steps too, which is how it finds its scale, so only the
    count of non-finite losses, summed over processes (one all-reduce, no host sync), tells a
    diverging step. `GradScaler.step` would fetch the scaler's own inf check (a second sync): the
    norm decides instead (it is not finite when a gradient is not), and `GradScaler.update` lowers
    the scale from that check on the device.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else float('inf'))
    loss = torch.stack(losses).mean()
    non_finite = (~torch.isfinite(loss)).float()
    if scaler is not None:
        all_reduce_sum(non_finite)
    loss, grad_norm, non_finite = torch.stack([loss, grad_norm.to(loss), non_finite]).tolist()
    result = StepResult(loss, grad_norm, int(non_finite))
    if result.taken:
        optimizer.step()
    if scaler is not None:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return result


def train_one_epoch(*, model: nn.Module, criterion: Callable, loader,
                    optimizer: torch.optim.Optimizer, scheduler,
                    scaler: Optional[torch.amp.GradScaler] = None, ema=None,
                    mixup_fn: Optional[Callable] = None, epoch: int, num_epochs: int,
                    steps_per_epoch: int, settings: StepSettings, guard: NonFiniteGuard,
                    device: torch.device, logger: logging.Logger, tb_writer=None) -> float:
    """Train for `steps_per_epoch` optimizer steps of `settings.accumulation_steps` batches
    each; return the mean loss of the steps taken. Keyword arguments only: sixteen of them
    are too many to pass by position.

    `model` may be DDP-wrapped (inner micro-batches run under `no_sync`) and/or compiled;
    `ema.update` receives the unwrapped module. The scheduler advances once per optimizer
    step, skipped or not, to global step `epoch * steps_per_epoch + step + 1`, so the schedule
    follows the data seen. `epoch` of `num_epochs` is for the log.

    The host waits for the device once per optimizer step (`optimizer_step`); the log, the
    meters and TensorBoard take the values it fetched. A step skipped for a non-finite loss (or,
    without a grad scaler, a non-finite gradient norm) counts towards `guard`'s limit, in every
    process alike; one the grad scaler skips for overflowing gradients counts its loss but no
    gradient norm and no EMA update, since the weights did not change.
    """
    model.train()
    accumulation = settings.accumulation_steps
    params = [p for group in optimizer.param_groups for p in group['params']]
    module = getattr(model, 'module', model)
    no_sync = getattr(model, 'no_sync', None)
    loss_meter, norm_meter, step_time = AverageMeter(), AverageMeter(), AverageMeter()
    optimizer.zero_grad(set_to_none=True)
    start = end = time.time()
    batches = iter(loader)
    for step in range(steps_per_epoch):
        losses = []
        for micro in range(accumulation):
            batch = next(batches)
            if batch is None:
                raise DataError("every image of a training batch is unreadable "
                                "(see the warnings above for the files)")
            images, targets = batch
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if mixup_fn is not None:
                images, targets = mixup_fn(images, targets)
            inner = micro < accumulation - 1
            sync_context = no_sync() if inner and no_sync is not None else contextlib.nullcontext()
            with sync_context:
                with autocast(device, settings.amp_dtype):
                    outputs = model(images)
                loss = criterion(outputs.float(), targets)
                scaled = loss / accumulation
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            losses.append(loss.detach())

        result = optimizer_step(optimizer, params, scaler, settings.clip_grad, losses)
        step_ok = result.taken or (scaler is not None and result.non_finite_losses == 0)
        global_step = epoch * steps_per_epoch + step + 1
        scheduler.step_update(num_updates=global_step)
        guard.record(step_ok, epoch, step, 'loss' if result.non_finite_losses else 'gradient norm')
        if step_ok:
            loss_meter.update(result.loss)
            if tb_writer is not None:
                tb_writer.add_scalar('train/loss', result.loss, global_step)
                tb_writer.add_scalar('train/lr', optimizer.param_groups[0]['lr'], global_step)
        if result.taken:  # the weights changed
            if ema is not None:
                ema.update(module, step=global_step)
            norm_meter.update(result.grad_norm)
            if tb_writer is not None:
                tb_writer.add_scalar('train/grad_norm', result.grad_norm, global_step)
        step_time.update(time.time() - end)
        end = time.time()

        if step % settings.print_freq == 0 or step == steps_per_epoch - 1:
            eta = datetime.timedelta(seconds=int(step_time.avg * (steps_per_epoch - step - 1)))
            logger.info(
                f'Train: [{epoch}/{num_epochs}][{step}/{steps_per_epoch}]\t'
                f'eta {eta} lr {optimizer.param_groups[0]["lr"]:.6f}\t'
                f'time {step_time.val:.4f} ({step_time.avg:.4f})\t'
                f'loss {loss_meter.val:.4f} ({loss_meter.avg:.4f})\t'
                f'grad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})\t'
                f'mem {memory_used_mb(device):.0f}MB')
    logger.info(f"EPOCH {epoch} training takes "
                f"{datetime.timedelta(seconds=int(time.time() - start))}")
    return loss_meter.avg


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None) -> EvalResult:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the whole validation set.

    Each process evaluates its own shard; correct counts, loss sums and image counts are
    summed over processes (the one collective call), so every image counts exactly once
    whatever the shard sizes, including empty ones. So `model` must make no collective calls
    of its own: pass the unwrapped model, not the DDP wrapper, whose forward broadcasts buffers
    and would wait for processes that have fewer batches. Top-5 becomes top-k with k = number
    of classes when there are fewer than five.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, n
    for batch in loader:
        if batch is None:
            continue
        images, targets = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            outputs = model(images)
        outputs = outputs.float()
        k = min(5, outputs.shape[1])
        top = outputs.topk(k, dim=1).indices
        hits = top == targets[:, None]
        totals += torch.stack([
            hits[:, 0].sum(), hits.any(dim=1).sum(),
            nn.functional.cross_entropy(outputs, targets, reduction='sum'),
            torch.tensor(len(targets), device=device),
        ]).to(totals)
    all_reduce_sum(totals)
    correct1, correct5, loss_sum, count = totals.tolist()
    if count == 0:
        raise DataError("no validation image could be read")
    return EvalResult(acc1=100.0 * correct1 / count, acc5=100.0 * correct5 / count,
                      loss=loss_sum / count, num_images=int(count))


def throughput_batch(dataset, batch_size: int) -> Tuple[torch.Tensor, int]:
    """A batch of `batch_size` images for `measure_throughput`: the first readable images of
    `dataset` (items `(image, target)` or None), repeated when it holds fewer, so that the
    batch measured is the one asked for, and every process gets it whatever its validation
    shard holds. Returns the batch (B, C, H, W) and the number of distinct images in it."""
    images = []
    for index in range(len(dataset)):
        item = dataset[index]
        if item is not None:
            images.append(item[0])
            if len(images) == batch_size:
                break
    if not images:
        raise DataError("no validation image could be read to measure the throughput on")
    distinct = torch.stack(images)
    repeats = -(-batch_size // len(images))
    return distinct.repeat(repeats, 1, 1, 1)[:batch_size], len(images)


@torch.no_grad()
def measure_throughput(model: nn.Module, images: torch.Tensor, device: torch.device,
                       amp_dtype: Optional[torch.dtype] = None, warmup_iters: int = 50,
                       timed_iters: int = 30) -> float:
    """Forward-pass images per second on the batch `images`, after `warmup_iters` passes.
    `model` must make no collective calls (not DDP-wrapped): processes measure independently."""
    model.eval()
    images = images.to(device, non_blocking=True)
    with autocast(device, amp_dtype):
        for _ in range(warmup_iters):
            model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.time()
        for _ in range(timed_iters):
            model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    return timed_iters * images.shape[0] / (time.time() - start)
