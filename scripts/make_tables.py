"""Print the paper's Tables 2, 8, 9 and 10 and Figure 5 in Markdown, the paper's numbers beside
ours, and draw the README plots (top-1 vs GFLOPs, top-1 vs measured throughput).

Ours come from the run folders main.py writes, OUTPUT/<MODEL.NAME>/<TAG>/metrics.jsonl, one JSON
line per evaluation (`acc1`, `max_acc1`, `epoch`, ...) plus `throughput` lines. Params and GFLOPs
are measured live on the model each row's config builds. A row without a run shows "not run";
nothing is filled in. Paper columns are transcribed from the paper's tables; "—" marks a number
the paper's table does not print. Tables 8-10 also give the paper's COCO box and mask AP, which
this repository does not train.

    python scripts/make_tables.py [--output output] [--tag default]
                                  [--tables 2 8 9 10 fig5 released] [--plots docs/figures]
"""
import argparse
import functools
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from config import load_config as load_config_file  # noqa: E402
from models import build_model  # noqa: E402
from models.complexity import count_gflops, count_params_m  # noqa: E402
from run_outputs import read_metrics  # noqa: E402
from utils import run_folder  # noqa: E402


@dataclass(frozen=True)
class Paper:
    """A row's numbers as its source prints them (the paper; for released checkpoints the
    official README); None where it prints none. Box and mask AP: COCO, ablation tables only."""
    params: Optional[float] = None
    gflops: Optional[float] = None
    top1: Optional[float] = None
    box_ap: Optional[float] = None
    mask_ap: Optional[float] = None


@dataclass(frozen=True)
class Row:
    """One table row: the config that trains it here (None: no implementation here)."""
    label: str
    config: Optional[str]
    paper: Paper = Paper()


@dataclass(frozen=True)
class Table:
    title: str
    rows: Tuple[Row, ...]
    notes: Tuple[str, ...] = ()


@dataclass
class Result:
    """What we measured for a row: live model size and cost, and the run folder's metrics."""
    row: Row
    params: Optional[float] = None
    gflops: Optional[float] = None
    run_dir: Optional[str] = None
    evals: List[dict] = field(default_factory=list)
    throughput: Optional[float] = None
    epochs: Optional[int] = None

    @property
    def top1(self) -> Optional[float]:
        """Top-1 of the last evaluation (the final checkpoint once the eval step has run)."""
        return self.evals[-1]['acc1'] if self.evals else None

    @property
    def max_top1(self) -> Optional[float]:
        return max(e.get('max_acc1', e['acc1']) for e in self.evals) if self.evals else None

    @property
    def last_epoch(self) -> Optional[int]:
        epochs = [e['epoch'] for e in self.evals if isinstance(e.get('epoch'), int)]
        return max(epochs) if epochs else None


# Transcribed from the paper (Table 2; Tables 8-10 give their own rows below).
SWIN_T = Paper(28.3, 4.5, 81.2)
FOCAL_T = Paper(29.1, 4.9, 82.2)
NOT_PRINTED_NOTE = '"—" in a paper column: the paper\'s table does not print that number.'
FOCAL_OFFSET_NOTE = ('The paper prints about 0.2M more parameters for Focal models than the '
                     'official code builds (Focal-T: 29.1M vs 28.88M); our model reproduces the '
                     'official code.')
AP_NOTE = ('Box / mask AP: the paper\'s COCO results (not trained here). The ablation tables do '
           'not name the detector; their Swin-T and Focal-T rows equal Table 3\'s Mask R-CNN 1x '
           'results (43.7 / 39.8 and 44.8 / 41.0).')

