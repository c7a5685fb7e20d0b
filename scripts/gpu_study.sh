#!/usr/bin/env bash
# The Fashion-MNIST study (second version) on one GPU machine (16 cores or so):
#   LIMIT=3600 JOBS=8 bash scripts/gpu_study.sh
# The study's small networks leave a GPU mostly idle, so the cells run in JOBS worker processes
# (`didicm study --jobs`), cheapest cells first. Everything is resumable: a second run reads finished arms
# back and resumes an arm's training from its last checkpoint. LIMIT (seconds) stops every process; finished
# arms are kept. PEERS=1 also runs the generative peers' study config when it exists. BENCH=1 (the default)
# first measures checked against sync-free training steps and counts CUDA syncs (benchmarks/bench_train_step.py).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-3600}
JOBS=${JOBS:-8}
mkdir -p logs
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if [ "${BENCH:-1}" = 1 ]; then
    timeout 300 "$PY" benchmarks/bench_train_step.py --device cuda --steps 300 --rounds 3 2>&1 | tee logs/bench_train_step.log
fi
timeout "$LIMIT" "$PY" -m didicm.cli study configs/study_fashion_mnist.yaml --jobs "$JOBS" --no-progress \
    > logs/study.log 2>&1 &
if [ "${PEERS:-0}" = 1 ] && [ -f configs/study_fashion_mnist_peers.yaml ]; then
    timeout "$LIMIT" "$PY" -m didicm.cli study configs/study_fashion_mnist_peers.yaml --jobs 2 --no-progress \
        > logs/study_peers.log 2>&1 &
fi
wait
echo "done after ${SECONDS} s"
ls results/fashion-mnist/cells
