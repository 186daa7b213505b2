#!/usr/bin/env bash
# How the `small` preset was chosen: five candidate shapes, each trained for the same wall-clock
# budget (about 2.7 minutes on 2 cores, batch 16 x 128 bytes of Shakespeare, the default
# optimizer and schedule with max_iters set so that the schedule ends near the budget), compared
# on validation loss. Results are in the README ("Choosing the small preset").
#   bash benchmarks/preset_search.sh OUTDIR
# Iteration counts (A..E) came from a 4-step speed probe on the same machine; override them with
# environment variables of the same names on another machine.
set -u
out=${1:-runs/preset-search}
mkdir -p "$out"
run() {  # name, iterations, model fields...
  name=$1; iters=$2; shift 2
  margs=()
  for a in "$@"; do margs+=(--model-arg "$a"); done
  bdh train --preset small "${margs[@]}" --max-iters "$iters" --max-minutes 2.7 --eval-interval 0 \
     --eval-iters 40 --sample-tokens 0 --ckpt-interval 0 --overwrite --out "$out/$name" > "$out/$name.log" 2>&1
  tail -n 1 "$out/$name.log"
}
run A-L4-D128-n4096 "${A:-138}" n_layer=4 n_embd=128 n_head=4 mlp_internal_dim_multiplier=32
run B-L4-D128-n2048 "${B:-446}" n_layer=4 n_embd=128 n_head=4 mlp_internal_dim_multiplier=16
run C-L6-D128-n2048 "${C:-305}" n_layer=6 n_embd=128 n_head=4 mlp_internal_dim_multiplier=16
run D-L3-D192-n3072 "${D:-357}" n_layer=3 n_embd=192 n_head=4 mlp_internal_dim_multiplier=16
run E-L2-D128-n4096 "${E:-490}" n_layer=2 n_embd=128 n_head=4 mlp_internal_dim_multiplier=32