TABLE_2 = Table(
    'Table 2: ImageNet-1K classification (224x224; ViT-Base/16 at 384)',
    (
        Row('ResNet-50', 'configs/baselines/resnet50.yaml', Paper(25.0, 4.1, 76.2)),
        Row('ResNet-101', 'configs/baselines/resnet101.yaml', Paper(45.0, 7.9, 77.4)),
        Row('ResNet-152', 'configs/baselines/resnet152.yaml', Paper(60.0, 11.0, 78.3)),
        Row('DeiT-Small/16', 'configs/baselines/deit_small.yaml', Paper(22.1, 4.6, 79.9)),
        Row('DeiT-Base/16', 'configs/baselines/deit_base.yaml', Paper(86.6, 17.5, 81.8)),
        Row('ViT-Base/16 (384)', 'configs/baselines/vit_base_384.yaml', Paper(86.6, 17.6, 77.9)),
        Row('PVT-Small', None, Paper(24.5, 3.8, 79.8)),
        Row('PVT-Medium', None, Paper(44.2, 6.7, 81.2)),
        Row('PVT-Large', None, Paper(61.4, 9.8, 81.7)),
        Row('ViL-Small', None, Paper(24.6, 5.1, 82.0)),
        Row('ViL-Medium', None, Paper(39.7, 9.1, 83.3)),
        Row('ViL-Base', None, Paper(55.7, 13.4, 83.2)),
        Row('CvT-13', None, Paper(20.0, 4.5, 81.6)),
        Row('CvT-21', None, Paper(32.0, 7.1, 82.5)),
        Row('Swin-Tiny', 'configs/baselines/swin_tiny.yaml', SWIN_T),
        Row('Swin-Small', 'configs/baselines/swin_small.yaml', Paper(49.6, 8.7, 83.1)),
        Row('Swin-Base', 'configs/baselines/swin_base.yaml', Paper(87.8, 15.4, 83.4)),
        Row('Focal-Tiny', 'configs/focal_tiny.yaml', FOCAL_T),
        Row('Focal-Small', 'configs/focal_small.yaml', Paper(51.1, 9.1, 83.5)),
        Row('Focal-Base', 'configs/focal_base.yaml', Paper(89.8, 16.0, 83.8)),
    ),
    (
        'PVT (v1), ViL and CvT are not in timm: not reproducible here, paper numbers only.',
        'Baselines are trained with the Focal recipe; the paper quotes each baseline\'s own '
        'recipe, so ResNet, DeiT and ViT numbers are expected to differ.',
        'ViT-Base/16: the paper prints 17.6 GFLOPs and says only that ViT-Base/16, unlike the '
        'other rows, is not at 224x224; our row is at 384.',
        'Focal-S/B GFLOPs: the official README prints 9.4G / 16.4G, as we measure.',
        FOCAL_OFFSET_NOTE,
    ),
)

TABLE_8 = Table(
    'Table 8: window size (224x224)',
    (
        Row('Swin-Tiny, window 7', 'configs/baselines/swin_tiny.yaml',
            Paper(gflops=4.5, top1=81.2, box_ap=43.7, mask_ap=39.8)),
        Row('Swin-Tiny, window 14', 'configs/ablations/swin_tiny_window14.yaml',
            Paper(gflops=4.9, top1=82.1, box_ap=44.0, mask_ap=40.5)),
        Row('Focal-Tiny, window 7', 'configs/focal_tiny.yaml',
            Paper(gflops=4.9, top1=82.2, box_ap=44.9, mask_ap=41.1)),
        Row('Focal-Tiny, window 14', 'configs/ablations/focal_tiny_window14.yaml',
            Paper(gflops=5.2, top1=82.3, box_ap=45.5, mask_ap=41.5)),
    ),
    ('Focal-T at window 14 keeps the focal windows [7, 5, 3, 1]: the paper does not say which it '
     'used.',
     'The paper\'s Table 8 prints 44.9 / 41.1 AP for Focal-T at window 7, its Tables 3, 9 and 10 '
     '44.8 / 41.0 for the same default model.',
     AP_NOTE, NOT_PRINTED_NOTE),
)

TABLE_9 = Table(
    'Table 9: window shift',
    (
        Row('Swin-Tiny, shift', 'configs/baselines/swin_tiny.yaml',
            Paper(top1=81.2, box_ap=43.7, mask_ap=39.8)),
        Row('Swin-Tiny, no shift', 'configs/ablations/swin_tiny_noshift.yaml',
            Paper(top1=80.2, box_ap=38.8, mask_ap=36.4)),
        Row('Focal-Tiny, shift', 'configs/ablations/focal_tiny_shift.yaml',
            Paper(top1=81.9, box_ap=44.9, mask_ap=41.1)),
        Row('Focal-Tiny, no shift (default)', 'configs/focal_tiny.yaml',
            Paper(top1=82.2, box_ap=44.8, mask_ap=41.0)),
    ),
    (AP_NOTE, NOT_PRINTED_NOTE),
)

