"""Every GPU check and timing of the fused focal attention, with one table printed last.

  correctness  fused kernel and SDPA against a float64 reference: the attention op at every stage
               shape of Focal-T and Focal-B (fp32 with TF32 off, bf16), output and every gradient;
               the fused backward bitwise repeatable; a Focal-T training step (logits and every
               parameter gradient). Fresh random inputs for each check; PyTorch's deterministic mode
               fills every new tensor with NaN, so an output element a kernel never writes fails.
  speed        Focal-T training and inference images/s and peak memory: fused, SDPA, timm's Swin-T
               unfused (timm's default) and with SDPA; Focal-fast-T (SDPA); Focal-B vs Swin-B. bf16
               autocast, batch 128, 224 px.
  compiled     Focal-T fused under torch.compile: one training step against eager, and its speed
               against eager's (measured here when the speed part does not run in the same call).
  backbone     the Focal-T backbone's forward+backward at 800x1333 (fused, SDPA) against timm's Swin-T
               at the same padded size (800x1344).

Every row says which attention actually ran, read from the model after it ran; Swin rows name the
timm that built them.

    scripts/gpu_checks.sh correctness speed backbone  # the device tool's first call (DEVICE_CALLS)
    scripts/gpu_checks.sh compiled                    # its second call
    scripts/gpu_checks.sh all                         # a GPU machine without a time limit per call
    python scripts/gpu_checks.py all --dry-run        # CPU: tiny models, fused kernels under TRITON_INTERPRET=1

Writes gpu_checks.md (the table and how to read it), gpu_checks.log and gpu_checks.json under --out
($OUT when set, else gpu_checks/), again after every row: a run stopped by a time-out keeps every
row it finished. Exit status 1 if a check fails or a row errs; speed targets are reported, not
enforced.
"""
import os
import sys

os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # deterministic cuBLAS for the correctness part
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton_interpreter import use_interpreter_without_cuda  # noqa: E402

use_interpreter_without_cuda(dry_run='--dry-run' in sys.argv)  # before the kernels are defined (at `import models`)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

import torch  # noqa: E402
import timm  # noqa: E402

import benchmark  # noqa: E402  (scripts/benchmark.py: steps, timing, which attention ran)
import benchmark_attention  # noqa: E402  (scripts/benchmark_attention.py: random inputs at a stage's shapes)
from models.focal_attention import choose_backend  # noqa: E402
from models.focal_backbone import focal_backbone  # noqa: E402

PARTS = ('correctness', 'speed', 'compiled', 'backbone')
MODELS = {'Focal-T': 'focal_tiny_patch4_window7_224', 'Focal-B': 'focal_base_patch4_window7_224',
          'Focal-fast-T': 'focalv2_tiny_useconv_patch4_window7_224',
          'Swin-T': 'swin_tiny_patch4_window7_224', 'Swin-B': 'swin_base_patch4_window7_224'}
DROP_PATH = {'T': 0.2, 'B': 0.5}  # both papers' training values, the same for Focal and Swin
# The device tool's calls for every part (docs/benchmarks.md, "GPU checks"): at most 10 minutes each, so
# the compiled part, whose inductor compiles vary most, runs in a second call of its own.
DEVICE_CALLS = (('correctness', 'speed', 'backbone'), ('compiled',))
TINY = {'T': dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
        'B': dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))}


@dataclass(frozen=True)
class Sizes:
    """What differs between the GPU run and the dry run."""
    batch: int  # speed rows
    img: int
    op_img: int  # attention-op checks: every stage map at least 2x2 (a 1x1 one is no model's at 224 px)
    op_batch: int
    step_batch: int  # training-step checks
    backbone_batch: int
    backbone_size: Tuple[int, int]
    warmup: int
    iters: int
    architectures: Dict[str, dict]  # 'T'/'B': constructor overrides (tiny models)
    compile_backend: str


GPU = Sizes(batch=128, img=224, op_img=224, op_batch=4, step_batch=8, backbone_batch=2, backbone_size=(800, 1333),
            warmup=5, iters=20, architectures={}, compile_backend='inductor')
DRY = Sizes(batch=1, img=32, op_img=64, op_batch=1, step_batch=1, backbone_batch=1, backbone_size=(32, 48),
            warmup=0, iters=1, architectures=TINY, compile_backend='eager')


