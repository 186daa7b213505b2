#!/usr/bin/env bash
# The CUDA path's tests and the benchmark against the authors' form on a GPU, in one command
# (a GPU machine is lent only now and then: what it shows is in benchmarks/README.md, "On a GPU").
#   bash benchmarks/cuda.sh OUTDIR [first|second]
# On an H100 all of it did not finish in 570 s (the bf16 bench was cut off): where a call stops at
# 10 minutes, run it as two, `first` (the tests, fused="auto" at 2,048 and 32,768 tokens per step,
# the op-by-op layer) and `second` (the fused layer, its profile, bf16).
# Uses the torch already installed (any CUDA build, 2.3 or later), not the CPU pin of constraints.txt.
set -uo pipefail
out=${1:?usage: bash benchmarks/cuda.sh OUTDIR [first|second]}
part=${2:-all}
case $part in all|first|second) ;; *) echo "cuda.sh: the part must be first or second (or left out for all); got '$part'" >&2; exit 2;; esac
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
bench() {  # name, then vs_authors flags
    local name=$1; shift
    python3 benchmarks/vs_authors.py --device cuda --seq 128 512 2048 --dropout 0 0.1 --repeats 10 "$@" \
        --out "$out/vs_authors_cuda_$name.json" > /dev/null && echo "vs_authors $name: done"
}
if [[ $part != second ]]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt"
    bench 2k_auto --tokens-per-step 2048               # what fused="auto" picks (timed per shape off the CPU)
    bench 32k_auto --tokens-per-step 32768
    bench 32k_opbyop --tokens-per-step 32768 --fused off
fi
if [[ $part != first ]]; then
    bench 32k_fused --tokens-per-step 32768 --fused on  # weight products batched or not, as timed
    python3 benchmarks/profile_step.py --device cuda --fused on --seq 128 --batch 256 --top 30 \
        --out "$out/profile_cuda_256x128.json" > /dev/null && echo "profile: done"
    bench 32k_bf16 --tokens-per-step 32768 --dtype bfloat16
fi
python3 - "$out" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("vs_authors_cuda_*.json")):
    for r in json.loads(f.read_text())["results"]:
        b, a = r["forms"]["bdh"], r["forms"]["authors"]
        print(f.stem, r["T"], r["batch"], r["dropout"], r.get("engine"), b.get("tokens_per_s"), a.get("tokens_per_s"),
              r.get("speedup"), r.get("memory_ratio"), b.get("error", ""), a.get("error", ""))
PY
