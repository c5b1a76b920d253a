"""Export a classifier or the detection backbone to ONNX for deployment (onnxruntime, TensorRT), check
it against PyTorch in onnxruntime on fresh random inputs, and optionally save the torch.export
program (what AOTInductor and ExecuTorch take).

    python scripts/export_onnx.py --cfg configs/focal_tiny.yaml --checkpoint focal-tiny-is224-ws7.pth
    python scripts/export_onnx.py --model focal_tiny_patch4_window7_224 --output focal_tiny.onnx
    python scripts/export_onnx.py --backbone --model focal_tiny --img-size 800 1344 --checkpoint CKPT
    python scripts/export_onnx.py --cfg configs/focal_tiny.yaml --exported-program focal_tiny.pt2

Exporters: PyTorch's default, the torch.export-based one (`dynamo=True`; PyTorch 2.5 and later, needs
onnx and onnxscript), is tried first; where it is missing or fails, the TorchScript exporter is the
fallback, and the script says why. The batch axis is dynamic; the image size is fixed at export,
since focal attention's index maps are built per feature-map size and the graph holds them as
constants (export again for another size). Focal attention is exported through SDPA whatever the
attention backend (the fused Triton kernel is a custom op no exported graph can carry).
"""
import argparse
import contextlib
import inspect
import logging
import os
import re
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import CheckpointError, classifier_rows, load_exactly, read_checkpoint  # noqa: E402
from config import load_config  # noqa: E402
from models import build_model, unwrap_state_dict  # noqa: E402
from models.build import FOCAL_MODELS, focal_kwargs_from_config  # noqa: E402
from models.focal_backbone import BACKBONE_VARIANTS, FocalBackbone  # noqa: E402
from models.focal_transformer import FocalTransformer  # noqa: E402
from utils import UserError  # noqa: E402

EXPORTERS = ('auto', 'dynamo', 'torchscript')
EXAMPLE_BATCH = 2  # traced batch; the exported batch axis is dynamic (torch.export specialises sizes 0 and 1)
VALIDATION_BATCHES = (1, 3)  # other batches than the traced one: they check the dynamic axis
TORCHSCRIPT_OPSET = 17
BACKBONE_SIZE = (800, 1344)  # a detection input, padded to 32 as the backbone pads it

logger = logging.getLogger('export')


class ExportError(UserError):
    """A bad request, a missing package, or an exported model that does not match PyTorch."""


def first_line(error: BaseException) -> str:
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(error)).strip()  # the ONNX exporter colours its messages
    return f'{type(error).__name__}: {text.splitlines()[0]}' if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Models


def build_classifier(cfg: Optional[str], model_name: Optional[str], opts: Sequence[str],
                     num_classes: Optional[int] = None) -> Tuple[nn.Module, Tuple[int, int]]:
    """The classifier of a config (as main.py builds it) or a timm name, and its default input size."""
    if cfg:
        if num_classes is not None:
            opts = list(opts) + ['MODEL.NUM_CLASSES', str(num_classes)]
        config = load_config(cfg, opts)
        return build_model(config), (config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
    if not timm.is_model(model_name):
        raise ExportError(f"--model {model_name}: not a timm model name (`import models` adds the focal_* ones; "
                          f"see timm.list_models())")
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    return model, tuple(model.pretrained_cfg.get('input_size', (3, 224, 224))[1:])


def build_backbone(cfg: Optional[str], model_name: Optional[str], opts: Sequence[str],
                   out_indices: Sequence[int]) -> FocalBackbone:
    """`FocalBackbone` with the architecture of a focal config or of a `BACKBONE_VARIANTS` name."""
    if cfg:
        config = load_config(cfg, opts)
        if config.MODEL.TYPE not in FOCAL_MODELS:
            raise ExportError(f"--backbone needs a Focal Transformer or Focal-fast config; {cfg} has MODEL.TYPE "
                              f"{config.MODEL.TYPE}")
        kwargs = dict(focal_kwargs_from_config(config), model_class=FOCAL_MODELS[config.MODEL.TYPE])
        for name in ('img_size', 'num_classes', 'use_checkpoint'):  # the backbone's own
            kwargs.pop(name)
    elif model_name in BACKBONE_VARIANTS:
        kwargs = BACKBONE_VARIANTS[model_name]
    else:
        raise ExportError(f"--backbone --model {model_name}: choose one of {', '.join(sorted(BACKBONE_VARIANTS))} "
                          f"or give a focal config with --cfg")
    try:
        return FocalBackbone(out_indices=out_indices, **kwargs)
    except ValueError as error:  # out_indices outside the model's stages
        raise ExportError(f'--out-indices {" ".join(map(str, out_indices))}: {error}') from None


def load_backbone_checkpoint(backbone: FocalBackbone, checkpoint: dict, path: str) -> None:
    try:
        backbone.load_checkpoint(checkpoint)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path} does not fit this backbone (another architecture?): "
                              f"{error}") from None