TABLE_10 = Table(
    'Table 10: stage depths',
    (
        Row('Swin, 2-2-2-2', 'configs/ablations/swin_tiny_depth2222.yaml',
            Paper(21.2, 3.1, 78.7, 38.2, 35.7)),
        Row('Swin, 2-2-4-2', 'configs/ablations/swin_tiny_depth2242.yaml',
            Paper(24.7, 3.8, 80.2, 41.2, 38.1)),
        Row('Swin, 2-2-6-2 (Swin-T)', 'configs/baselines/swin_tiny.yaml',
            Paper(28.3, 4.5, 81.2, 43.7, 39.8)),
        Row('Focal, 2-2-2-2', 'configs/ablations/focal_tiny_depth2222.yaml',
            Paper(21.7, 3.4, 79.9, 40.5, 37.6)),
        Row('Focal, 2-2-4-2', 'configs/ablations/focal_tiny_depth2242.yaml',
            Paper(25.4, 4.1, 81.4, 43.3, 39.8)),
        Row('Focal, 2-2-6-2 (Focal-T)', 'configs/focal_tiny.yaml',
            Paper(29.1, 4.9, 82.2, 44.8, 41.0)),
    ),
    (FOCAL_OFFSET_NOTE, AP_NOTE),
)

FIGURE_5 = Table(
    'Figure 5: local and global interactions in Focal-T (the paper plots these; no numbers)',
    (
        Row('Focal-Tiny, local only', 'configs/ablations/focal_tiny_local_only.yaml'),
        Row('Focal-Tiny, global only', 'configs/ablations/focal_tiny_global_only.yaml'),
        Row('Focal-Tiny, both (default)', 'configs/focal_tiny.yaml', FOCAL_T),
    ),
    ('Focal-Tiny, both: the paper\'s Table 2 numbers.',),
)

RELEASED = Table(
    'Released checkpoints (top-1 as the official README reports it; ours: tag "released")',
    (
        Row('Focal-Tiny', 'configs/focal_tiny.yaml', Paper(28.9, 4.9, 82.2)),
        Row('Focal-Small', 'configs/focal_small.yaml', Paper(51.1, 9.4, 83.6)),
        Row('Focal-Base', 'configs/focal_base.yaml', Paper(89.8, 16.4, 84.0)),
        Row('Focal-Tiny, useconv', 'configs/focal_tiny_useconv.yaml', Paper(30.8, 5.2, 82.7)),
        Row('Focal-Small, useconv', 'configs/focal_small_useconv.yaml', Paper(53.1, 9.7, 83.8)),
        Row('Focal-Base, useconv', 'configs/focal_base_useconv.yaml', Paper(93.3, 16.8, 84.2)),
        Row('Focal-fast-Tiny', 'configs/focalv2_tiny_useconv.yaml', Paper(30.2, 5.0, 82.4)),
        Row('Focal-fast-Small', 'configs/focalv2_small_useconv.yaml', Paper(51.5, 9.4, 83.6)),
        Row('Focal-fast-Base', 'configs/focalv2_base_useconv.yaml', Paper(91.2, 16.4, 84.0)),
    ),
)

TABLES = {'2': TABLE_2, '8': TABLE_8, '9': TABLE_9, '10': TABLE_10, 'fig5': FIGURE_5,
          'released': RELEASED}


def load_config(path: str):
    """The merged, validated config of a YAML file (relative paths: from the repository root)."""
    return load_config_file(os.path.join(REPO_ROOT, path))


@functools.lru_cache(maxsize=None)
def model_complexity(config_path: str) -> Tuple[float, float]:
    """(params in M, GFLOPs as multiply-adds at batch 1) of the model `config_path` builds."""
    config = load_config(config_path)
    model = build_model(config)
    return count_params_m(model), count_gflops(model, config.DATA.IMG_SIZE)


def evaluations_and_throughput(path: str) -> Tuple[List[dict], Optional[float]]:
    """The evaluation records of a metrics.jsonl (read by `run_outputs.read_metrics`, which
    leaves out a line cut short by a kill) and its last measured throughput."""
    evals, throughput = [], None
    for record in read_metrics(path):
        if 'acc1' in record:
            evals.append(record)
        if 'throughput' in record:
            throughput = record['throughput']
    return evals, throughput


def measure(row: Row, output: str, tag: str) -> Result:
    """Live params/GFLOPs of `row`'s model and the metrics of its run OUTPUT/MODEL.NAME/TAG."""
    result = Result(row)
    if row.config is None:
        return result
    result.params, result.gflops = model_complexity(row.config)
    config = load_config(row.config)
    config.defrost()
    config.OUTPUT, config.TAG = output, tag
    metrics = os.path.join(run_folder(config), 'metrics.jsonl')
    if os.path.isfile(metrics):
        result.run_dir = os.path.dirname(metrics)
        result.evals, result.throughput = evaluations_and_throughput(metrics)
        result.epochs = config.TRAIN.EPOCHS
        run_config = os.path.join(result.run_dir, 'config.yaml')
        if os.path.isfile(run_config):
            result.epochs = load_config(run_config).TRAIN.EPOCHS
    return result


def _number(value: Optional[float], digits: int = 1) -> str:
    return '—' if value is None else f'{value:.{digits}f}'