@dataclass
class Row:
    part: str
    what: str
    attention: str = '-'  # what ran, read from the model (or the resolver, for the bare op)
    value: str = '-'
    reference: str = '-'
    target: str = '-'
    verdict: str = '-'  # PASS / FAIL / met / missed / ERROR
    numbers: dict = field(default_factory=dict)
    asked: str = 'fused'  # the attention the row asked for: fused, sdpa, timm unfused, timm sdpa


class Report:
    """What this run measured, printed as it goes and written under `out` after every row (gpu_checks.md,
    .log, .json), so that a run stopped by a time-out keeps every row it finished."""

    def __init__(self, out: str, machine: str):
        self.out, self.machine = out, machine
        self.lines: List[str] = []
        self.rows: List[Row] = []
        self.errors: List[str] = []
        os.makedirs(out, exist_ok=True)
        self(machine)

    def __call__(self, line: str = '') -> None:
        print(line, flush=True)
        self.lines.append(line)

    def add(self, rows: List[Row]) -> None:
        self.rows += rows
        self.write()

    def write(self) -> None:
        with open(os.path.join(self.out, 'gpu_checks.md'), 'w') as f:
            f.write(f'{self.machine}\n\n{HOW_TO_READ}\n\n{table(self.rows)}\n')
        with open(os.path.join(self.out, 'gpu_checks.log'), 'w') as f:
            f.write('\n'.join(self.lines + self.errors) + '\n')
        with open(os.path.join(self.out, 'gpu_checks.json'), 'w') as f:
            json.dump([dataclasses.asdict(r) for r in self.rows], f, indent=1, default=str)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| in float64 (absolute where the reference is zero); NaN
    or inf where value is not finite, so that it fails every bound."""
    if not torch.isfinite(value).all():
        return math.nan
    difference = (value.double() - reference.double()).norm().item()
    scale = reference.double().norm().item()
    return difference / scale if scale else difference


def worst(errors: Dict[str, float]) -> Tuple[float, str]:
    """The largest error and its name (NaN first)."""
    name = max(errors, key=lambda n: (math.isnan(errors[n]), errors[n]))
    return errors[name], name


def within(error: float, bound: float) -> bool:
    return math.isfinite(error) and error <= bound


def named(label: str) -> str:
    """A model's name in a row: Swin's with the timm version that built it (the baseline moves with timm)."""
    return f'{label} (timm {timm.__version__})' if label.startswith('Swin') else label


def make(label: str, sizes: Sizes, **kwargs) -> torch.nn.Module:
    """MODELS[label] (its tiny version in a dry run) at the run's image size, with the papers' drop path."""
    family = label[-1]
    kwargs = dict(dict(img_size=sizes.img, drop_path_rate=DROP_PATH[family], **sizes.architectures.get(family, {})),
                  **kwargs)
    return benchmark.create(MODELS[label], **kwargs)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def poisoned_and_deterministic():
    """Deterministic algorithms; new tensors filled with NaN (torch.empty and friends), so that an
    output element nothing writes stays NaN; TF32 off, so that fp32 is fp32."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cuda.matmul.allow_tf32 = tf32


# ---- correctness --------------------------------------------------------------------------------

def stage_map_sizes(model: torch.nn.Module, img: int, device: torch.device) -> List[Tuple[int, int]]:
    """(height, width) of the map each stage's blocks see at this image size, as the model's own
    patch merging makes them (read from one forward)."""
    sizes: Dict[int, Tuple[int, int]] = {}

    def remember(index: int) -> Callable:
        def hook(block, args) -> None:  # (x, height, width)
            sizes.setdefault(index, tuple(args[1:3]))
        return hook
    hooks = [stage.blocks[-1].register_forward_pre_hook(remember(i)) for i, stage in enumerate(model.layers)]
    with torch.no_grad():
        model(torch.randn(1, 3, img, img, device=device))
    for hook in hooks:
        hook.remove()
    return [sizes[i] for i in range(len(model.layers))]