def minimum_input_side(model: nn.Module) -> Optional[int]:
    """The smallest image side a Focal Transformer accepts (every stage keeps one token), else None."""
    body = model.body if isinstance(model, FocalBackbone) else model
    if not isinstance(body, FocalTransformer):
        return None
    return body.patch_embed.patch_size[0] * 2 ** (len(body.layers) - 1)


def output_names(model: nn.Module) -> List[str]:
    if isinstance(model, FocalBackbone):
        return [f'stage{i}' for i in model.out_indices]
    return ['logits']


def flat_outputs(output) -> List[torch.Tensor]:
    """A model's outputs as the list ONNX returns them (a backbone's dict in its order)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return list(output.values())
    return list(output)


# ----------------------------------------------------------------------------------------------
# Exporters


INSTALL = 'pip install -r requirements.txt -c constraints.txt'


def missing_package(name: str) -> Optional[str]:
    """A sentence saying that `name` cannot be imported, or None."""
    try:
        __import__(name)
    except ImportError:
        return f'{name} is not installed ({INSTALL})'
    return None


def dynamo_unavailable_reason() -> Optional[str]:
    """Why the torch.export-based ONNX exporter cannot run here, or None."""
    if 'dynamic_shapes' not in inspect.signature(torch.onnx.export).parameters:
        return f'torch {torch.__version__} has no torch.export-based ONNX exporter (PyTorch 2.5 and later)'
    return missing_package('onnxscript')


def export_dynamo(model: nn.Module, example: torch.Tensor, path: str, opset: Optional[int]) -> None:
    """PyTorch's torch.export-based exporter, with a dynamic batch axis."""
    batch = torch.export.Dim('batch')
    torch.onnx.export(model, (example,), path, dynamo=True, input_names=['image'], output_names=output_names(model),
                      dynamic_shapes=({0: batch},), opset_version=opset, external_data=False, verbose=False)