def _paper_cell(paper: Paper, name: str) -> str:
    value = getattr(paper, name)
    return '—' if value is None else f'{value:.1f}'


def top1_cell(result: Result) -> str:
    if result.row.config is None:
        return 'not reproducible here'
    if result.run_dir is None:
        return 'not run'
    if not result.evals:
        return 'no evaluation yet'
    cell = f'{result.top1:.2f}'
    if result.max_top1 is not None and result.max_top1 > result.top1 + 0.005:
        cell += f' (max {result.max_top1:.2f})'
    if result.last_epoch is not None and result.epochs and result.last_epoch + 1 < result.epochs:
        cell += f' (epoch {result.last_epoch + 1}/{result.epochs})'
    return cell


def render_table(table: Table, results: Sequence[Result]) -> str:
    """One table in Markdown: paper and ours side by side, the paper's box and mask AP when the
    table has any, then the table's notes."""
    with_ap = any(r.row.paper.box_ap is not None or r.row.paper.mask_ap is not None
                  for r in results)
    header = ('| Model | Params (M) paper | ours | GFLOPs paper | ours | Top-1 paper | ours '
              '| img/s ours |')
    rule = '|---|---:|---:|---:|---:|---:|---:|---:|'
    if with_ap:
        header += ' Box AP paper | Mask AP paper |'
        rule += '---:|---:|'
    lines = [f'### {table.title}', '', header, rule]
    for result in results:
        paper = result.row.paper
        cells = [
            result.row.label,
            _paper_cell(paper, 'params'), _number(result.params, 2),
            _paper_cell(paper, 'gflops'), _number(result.gflops, 2),
            _paper_cell(paper, 'top1'), top1_cell(result),
            _number(result.throughput, 0),
        ]
        if with_ap:
            cells += [_paper_cell(paper, 'box_ap'), _paper_cell(paper, 'mask_ap')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += [''] + [f'- {note}' for note in table.notes]
    return '\n'.join(lines) + '\n'


def family(label: str) -> str:
    """Model family of a row label: 'Focal-Tiny' -> 'Focal', 'ViT-Base/16 (384)' -> 'ViT'."""
    return label.split('-')[0].split(',')[0]


def plot_top1(results: Sequence[Result], x: str, path: str) -> None:
    """Top-1 against `x` ('gflops' or 'throughput'), one colour per model family: ours filled with
    solid lines, the paper's hollow with dashed lines (the paper reports no throughput, so that
    plot has ours only)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(family(r.row.label) for r in results))
    colours = dict(zip(families, plt.get_cmap('tab10').colors))
    fig, ax = plt.subplots(figsize=(7, 5))
    for name in families:
        members = [r for r in results if family(r.row.label) == name]
        ours = [(getattr(r, x), r.top1) for r in members
                if getattr(r, x) is not None and r.top1 is not None]
        paper = [(getattr(r.row.paper, x, None), r.row.paper.top1) for r in members]
        paper = [point for point in paper if None not in point]
        if ours:
            ax.plot(*zip(*sorted(ours)), 'o-', color=colours[name], label=f'{name} (ours)')
        if paper:
            ax.plot(*zip(*sorted(paper)), 'o--', color=colours[name], markerfacecolor='none',
                    label=f'{name} (paper)')
    ax.set_xscale('log')
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel('GFLOPs (multiply-adds, batch 1)' if x == 'gflops' else 'throughput (img/s)')
    ax.set_ylabel('ImageNet-1K top-1 (%)')
    ax.grid(alpha=0.3, which='both')
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2, loc='lower right')
    else:
        ax.text(0.5, 0.5, 'no finished runs yet', ha='center', transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--output', default='output',
                        help='root of the run folders (main.py --output)')
    parser.add_argument('--tag', default='default', help='run tag (main.py --tag)')
    parser.add_argument('--tables', nargs='+', choices=list(TABLES), default=list(TABLES))
    parser.add_argument('--plots', default='docs/figures',
                        help="folder for the Table 2 plots; '' to skip them")
    args = parser.parse_args()

    for key in args.tables:
        tag = 'released' if key == 'released' else args.tag
        results = [measure(row, args.output, tag) for row in TABLES[key].rows]
        print(render_table(TABLES[key], results))
        if key == '2' and args.plots:
            os.makedirs(args.plots, exist_ok=True)
            for x in ('gflops', 'throughput'):
                path = os.path.join(args.plots, f'top1_vs_{x}.png')
                plot_top1(results, x, path)
                print(f'wrote {path}', file=sys.stderr)


if __name__ == '__main__':
    main()
