"""Per fused-kernel launch of a model, compiled ahead of time for CUDA architectures without a GPU:
registers, spilled bytes, shared memory, tensor-core (HMMA/HGMMA) and total SASS instructions.

    python scripts/kernel_report.py                                    # Focal-T, bf16, sm_80 and sm_90
    python scripts/kernel_report.py --model focal_base --dtype fp16 fp32 --arch 75 80 90
    python scripts/kernel_report.py --model configs/ablations/focal_tiny_window14.yaml
    python scripts/kernel_report.py --model backbone:focal_tiny@800x1333 --json kernels.json
    python scripts/kernel_report.py --model all --dtype all            # what tests/test_kernel_compile.py compiles

A model is a name of scripts/kernel_aot.py's CASES, a timm model name, a YAML config or
`backbone:VARIANT`, with `@HxW` for the input size. Launches are recorded from one forward and
backward at --batch on the CPU and compiled with the installed Triton as its JIT would compile them
on that GPU (see kernel_aot.py). Each row is one distinct kernel; `used by` names the runs that launch it.

Read it as: a kernel that does not compile here does not compile on that GPU (exit status 1);
`spill` bytes are local-memory stores/loads the register allocator added (in the hot loop they cost
bandwidth); registers x 32 x warps and shared memory bound the programs per multiprocessor (65,536
registers and 228 KB on sm_80/sm_90, 64 KB of shared memory on sm_75); no HMMA/HGMMA means the dots
run on the CUDA cores. Speed itself needs a GPU (scripts/gpu_checks.sh).
"""
import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernel_aot  # noqa: E402  (scripts/kernel_aot.py)

DTYPE_NAMES = {'fp32': 'float32', 'fp16': 'float16', 'bf16': 'bfloat16', **{d: d for d in kernel_aot.DTYPES}}


def table(summary: kernel_aot.Summary) -> str:
    rows = ['| kernel | sm | constexprs | warps | stages | regs | spill st/ld B | stack B | smem B | HMMA | HGMMA '
            '| SASS | compile CPU s | used by |',
            '| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |']
    for c in sorted(summary.compiled, key=lambda c: (c.launch.kernel, c.arch, c.uses[0], c.launch.constexprs())):
        head = f'| {c.launch.kernel} | {c.arch} | {c.launch.constexprs()} | {c.launch.options().get("num_warps", "")} |'
        if c.error:
            rows.append(f'{head} COMPILE FAILED: {c.error.splitlines()[-1][:100]} |||||||| {c.cpu_s:.1f} | '
                        f'{", ".join(c.uses)} |')
            continue
        s = c.stats
        rows.append(f'{head} {s["num_stages"]} | {s["registers"]} | {s["spill_store_bytes"]}/{s["spill_load_bytes"]} | '
                    f'{s["stack_bytes"]} | {s["shared_bytes"]} | {s["hmma"]} | {s["hgmma"]} | {s["instructions"]} | '
                    f'{c.cpu_s:.1f} | {", ".join(c.uses)} |')
    return '\n'.join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', nargs='+', default=['focal_tiny'],
                        help=f'cases ({", ".join(kernel_aot.CASES)}), timm names, configs, backbone:VARIANT[@HxW]; '
                        'all: every case')
    parser.add_argument('--dtype', nargs='+', default=['bf16'], help='fp32 fp16 bf16, or all')
    parser.add_argument('--arch', nargs='+', type=int, default=[80, 90], help='compute capabilities, e.g. 75 80 90')
    parser.add_argument('--batch', type=int, default=1, help='batch of the recorded run: integer arguments that '
                        'grow with it specialise differently at 1 (128 gives a training run\'s); costs no more')
    parser.add_argument('--tf32', action='store_true', help='fp32 launches as with TF32 matmuls allowed '
                        '(torch.backends.cuda.matmul.allow_tf32; PyTorch\'s default is off)')
    parser.add_argument('--configurations', action='store_true', help='one kernel per configuration, as the test '
                        'compiles (default: every integer/alignment specialisation the JIT would compile)')
    parser.add_argument('--processes', type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument('--json', help='also write every result (stats, hints, timings) to this file')
    args = parser.parse_args()
    cases = list(kernel_aot.CASES) if args.model == ['all'] else args.model
    dtypes = list(kernel_aot.DTYPES) if args.dtype == ['all'] else args.dtype
    unknown = [d for d in dtypes if d not in DTYPE_NAMES]
    if unknown:
        sys.exit(f'error: --dtype {" ".join(unknown)}: choose from fp32 fp16 bf16 (or all)')
    try:
        summary = kernel_aot.compile_cases(cases, [DTYPE_NAMES[d] for d in dtypes], args.arch, stats=True,
                                           batch=args.batch, tf32=args.tf32, exact=not args.configurations,
                                           processes=args.processes)
    except kernel_aot.CaseError as error:
        sys.exit(f'error: {error}')
    print(table(summary))
    print(f'\n{summary.timing()}; {args.processes} processes')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(dataclasses.asdict(summary), compiled=[dict(dataclasses.asdict(c), launch=repr(c.launch))
                                                                  for c in summary.compiled]), f, indent=1)
    failures = kernel_aot.failure_report(summary.triton_version, summary.compiled)
    if failures:
        print(f'\n{failures}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