@contextlib.contextmanager
def sdpa_scale_as_tensor():
    """PyTorch before 2.5 cannot export an explicit `scale=` of scaled_dot_product_attention with the
    TorchScript exporter (its opset-14 symbolic takes the scale as a float and fails on it, PyTorch issue
    125158). Hands it the scale as a tensor for the duration of an export; a no-op on later versions."""
    if torch.__version__ >= (2, 5):
        yield
        return
    from torch.onnx import symbolic_helper, symbolic_opset14

    def sdpa(g, query, key, value, attn_mask, dropout_p, is_causal, scale, *rest):
        constant = symbolic_helper._maybe_get_const(scale, 'f')
        if isinstance(constant, float):
            scale = g.op('CastLike', g.op('Constant', value_t=torch.tensor(constant)), query)
        return symbolic_opset14.scaled_dot_product_attention(g, query, key, value, attn_mask, dropout_p, is_causal,
                                                             scale, *rest)

    torch.onnx.register_custom_op_symbolic('aten::scaled_dot_product_attention', sdpa, 14)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic('aten::scaled_dot_product_attention', 14)


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str, opset: Optional[int]) -> None:
    """The TorchScript (torch.jit.trace) exporter, with a dynamic batch axis."""
    names = output_names(model)
    dynamic_axes = {name: {0: 'batch'} for name in ['image'] + names}
    with warnings.catch_warnings(), sdpa_scale_as_tensor():
        warnings.filterwarnings('ignore', message='.*TorchScript-based ONNX export', category=DeprecationWarning)
        # Shape-dependent branches (window padding, pooling crops) are traced as constants: right, as the
        # size is fixed at export; the batch axis is checked by the validation at other batch sizes.
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        torch.onnx.export(model, (example,), path, dynamo=False, input_names=['image'], output_names=names,
                          dynamic_axes=dynamic_axes, opset_version=opset or TORCHSCRIPT_OPSET)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, exporter: str = 'auto',
                opset: Optional[int] = None) -> Tuple[str, Optional[str]]:
    """Export the eval-mode `model` traced on `example` to `path`. exporter: 'dynamo' (PyTorch's default,
    torch.export-based), 'torchscript', or 'auto' (dynamo, else torchscript). Returns the exporter used and,
    when 'auto' fell back, why."""
    if exporter not in EXPORTERS:
        raise ExportError(f'--exporter must be one of {", ".join(EXPORTERS)}, got {exporter!r}')
    if missing_package('onnx'):  # both exporters write through it in current PyTorch
        raise ExportError(missing_package('onnx'))
    reason = None
    if exporter != 'torchscript':
        reason = dynamo_unavailable_reason()
        if reason is None:
            try:
                export_dynamo(model, example, path, opset)
                return 'dynamo', None
            except Exception as error:  # the exporter raises many types; the fallback says which
                if exporter == 'dynamo':
                    raise
                reason = f'the torch.export-based exporter failed ({first_line(error)})'
        elif exporter == 'dynamo':
            raise ExportError(f'--exporter dynamo cannot run: {reason}')
    export_torchscript(model, example, path, opset)
    return 'torchscript', reason


@contextlib.contextmanager
def constants_unannounced():
    """PyTorch 2.4's torch.export warns about each constant tensor (the index maps) a program holds."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*does not reference an nn.Module, nn.Parameter, or buffer')
        yield


def export_program(model: nn.Module, example: torch.Tensor) -> 'torch.export.ExportedProgram':
    """torch.export of the eval-mode `model` (non-strict: traced in Python on fake tensors), batch
    axis dynamic, image size fixed."""
    with constants_unannounced():
        return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim('batch')},), strict=False)


# ----------------------------------------------------------------------------------------------
# Validation


def compare(outputs: Sequence[np.ndarray], expected: Sequence[torch.Tensor]) -> Tuple[float, float]:
    """(largest absolute difference, largest relative one ||out - ref|| / ||ref|| over the outputs)."""
    max_error = relative = 0.
    for out, ref in zip(outputs, expected):
        ref = ref.detach().double().numpy()
        diff = np.asarray(out, dtype=np.float64) - ref
        max_error = max(max_error, float(np.abs(diff).max()))
        relative = max(relative, float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)))
    return max_error, relative


def random_images(batch: int, size: Tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=generator)


def validate_onnx(path: str, model: nn.Module, size: Tuple[int, int], seed: int = 1,
                  batches: Sequence[int] = VALIDATION_BATCHES) -> List[Tuple[int, float, float]]:
    """Run the ONNX file in onnxruntime and `model` in PyTorch on the same fresh random images, per
    batch size. Returns (batch, max absolute error, relative error) for each."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ExportError(f'validation needs onnx and onnxruntime ({error}): {INSTALL}, '
                          f'or pass --no-validate') from None
    onnx.checker.check_model(path)
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    results = []
    for batch in batches:
        images = random_images(batch, size, generator)
        with torch.no_grad():
            expected = flat_outputs(model(images))
        results.append((batch,) + compare(session.run(None, {input_name: images.numpy()}), expected))
    return results