def stage_case(block, batch: int, size: Tuple[int, int], dtype: torch.dtype, device: torch.device, seed: int):
    """Fresh random attention inputs at a block's stage shape, the output gradient, and the names of
    what `benchmark_attention.run` returns for them."""
    torch.manual_seed(seed)
    inputs = benchmark_attention.stage_inputs(block, batch, *size, dtype, device)
    grad_out = torch.randn(batch, inputs['layout'].num_fine, block.attn.dim, device=device, dtype=dtype)
    names = ['out', 'dqkv'] + (['dpooled'] if inputs['pooled_kv'] is not None else []) + ['dbias']
    return inputs, grad_out, names


def float64_copy(inputs: dict) -> dict:
    copied = dict(inputs)
    for key in ('qkv', 'pooled_kv', 'position_bias'):
        if inputs[key] is not None:
            copied[key] = inputs[key].detach().double().requires_grad_()
    return copied


def attention_op_rows(sizes: Sizes, device: torch.device, log: Report) -> List[Row]:
    rows = []
    for model_index, label in enumerate(('Focal-T', 'Focal-B')):
        model = make(label, sizes, num_classes=0, img_size=sizes.op_img).to(device)
        maps = stage_map_sizes(model, sizes.op_img, device)
        for dtype_index, (dtype, bound) in enumerate(((torch.float32, 1e-4), (torch.bfloat16, 2e-2))):
            short = str(dtype).replace('torch.', '').replace('float', 'fp').replace('bfp', 'bf')
            errors: Dict[str, Dict[str, float]] = {'sdpa': {}, 'fused': {}}
            ran = set()
            for index, (stage, size) in enumerate(zip(model.layers, maps)):
                seed = 100 * model_index + 10 * dtype_index + index
                inputs, grad_out, names = stage_case(stage.blocks[-1], sizes.op_batch, size, dtype, device, seed)
                reference = benchmark_attention.run(float64_copy(inputs), 'sdpa', grad_out.double(), True)
                for backend in ('sdpa', 'fused'):
                    chosen = choose_backend(backend, inputs['qkv'], inputs['layout'], inputs['num_heads'])
                    results = benchmark_attention.run(inputs, backend, grad_out, True)
                    found = {f'stage {index} {n}': relative_error(v, r) for n, v, r in zip(names, results, reference)}
                    errors[backend].update(found)
                    if backend == 'fused':
                        ran.add(chosen)
                    log(f'  {label} {short} stage {index} {backend} (ran {chosen}): '
                        + ', '.join(f'{n.split()[-1]} {e:.2e}' for n, e in found.items()))
            fused, sdpa = worst(errors['fused']), worst(errors['sdpa'])
            ok = all(within(e, bound) for e in errors['fused'].values())
            rows.append(Row('correctness', f'{label} attention op, {len(model.layers)} stages, {short}, vs float64',
                            '+'.join(sorted(ran)), f'fused {fused[0]:.1e} ({fused[1]})',
                            f'sdpa {sdpa[0]:.1e} ({sdpa[1]})',
                            f'finite, <= {bound:g}', 'PASS' if ok else 'FAIL',
                            dict(fused=errors['fused'], sdpa=errors['sdpa'])))
        del model
        free_memory()
    return rows


def repeatable_row(sizes: Sizes, device: torch.device, log: Report) -> Row:
    model = make('Focal-T', sizes, num_classes=0).to(device)
    inputs, grad_out, names = stage_case(model.layers[0].blocks[0], sizes.step_batch,
                                         stage_map_sizes(model, sizes.img, device)[0], torch.bfloat16, device, 7)
    chosen = choose_backend('fused', inputs['qkv'], inputs['layout'], inputs['num_heads'])
    first, second = (benchmark_attention.run(inputs, 'fused', grad_out, True) for _ in range(2))
    differing = [n for n, a, b in zip(names, first, second) if not torch.equal(a, b)]
    log(f'  repeatable: differing {differing or "none"}')
    return Row('correctness', 'Focal-T stage 0 fused backward twice, bf16, deterministic mode', chosen,
               'bitwise identical' if not differing else f'differs: {", ".join(differing)}', verdict='FAIL' if differing
               else 'PASS')


