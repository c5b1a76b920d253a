"""Unit tests of the training step, optimizer groups, schedule and samplers on toy models."""
import logging
import math
from typing import Optional

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn

from config import get_config
from data.samplers import ShardRandomSampler, ShardSampler
from engine import NonFiniteGuard, NonFiniteLossError, StepSettings, evaluate, train_one_epoch
from lr_scheduler import build_scheduler, scaled_learning_rates
from optimizer import build_optimizer

LOGGER = logging.getLogger('test_engine')


class ToyClassifier(nn.Module):
    """A LayerNorm + Linear classifier on 4-D 'images' (no batch statistics, so accumulated
    micro-batches give exactly the gradient of the whole batch)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, num_classes)
        self.pos_table = nn.Parameter(torch.zeros(4, 4))

    def no_weight_decay(self):
        return {'pos_table'}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x.flatten(1))) + self.pos_table.sum()


def toy_batches(num_batches: int, batch_size: int, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_batches * batch_size, 3, 2, 2, generator=generator)
    targets = torch.randint(0, 3, (num_batches * batch_size,), generator=generator)
    return [(images[i:i + batch_size], targets[i:i + batch_size])
            for i in range(0, len(images), batch_size)]


class RecordingScheduler:
    """Records its updates, and marks each in `events` (a list shared with `host_syncs`) when given."""

    def __init__(self, events: Optional[list] = None) -> None:
        self.updates = []
        self.events = events

    def step_update(self, num_updates: int) -> None:
        self.updates.append(num_updates)
        if self.events is not None:
            self.events.append('step')


def run_epoch(model, batches, scaler=None, limit=3, ema=None, scheduler=None, tb_writer=None, **settings):
    """One epoch of SGD over all of `batches`; `settings` are `StepSettings` fields. Returns the
    scheduler's updates."""
    settings = StepSettings(**settings)
    scheduler = scheduler or RecordingScheduler()
    train_one_epoch(model=model, criterion=nn.CrossEntropyLoss(), loader=batches,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=scheduler,
                    scaler=scaler, ema=ema, epoch=0, num_epochs=1,
                    steps_per_epoch=len(batches) // settings.accumulation_steps, settings=settings,
                    guard=NonFiniteGuard(limit, LOGGER), device=torch.device('cpu'), logger=LOGGER,
                    tb_writer=tb_writer)
    return scheduler.updates


def test_accumulated_micro_batches_equal_one_large_batch():
    torch.manual_seed(0)
    accumulated, whole = ToyClassifier(), ToyClassifier()
    whole.load_state_dict(accumulated.state_dict())
    small = toy_batches(4, 4)
    large = [(torch.cat([small[0][0], small[1][0]]), torch.cat([small[0][1], small[1][1]])),
             (torch.cat([small[2][0], small[3][0]]), torch.cat([small[2][1], small[3][1]]))]
    updates = run_epoch(accumulated, small, accumulation_steps=2)
    run_epoch(whole, large)
    assert updates == [1, 2], "the scheduler must advance once per optimizer step"
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], value, msg=name)


def test_single_non_finite_step_is_skipped_and_training_continues():
    model = ToyClassifier()
    calls = {'n': 0}

    def poison_first_batch(module, inputs, output):
        calls['n'] += 1
        return output * float('nan') if calls['n'] == 1 else output

    model.register_forward_hook(poison_first_batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = toy_batches(1, 4)
    run_epoch(model, batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), \
        "a step with a non-finite loss must not change the weights"
    run_epoch(model, toy_batches(2, 4))
    assert not torch.equal(before['head.weight'], model.state_dict()['head.weight'])


@pytest.mark.parametrize('amp_dtype', [None, torch.float16])
def test_consecutive_non_finite_steps_stop_training(amp_dtype):
    """Also with fp16, whose grad scaler skips the steps of overflowing gradients without counting
    them: a non-finite loss counts."""
    model = ToyClassifier()
    model.register_forward_hook(lambda module, inputs, output: output * float('inf'))
    scaler = torch.amp.GradScaler('cpu') if amp_dtype == torch.float16 else None
    with pytest.raises(NonFiniteLossError, match='3 optimizer steps in a row had a non-finite loss'):
        run_epoch(model, toy_batches(5, 4), scaler=scaler, limit=3, amp_dtype=amp_dtype)


def test_fp16_grad_scaler_steps_and_tracks_its_scale():
    model = ToyClassifier()
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8, growth_interval=1)
    before = model.head.weight.detach().clone()
    run_epoch(model, toy_batches(3, 4), scaler=scaler, amp_dtype=torch.float16)
    assert not torch.equal(before, model.head.weight)
    assert scaler.get_scale() == 2.0 ** 11, "three good steps grow the scale three times"


class RecordingWriter:
    def __init__(self) -> None:
        self.scalars = {}

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars.setdefault(name, []).append(value)


def test_a_step_the_grad_scaler_skips_reports_no_infinite_gradient_norm(caplog):
    """fp16 on a CPU: the scaler's first step overflows (as at a too large initial scale) and is
    skipped, lowering the scale; the epoch's gradient norm is that of the steps taken."""
    model = ToyClassifier()
    overflowed = []

    def overflow_once(grad):
        if not overflowed:
            overflowed.append(True)
            return grad * float('inf')
        return grad

    model.head.weight.register_hook(overflow_once)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
    writer = RecordingWriter()
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        run_epoch(model, toy_batches(3, 4), scaler=scaler, tb_writer=writer, amp_dtype=torch.float16,
                  print_freq=1)
    assert scaler.get_scale() == 2.0 ** 7, "the overflow lowered the scale"
    assert len(writer.scalars['train/loss']) == 3 and len(writer.scalars['train/grad_norm']) == 2
    assert all(math.isfinite(norm) for norm in writer.scalars['train/grad_norm'])
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Train:')][-1]
    assert 'inf' not in last.split('grad_norm')[1], last


