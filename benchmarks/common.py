"""Shared helpers of the benchmarks: timing, peak memory in a subprocess, JSON output, machine info."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bdh.errors import UserError
from bdh.fileio import check_output_file, write_output_file
from bdh.ops.plan import cpu_name


def machine() -> dict:
    flags = _cpu_flags()
    info = {
        "cpu": cpu_name(),
        "avx512": any(f.startswith("avx512") for f in flags),
        "avx2": "avx2" in flags,
        # what the kernels may use: torch's (ATEN_CPU_CAPABILITY lowers it) and MKL's limit, if one is set
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def timed(fn, repeats: int, warmup: int = 1, sync=None) -> list[float]:
    """Wall-clock seconds of each of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 matmul throughput with a preallocated output: the machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    t = median(timed(lambda: torch.mm(a, b, out=out), repeats, warmup=2))
    return 2 * n**3 / t / 1e9


def peak_rss_of(code: str) -> int:
    """Peak resident memory (bytes) of a fresh Python process running `code`, minus its baseline."""
    probe = (
        "import resource, torch\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"{code}\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def add_out_args(parser) -> None:
    """--out and --overwrite, the same for every benchmark."""
    parser.add_argument("--out", default=None, help="write the JSON result to this file (new, or with --overwrite "
                        "an earlier result of bdh's; never a file bdh did not write)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier result of bdh's at --out")


def check_out(args) -> None:
    """Refuse an --out that may not be written before measuring anything: one line, exit status 2."""
    if args.out:
        _or_exit(lambda: check_output_file(Path(args.out), args.overwrite, "--overwrite"))


def check_device(name: str) -> str:
    """A --device value as torch names it, or one line and exit status 2 where it is bad or absent."""
    from bdh.precision import resolve_device
    return str(_or_exit(lambda: resolve_device(name)))


def emit(name: str, result: dict, out: str | None, overwrite: bool = False) -> None:
    """Print the result as JSON and, if asked, write it to a file (atomically; marked as bdh's)."""
    payload = {"benchmark": name, "written_by": "bdh", "machine": machine(),
               "time": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    text = json.dumps(payload, indent=2)
    print(text)
    if out:
        _or_exit(lambda: write_output_file(Path(out), (text + "\n").encode(), overwrite, "--overwrite"))


def _or_exit(action):
    """action()'s value, or its UserError as one line on stderr and exit status 2."""
    try:
        return action()
    except UserError as err:
        print(f"bdh: error: {err}", file=sys.stderr)
        sys.exit(2)


def self_usage() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


FUSED = {"auto": "auto", "on": True, "off": False}  # a --fused flag's values as BDHConfig.fused


def bdh_model(preset: str, ckpt: str, dropout: float, compute_dtype: str = "float32", fused: str = "auto"):
    """A BDH of a preset (fresh weights), or with ckpt the trained weights and config of that checkpoint,
    at this dropout, compute_dtype and fused (a key of FUSED)."""
    from bdh import BDH, BDHConfig
    from bdh.checkpoint import load_model
    settings = {"dropout": dropout, "compute_dtype": compute_dtype, "fused": FUSED[fused]}
    if not ckpt:
        return BDH(BDHConfig.from_name(preset, **settings))
    trained = load_model(ckpt)
    model = BDH(BDHConfig.from_dict({**trained.config.to_dict(), **settings}))
    model.load_state_dict(trained.state_dict())
    return model


def token_batches(ckpt: str, T: int, B: int, vocab: int):
    """(x, y) of B sequences of T tokens, again and again: with ckpt, windows of the default corpus
    (text like the model was trained on, so that y is as sparse as in training), else random tokens."""
    g = torch.Generator().manual_seed(1)
    if ckpt:
        from bdh.data import load_corpus
        data = torch.tensor(list(load_corpus("shakespeare").train[:200_000].encode()), dtype=torch.long)
    while True:
        if not ckpt:
            yield torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)
            continue
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        yield (torch.stack([data[s:s + T] for s in starts]), torch.stack([data[s + 1:s + T + 1] for s in starts]))