def validate_program(program: 'torch.export.ExportedProgram', model: nn.Module, size: Tuple[int, int],
                     seed: int = 1, batches: Sequence[int] = VALIDATION_BATCHES) -> List[Tuple[int, float, float]]:
    """`validate_onnx` for a torch.export program."""
    with constants_unannounced():
        exported = program.module()
    generator = torch.Generator().manual_seed(seed)
    results = []
    for batch in batches:
        images = random_images(batch, size, generator)
        with torch.no_grad():
            outputs = [out.numpy() for out in flat_outputs(exported(images))]
            results.append((batch,) + compare(outputs, flat_outputs(model(images))))
    return results


def check_tolerance(what: str, results: Sequence[Tuple[int, float, float]], tolerance: float) -> None:
    for batch, max_error, relative in results:
        print(f'{what} vs PyTorch, batch {batch}: max abs error {max_error:.2e}, relative error {relative:.2e}')
    worst = max(relative for _, _, relative in results)
    if worst > tolerance:
        raise ExportError(f'{what} differs from PyTorch: relative error {worst:.2e} > --tolerance {tolerance:g}')


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--cfg', help="YAML config as for main.py (a run's config.yaml works)")
    source.add_argument('--model', help='timm model name (focal_* included); with --backbone: '
                        + ', '.join(sorted(BACKBONE_VARIANTS)))
    parser.add_argument('--opts', nargs='+', default=[], help='config overrides KEY VALUE ... (with --cfg)')
    parser.add_argument('--backbone', action='store_true', help='export FocalBackbone (NCHW stage maps) '
                        'instead of the classifier')
    parser.add_argument('--out-indices', type=int, nargs='+', default=[0, 1, 2, 3], help='backbone stages to output')
    parser.add_argument('--checkpoint', help='weights to load (ours, a released one, or a detector\'s backbone.*); '
                        'default: random initialisation')
    parser.add_argument('--img-size', type=int, nargs='+', help='export size, one side or HEIGHT WIDTH (fixed in the '
                        'graph); default DATA.IMG_SIZE, the timm model\'s input size, or 800 1344 for --backbone')
    parser.add_argument('--output', help='ONNX file to write (default: <model>.onnx)')
    parser.add_argument('--exporter', default='auto', choices=EXPORTERS,
                        help='auto: the torch.export-based exporter, falling back to TorchScript')
    parser.add_argument('--opset', type=int, help=f'ONNX opset (default: the exporter\'s; {TORCHSCRIPT_OPSET} '
                        f'for TorchScript)')
    parser.add_argument('--tolerance', type=float, default=1e-4, help='largest relative error accepted in validation')
    parser.add_argument('--no-validate', action='store_true', help='skip the onnxruntime check')
    parser.add_argument('--exported-program', metavar='FILE.pt2', help='also save the torch.export program there')
    parser.add_argument('--seed', type=int, default=0, help='seed of the initialisation and the random inputs')
    return parser.parse_args(argv)


def export_size(args: argparse.Namespace, default: Tuple[int, int], model: nn.Module) -> Tuple[int, int]:
    size = args.img_size or list(default)
    if len(size) not in (1, 2) or min(size) < 1:
        raise ExportError(f'--img-size takes one side or HEIGHT WIDTH, positive; got {" ".join(map(str, size))}')
    size = (size[0], size[-1])
    smallest = minimum_input_side(model)
    if smallest is not None and min(size) < smallest:
        raise ExportError(f'--img-size {size[0]} {size[1]} is too small: this model needs at least '
                          f'{smallest} px a side')
    return size