# What waits for the device: reading a tensor's value on the host (on a GPU each of these waits for
# every kernel queued before it) and collective calls.
HOST_READS = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__', '__index__')
COLLECTIVES = ('all_reduce', 'all_gather', 'all_gather_into_tensor', 'all_gather_object', 'broadcast',
               'reduce', 'reduce_scatter', 'barrier')


@pytest.fixture
def host_syncs(monkeypatch) -> list:
    """A list in which every host read of a tensor (HOST_READS) and every collective call
    (COLLECTIVES) appends its name, in order, for the rest of the test."""
    events = []

    def recorded(owner, name):
        real = getattr(owner, name)

        def recording(*args, **kwargs):
            events.append(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, recording)

    for name in HOST_READS:
        recorded(torch.Tensor, name)
    for name in COLLECTIVES:
        recorded(torch.distributed, name)
    return events


@pytest.mark.parametrize('amp_dtype, accumulation, clip_grad', [
    (None, 2, 1.0), (torch.float16, 1, 0.0), (torch.bfloat16, 3, 0.0)])
def test_a_training_step_syncs_the_host_once(host_syncs, amp_dtype, accumulation, clip_grad):
    """One host sync per optimizer step, print steps included, whatever the precision,
    accumulation and clipping: the gradient norm and the loss come to the host together, and
    decide the step. Step 1 has a non-finite loss in its first micro-batch (it is skipped), and EMA,
    TensorBoard and the log take their values too."""
    model = ToyClassifier()
    forward_calls = []

    def non_finite_in_step_1(module, inputs, output):
        forward_calls.append(True)
        return output * float('nan') if len(forward_calls) == accumulation + 1 else output

    model.register_forward_hook(non_finite_in_step_1)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8) if amp_dtype == torch.float16 else None
    scheduler = RecordingScheduler(host_syncs)
    run_epoch(model, toy_batches(4 * accumulation, 4), scaler=scaler, ema=ModelEmaV3(model, decay=0.9),
              scheduler=scheduler, tb_writer=RecordingWriter(), accumulation_steps=accumulation,
              clip_grad=clip_grad, amp_dtype=amp_dtype, print_freq=2)
    per_step, count = [], 0
    for event in host_syncs:
        if event == 'step':
            per_step.append(count)
            count = 0
        else:
            count += 1
    assert scheduler.updates == [1, 2, 3, 4]
    assert per_step == [1, 1, 1, 1] and count == 0, host_syncs


def test_evaluate_counts_top1_top5_and_loss():
    model = ToyClassifier()
    batches = toy_batches(3, 5)
    result = evaluate(model, batches + [None], torch.device('cpu'))
    logits = torch.cat([model(images) for images, _ in batches])
    targets = torch.cat([t for _, t in batches])
    assert result.num_images == 15
    assert result.acc1 == pytest.approx(100 * (logits.argmax(1) == targets).float().mean().item())
    assert result.acc5 == 100.0, "top-5 of 3 classes always hits"
    assert result.loss == pytest.approx(nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)


def test_weight_decay_skips_norms_biases_and_model_skip_list():
    config = get_config()
    optimizer = build_optimizer(config, ToyClassifier(), lr=1e-3)
    decayed, exempt = optimizer.param_groups
    assert decayed['weight_decay'] == 0.05 and exempt['weight_decay'] == 0.0
    assert [p.shape for p in decayed['params']] == [torch.Size([3, 12])]
    assert len(exempt['params']) == 4  # norm weight, norm bias, head bias, pos_table


@pytest.mark.parametrize('warmup_prefix', [False, True])
def test_cosine_schedule_warms_up_then_decays_per_step(warmup_prefix):
    config = get_config()
    config.defrost()
    config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS = 4, 1
    config.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = warmup_prefix
    rates = scaled_learning_rates(config, total_batch=1024)
    assert (rates.base, rates.warmup, rates.min) == pytest.approx(
        (2 * config.TRAIN.BASE_LR, 2 * config.TRAIN.WARMUP_LR, 2 * config.TRAIN.MIN_LR))
    optimizer = build_optimizer(config, nn.Linear(1, 1), lr=rates.base)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=10, rates=rates)
    lrs = []
    for step in range(41):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]['lr'])
    assert lrs[0] == pytest.approx(rates.warmup)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])), "linear warm-up over the first epoch"
    peak = 1.0 if warmup_prefix else 0.5 * (1 + math.cos(math.pi * 10 / 40))
    assert lrs[10] == pytest.approx(rates.min + peak * (rates.base - rates.min))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "decay afterwards"
    assert lrs[40] == pytest.approx(rates.min), "minimum at the last step"


@pytest.mark.parametrize('num_samples, world_size', [(31, 2), (10, 3), (2, 4)])
def test_eval_shards_cover_every_index_exactly_once(num_samples, world_size):
    shards = [list(ShardSampler(num_samples, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(num_samples))


def test_shard_random_sampler_reshuffles_per_epoch_within_its_shard():
    sampler = ShardRandomSampler(range(0, 20, 2), seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(0, 20, 2)) and first != second