def step_outputs(model: torch.nn.Module, runner: Callable, images: torch.Tensor, dtype: Optional[torch.dtype]):
    """Logits and every parameter gradient of one training step's loss (no optimizer step)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        logits = runner(images)
    logits.float().logsumexp(1).mean().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def compare_step(outputs, reference) -> Dict[str, float]:
    logits, grads = outputs
    errors = {'logits': relative_error(logits, reference[0])}
    errors.update({name: relative_error(grads[name], grad) if grads.get(name) is not None else math.nan
                   for name, grad in reference[1].items()})
    return errors


def training_step_row(sizes: Sizes, device: torch.device, log: Report) -> Row:
    torch.manual_seed(11)
    model = make('Focal-T', sizes, num_classes=10, drop_path_rate=0.).to(device).train()
    reference_model = copy.deepcopy(model).double()
    reference_model.set_attn_backend('sdpa')
    images = torch.randn(sizes.step_batch, 3, sizes.img, sizes.img, device=device)
    reference = step_outputs(reference_model, reference_model, images.double(), None)
    errors, ran = {}, {}
    for backend in ('sdpa', 'fused'):
        model.set_attn_backend(backend)
        errors[backend] = compare_step(step_outputs(model, model, images, torch.bfloat16), reference)
        ran[backend] = benchmark.attention_in_use(model)
        log(f'  training step {backend} (ran {ran[backend]}): logits {errors[backend]["logits"]:.2e}, worst gradient '
            '{:.2e} ({})'.format(*worst({k: v for k, v in errors[backend].items() if k != 'logits'})))
    fused, sdpa = worst(errors['fused']), worst(errors['sdpa'])
    bound = max(5e-2, 2 * sdpa[0]) if math.isfinite(sdpa[0]) else 5e-2
    return Row('correctness', f'Focal-T training step, bf16, batch {sizes.step_batch}: logits and {len(reference[1])} '
               'gradients vs float64', ran['fused'], f'fused {fused[0]:.1e} ({fused[1]})',
               f'sdpa {sdpa[0]:.1e} ({sdpa[1]})',
               f'finite, <= {bound:.1e} (5e-2 or 2x sdpa)',
               'PASS' if all(within(e, bound) for e in errors['fused'].values()) else 'FAIL', errors)


def correctness(sizes: Sizes, device: torch.device, report: Report, measured: dict) -> None:
    with poisoned_and_deterministic():
        poison = torch.empty(8, device=device)
        report(f'  new tensors are poisoned with NaN: {bool(torch.isnan(poison).all())}')
        guarded(report, attention_op_rows, 'correctness', 'attention op', sizes, device, report)
        guarded(report, lambda *a: [repeatable_row(*a)], 'correctness', 'repeatable backward', sizes, device, report)
        guarded(report, lambda *a: [training_step_row(*a)], 'correctness', 'training step', sizes, device, report)


# ---- speed --------------------------------------------------------------------------------------

def speed_value(m: benchmark.Measurement) -> str:
    return f'{m.images_per_s:.0f} img/s, {m.peak_mib / 1024:.1f} GiB'


def ratios(m: benchmark.Measurement, base: Optional[benchmark.Measurement], name: str) -> str:
    if base is None:
        return '-'
    return (f'{m.images_per_s / base.images_per_s:.2f}x {name} ({base.attention}), '
            f'memory {m.peak_mib / base.peak_mib:.2f}x')



def measure_row(label: str, mode: str, sizes: Sizes, device: torch.device, attn_backend: Optional[str] = None,
                swin_sdpa: bool = False, compiled: bool = False) -> benchmark.Measurement:
    torch.manual_seed(0)
    model = make(label, sizes, attn_backend=attn_backend, swin_sdpa=swin_sdpa, num_classes=1000).to(device)
    images = torch.randn(sizes.batch, 3, sizes.img, sizes.img, device=device)
    try:
        return benchmark.measure(model, mode, images, torch.bfloat16, compiled, sizes.warmup, sizes.iters)
    finally:
        del model, images
        free_memory()


def focal_t_target(m: benchmark.Measurement, mode: str, swin: dict) -> Tuple[str, str]:
    """Issue 16's targets for Focal-T: training >= 1.0x Swin-T (timm default) and >= 0.9x Swin-T with
    SDPA, peak training memory <= 1.0x Swin-T; inference >= 1.0x."""
    default, with_sdpa = swin.get(('Swin-T', mode, False)), swin.get(('Swin-T', mode, True))
    if default is None:
        return '-', '-'
    met = m.images_per_s >= default.images_per_s
    if mode == 'train':
        met = met and (with_sdpa is None or m.images_per_s >= 0.9 * with_sdpa.images_per_s)
        met = met and m.peak_mib <= default.peak_mib
        return '>= 1.0x Swin-T, >= 0.9x Swin-T sdpa, memory <= 1.0x', 'met' if met else 'missed'
    return '>= 1.0x Swin-T', 'met' if met else 'missed'


SPEED_ROWS = (('Swin-T', None, False), ('Swin-T', None, True), ('Focal-T', 'fused', False), ('Focal-T', 'sdpa', False),
              ('Focal-fast-T', 'sdpa', False), ('Swin-B', None, False), ('Focal-B', 'fused', False))
# (model, focal backend, timm's SDPA); Focal-fast runs SDPA (its position terms differ between windows)


def speed(sizes: Sizes, device: torch.device, report: Report, measured: dict) -> None:
    for mode in ('train', 'inference'):
        for label, backend, swin_sdpa in SPEED_ROWS:
            what = f'{named(label)} {mode}' + (f', {backend}' if backend else ', timm sdpa' if swin_sdpa else '')

            def row() -> List[Row]:
                m = measured[(label, mode, backend or swin_sdpa)] = measure_row(label, mode, sizes, device, backend,
                                                                                swin_sdpa)
                report(f'  {what}: {speed_value(m)} (ran {m.attention})')
                target = verdict = '-'
                base = None if label.startswith('Swin') else measured.get((f'Swin-{label[-1]}', mode, False))
                reference = ratios(m, base, f'Swin-{label[-1]}')
                if label == 'Focal-T':
                    swin = {(k[0], k[1], k[2]): v for k, v in measured.items() if k[0] == 'Swin-T'}
                    sdpa = swin.get(('Swin-T', mode, True))
                    if sdpa is not None:
                        reference += f'; {m.images_per_s / sdpa.images_per_s:.2f}x Swin-T ({sdpa.attention})'
                    if backend == 'fused':
                        target, verdict = focal_t_target(m, mode, swin)
                elif label == 'Focal-fast-T' and mode == 'train' and base is not None:
                    target = '>= 0.9x Swin-T'
                    verdict = 'met' if m.images_per_s >= 0.9 * base.images_per_s else 'missed'
                asked = backend or ('timm sdpa' if swin_sdpa else 'timm unfused')
                return [Row('speed', what, m.attention, speed_value(m), reference, target, verdict,
                            dataclasses.asdict(m), asked)]
            guarded(report, row, 'speed', what)


# ---- compiled -----------------------------------------------------------------------------------

def compiled(sizes: Sizes, device: torch.device, report: Report, measured: dict) -> None:
    compiled_rows(sizes, device, report, measured)
    free_memory()


def compiled_rows(sizes: Sizes, device: torch.device, report: Report, measured: dict) -> None:
    """One compiled Focal-T (fused) for every row, so that its graphs compile once: a training step
    against eager (same weights, input and drop-path draws: inductor takes eager's random numbers
    here), then training and inference speed against eager's, measured here on the same model where
    the speed part did not run in this call (the device's second call runs this part alone)."""
    import torch._inductor.config
    torch._inductor.config.fallback_random = True
    torch.manual_seed(0)
    model = make('Focal-T', sizes, attn_backend='fused', num_classes=1000).to(device).train()
    images = torch.randn(sizes.batch, 3, sizes.img, sizes.img, device=device)
    runner = torch.compile(model, backend=sizes.compile_backend)

    def step_row() -> List[Row]:
        torch.manual_seed(12)
        eager = step_outputs(model, model, images, torch.bfloat16)  # blocks remember their layouts here, and
        step_outputs(model, runner, images, torch.bfloat16)  # the graphs compiled now read those
        torch.manual_seed(12)  # after compiling, which may draw random numbers: the same drop-path draws as eager
        outputs = step_outputs(model, runner, images, torch.bfloat16)
        errors = compare_step(outputs, eager)
        overall = relative_error(torch.cat([g.flatten().float() for g in outputs[1].values()]),
                                 torch.cat([eager[1][n].flatten().float() for n in outputs[1]]))
        error, name = worst({k: v for k, v in errors.items() if k != 'logits'})
        report(f'  compiled training step vs eager: logits {errors["logits"]:.2e}, all gradients {overall:.2e}, '
            f'worst parameter {error:.2e} ({name})')
        ok = within(errors['logits'], 2e-2) and within(overall, 2e-2) and all(map(math.isfinite, errors.values()))
        return [Row('compiled', f'Focal-T fused training step, torch.compile vs eager, bf16: logits and '
                    f'{len(errors) - 1} gradients (as one vector)', benchmark.attention_in_use(model),
                    f'logits {errors["logits"]:.1e}, gradients {overall:.1e} (worst parameter {error:.1e}: {name})',
                    target='finite, <= 2e-2', verdict='PASS' if ok else 'FAIL', numbers=dict(errors, all=overall))]
    guarded(report, step_row, 'compiled', 'training step')
    for mode in ('train', 'inference'):
        def row() -> List[Row]:
            eager = measured.get(('Focal-T', mode, 'fused'))
            if eager is None:
                eager = measured[('Focal-T', mode, 'fused')] = benchmark.measure(
                    model, mode, images, torch.bfloat16, False, sizes.warmup, sizes.iters)
                report(f'  eager Focal-T {mode} (the same model): {speed_value(eager)} (ran {eager.attention})')
            m = benchmark.measure(model, mode, images, torch.bfloat16, False, sizes.warmup, sizes.iters,
                                  runner=runner)
            report(f'  compiled Focal-T {mode}: {speed_value(m)} (ran {m.attention})')
            verdict = 'met' if m.images_per_s >= eager.images_per_s else 'missed'
            return [Row('compiled', f'Focal-T {mode}, fused, torch.compile ({sizes.compile_backend})', m.attention,
                        speed_value(m), ratios(m, eager, 'eager Focal-T'), '>= 1.0x eager', verdict,
                        dataclasses.asdict(m))]
        guarded(report, row, 'compiled', f'Focal-T {mode}')


# ---- backbone -----------------------------------------------------------------------------------

class SwinFeatures(torch.nn.Module):
    """timm's Swin as a backbone: its four stage maps (NCHW), as FocalBackbone returns them."""

    def __init__(self, swin: torch.nn.Module):
        super().__init__()
        self.swin = swin

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        return self.swin.forward_intermediates(images, intermediates_only=True)


def feature_loss(features) -> torch.Tensor:
    features = features.values() if isinstance(features, dict) else features
    return sum(f.float().mean() for f in features)


def backbone(sizes: Sizes, device: torch.device, report: Report, measured: dict) -> None:
    height, width = sizes.backbone_size
    padded = (math.ceil(height / 32) * 32, math.ceil(width / 32) * 32)
    architecture = dict(drop_path_rate=DROP_PATH['T'], **sizes.architectures.get('T', {}))
    swin = None
    for name, size in (('Swin-T', padded), ('Focal-T fused', (height, width)), ('Focal-T sdpa', (height, width))):
        what = f'{named(name)} backbone forward+backward, {size[0]}x{size[1]}, batch {sizes.backbone_batch}'

        def row() -> List[Row]:
            nonlocal swin
            torch.manual_seed(0)
            if name == 'Swin-T':
                model = SwinFeatures(benchmark.create(MODELS['Swin-T'], img_size=size, num_classes=0, **architecture))
            else:
                model = focal_backbone('focal_tiny', attn_backend=name.split()[1], **architecture)
            images = torch.randn(sizes.backbone_batch, 3, *size, device=device)
            m = benchmark.measure(model.to(device), 'train', images, torch.bfloat16, False, sizes.warmup, sizes.iters,
                                  loss_fn=feature_loss, optimize=False)
            del model, images
            free_memory()
            report(f'  {what}: {speed_value(m)} (ran {m.attention})')
            if name == 'Swin-T':
                swin = m
            return [Row('backbone', what, m.attention, speed_value(m),
                        '-' if name == 'Swin-T' else ratios(m, swin, 'Swin-T'), numbers=dataclasses.asdict(m),
                        asked='timm unfused' if name == 'Swin-T' else name.split()[1])]
        guarded(report, row, 'backbone', what)


# ---- the run ------------------------------------------------------------------------------------

def guarded(report: Report, build: Callable[..., List[Row]], part: str, what: str, *args) -> None:
    """Adds the rows `build` makes to the report, or one ERROR row with the exception (its traceback
    goes to the log)."""
    start = time.perf_counter()
    try:
        rows = build(*args)
        print(f'    ({what}: {time.perf_counter() - start:.1f} s)', flush=True)
    except Exception as error:  # a failed row must not cost the others
        report.errors.append(f'{part} / {what}:\n{traceback.format_exc()}')
        print(report.errors[-1], file=sys.stderr, flush=True)
        rows = [Row(part, what, verdict='ERROR', value=f'{type(error).__name__}: {str(error).splitlines()[0][:120]}')]
    report.add(rows)


def table(rows: List[Row]) -> str:
    lines = ['| part | check | attention ran | value | vs | target | verdict |',
             '| --- | --- | --- | --- | --- | --- | --- |']
    lines += [f'| {r.part} | {r.what} | {r.attention} | {r.value} | {r.reference} | {r.target} | {r.verdict} |'
              for r in rows]
    return '\n'.join(lines)


HOW_TO_READ = """How to read it:
- attention ran: read from each model after its row ran: fused = the Triton kernels, sdpa = the SDPA
  path (a fused row that says sdpa could not run the kernel here; the log says why), timm unfused /
  timm sdpa = timm's own attention of Swin.
- correctness: value = the largest relative error ||x - x64|| / ||x64|| over every output and
  gradient named, against the same computation in float64; PASS needs every one finite and within
  the target. NaN never passes; new tensors start as NaN, so an unwritten output element fails.
- speed, compiled, backbone: median images/s of timed steps (CUDA events, after warm-up) and the
  peak CUDA memory of one further step; vs = ratio to the row named (memory too); targets are issue
  16's (speed targets are reported, not enforced). Same batch, bf16 autocast, drop path and AdamW
  for every model; backbone rows run forward+backward without an optimizer. Swin rows name the timm
  that built them.
- Record a GPU run: paste the gpu_checks.md of each call into docs/benchmarks.md (GPU runs) with its
  machine line, and the Focal-T rows into the README's Speed section."""


def machine_line(device: torch.device, dry_run: bool) -> str:
    import triton
    where = (f'{torch.cuda.get_device_name(device)} (sm_{"".join(map(str, torch.cuda.get_device_capability(device)))})'
             if device.type == 'cuda' else f'CPU {platform.machine()}, dry run (tiny models, interpreter)')
    return (f'{where}; Python {platform.python_version()}, torch {torch.__version__}, Triton {triton.__version__}, '
            f'timm {timm.__version__}{"; DRY RUN: tiny sizes, no timing meaning" if dry_run else ""}')


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('parts', nargs='+', choices=('all',) + PARTS)
    parser.add_argument('--dry-run', action='store_true', help='CPU, tiny models, fused kernels under the interpreter')
    parser.add_argument('--out', default=os.environ.get('OUT') or 'gpu_checks', help='folder for the table and logs')
    args = parser.parse_args(argv)
    parts = PARTS if 'all' in args.parts else [p for p in PARTS if p in args.parts]
    device = torch.device('cpu' if args.dry_run else 'cuda')
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit('error: no CUDA device: run on a GPU, or add --dry-run for the CPU check of this script')
    sizes = DRY if args.dry_run else GPU
    report = Report(args.out, machine_line(device, args.dry_run))
    measured: dict = {}
    for part in parts:
        report(f'== {part}')
        start = time.perf_counter()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        globals()[part](sizes, device, report, measured)
        report(f'== {part}: {time.perf_counter() - start:.0f} s')
        report.write()
    print(f'\n{HOW_TO_READ}\n\nwritten to {args.out}/gpu_checks.md, .log, .json\n')
    print(report.machine)
    print(table(report.rows))
    return 1 if any(r.verdict in ('FAIL', 'ERROR') for r in report.rows) else 0


if __name__ == '__main__':
    sys.exit(main())