def write_atomically(path: str, write) -> None:
    """`write(tmp_path)`, then rename onto `path`: an existing file is replaced only by a complete one."""
    root, extension = os.path.splitext(path)
    tmp_path = f'{root}.tmp.{os.getpid()}{extension}'  # the same extension: torch.export.save wants .pt2
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def run(args: argparse.Namespace) -> None:
    if args.opts and not args.cfg:
        raise ExportError('--opts needs --cfg')
    if args.tolerance < 0:
        raise ExportError(f'--tolerance must not be negative, got {args.tolerance:g}')
    name = os.path.splitext(os.path.basename(args.cfg))[0] if args.cfg else args.model
    output = args.output or f'{name}{"_backbone" if args.backbone else ""}.onnx'
    for path in filter(None, (output, args.exported_program)):
        folder = os.path.dirname(path)
        if folder and not os.path.isdir(folder):
            raise ExportError(f'cannot write {path}: the folder {folder} does not exist')
    torch.manual_seed(args.seed)
    checkpoint = read_checkpoint(args.checkpoint) if args.checkpoint else None
    if args.backbone:
        model = build_backbone(args.cfg, args.model, args.opts, args.out_indices)
        default_size = BACKBONE_SIZE
        if checkpoint is not None:
            load_backbone_checkpoint(model, checkpoint, args.checkpoint)
    else:
        model, default_size = build_classifier(args.cfg, args.model, args.opts)
        if checkpoint is not None:
            trained = classifier_rows(unwrap_state_dict(checkpoint), model)
            if trained is not None and trained != classifier_rows(model.state_dict(), model):
                logger.info(f'{args.checkpoint} has a head for {trained} classes: exporting the model with {trained}')
                model, default_size = build_classifier(args.cfg, args.model, args.opts, num_classes=trained)
            load_exactly(model, checkpoint, args.checkpoint)
    model = model.eval()
    size = export_size(args, default_size, model)
    kind = f'backbone (stages {", ".join(map(str, model.out_indices))})' if args.backbone else 'classifier'
    print(f'{name} {kind}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, '
          f'{"weights of " + args.checkpoint if args.checkpoint else "randomly initialised"}')

    example = random_images(EXAMPLE_BATCH, size, torch.Generator().manual_seed(args.seed))
    try:
        with torch.no_grad():
            model(example)  # builds the index maps of this size outside the traced graph
    except (AssertionError, RuntimeError, ValueError) as error:
        if minimum_input_side(model) is not None:  # a Focal Transformer runs at any size from its smallest
            raise
        raise ExportError(f'{name} cannot run a {size[0]}x{size[1]} image: {first_line(error)}') from None
    print(f'input image: (batch, 3, {size[0]}, {size[1]}), batch dynamic, size fixed at export '
          f'(focal attention\'s index maps are built per size: export again for another)')

    def write_onnx(path: str) -> None:
        exporter, reason = export_onnx(model, example, path, args.exporter, args.opset)
        if reason:
            print(f'exporter: TorchScript, the fallback: {reason}')
        else:
            print(f'exporter: {"torch.export-based (dynamo=True)" if exporter == "dynamo" else "TorchScript"}')
        if not args.no_validate:
            check_tolerance('onnxruntime', validate_onnx(path, model, size, args.seed + 1), args.tolerance)

    write_atomically(output, write_onnx)
    print(f'wrote {output} ({os.path.getsize(output) / 2**20:.1f} MiB)')

    if args.exported_program:
        program = export_program(model, example)
        check_tolerance('torch.export program', validate_program(program, model, size, args.seed + 1),
                        args.tolerance)
        write_atomically(args.exported_program, lambda path: torch.export.save(program, path))
        print(f'wrote {args.exported_program} (torch.export.load it; AOTInductor and ExecuTorch take it)')


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(message)s'))
    loggers = [logging.getLogger(name) for name in ('export', 'focal', 'models')]  # ours, checkpoint.py's, the models'
    for log in loggers:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        run(args)
    except UserError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    finally:
        for log in loggers:
            log.removeHandler(handler)
    return 0


if __name__ == '__main__':
    sys.exit(main())
