#!/usr/bin/env bash
# The speed table on one GPU (README "Benchmark"): the train step of the 1.5B shape at seq 4096,
# text-only and with K=8 audio streams, then decode throughput of the 1.5B shape with and
# without guidance. One JSON line per measurement on stdout (and in $OUT/gpu_bench.jsonl when
# OUT is set). Needs jax with CUDA, flax, optax, orbax-checkpoint and numpy; no data stack
# (grain, seqio, tensorflow): the benches use synthetic batches and random weights.
#
#   bash launch/gpu_bench.sh                 # from the repository root
#   BATCH=8 SEQ=4096 REMAT=full bash launch/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
BATCH=${BATCH:-8}
SEQ=${SEQ:-4096}
REMAT=${REMAT:-full}
STEPS=${STEPS:-10}
DECODE_BATCH=${DECODE_BATCH:-32}
out=${OUT:+$OUT/gpu_bench.jsonl}

run() {
  echo "# ualm bench $*" >&2
  if [ -n "$out" ]; then
    "$PY" -m ualm_jax.cli bench "$@" | tee -a "$out"
  else
    "$PY" -m ualm_jax.cli bench "$@"
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" >&2

# UALM-Gen's shape: the 1.5B backbone, K=8 audio streams, no audio encoder (text-to-audio only).
step=(step --model 1.5b --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --warmup 2
      "model.remat=$REMAT")
gen=(model.audio_encoder.enabled=false)
run "${step[@]}" --text-only
run "${step[@]}" "${gen[@]}"                                    # the reference objective
run "${step[@]}" "${gen[@]}" model.loss_objective=consistent    # stream k over its codebook
dec=(decode --model 1.5b --batch "$DECODE_BATCH" --prompt-len 64 --max-new 256 --steps 2
     "${gen[@]}")
run "${dec[@]}"
run "${dec[@]}" --cfg 3.0 --no-host-loop
