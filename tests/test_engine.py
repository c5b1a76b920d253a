"""Unit tests of the training step, optimizer groups, schedule and samplers on toy models."""
import logging
import math

import pytest
import torch
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
    def __init__(self) -> None:
        self.updates = []

    def step_update(self, num_updates: int) -> None:
        self.updates.append(num_updates)


def run_epoch(model, batches, accumulation=1, scaler=None, amp_dtype=None, limit=3, ema=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = RecordingScheduler()
    guard = NonFiniteGuard(limit, LOGGER)
    train_one_epoch(model=model, criterion=nn.CrossEntropyLoss(), loader=batches, optimizer=optimizer,
                    scheduler=scheduler, scaler=scaler, ema=ema, epoch=0, num_epochs=1,
                    steps_per_epoch=len(batches) // accumulation,
                    settings=StepSettings(accumulation_steps=accumulation, amp_dtype=amp_dtype),
                    guard=guard, device=torch.device('cpu'), logger=LOGGER)
    return scheduler.updates


def test_accumulated_micro_batches_equal_one_large_batch():
    torch.manual_seed(0)
    accumulated, whole = ToyClassifier(), ToyClassifier()
    whole.load_state_dict(accumulated.state_dict())
    small = toy_batches(4, 4)
    large = [(torch.cat([small[0][0], small[1][0]]), torch.cat([small[0][1], small[1][1]])),
             (torch.cat([small[2][0], small[3][0]]), torch.cat([small[2][1], small[3][1]]))]
    updates = run_epoch(accumulated, small, accumulation=2)
    run_epoch(whole, large, accumulation=1)
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


def test_consecutive_non_finite_steps_stop_training():
    model = ToyClassifier()
    model.register_forward_hook(lambda module, inputs, output: output * float('inf'))
    with pytest.raises(NonFiniteLossError, match='3 optimizer steps in a row'):
        run_epoch(model, toy_batches(5, 4), limit=3)


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
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        train_one_epoch(model=model, criterion=nn.CrossEntropyLoss(), loader=toy_batches(3, 4),
                        optimizer=optimizer, scheduler=RecordingScheduler(), scaler=scaler,
                        epoch=0, num_epochs=1, steps_per_epoch=3,
                        settings=StepSettings(amp_dtype=torch.float16, print_freq=1),
                        guard=NonFiniteGuard(3, LOGGER), device=torch.device('cpu'), logger=LOGGER,
                        tb_writer=writer)
    assert scaler.get_scale() == 2.0 ** 7, "the overflow lowered the scale"
    assert len(writer.scalars['train/loss']) == 3 and len(writer.scalars['train/grad_norm']) == 2
    assert all(math.isfinite(norm) for norm in writer.scalars['train/grad_norm'])
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Train:')][-1]
    assert 'inf' not in last.split('grad_norm')[1], last


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
