#!/usr/bin/env bash
# The Fashion-MNIST study and its recipe ablations side by side on one GPU machine (16 cores or so).
#   LIMIT=3600 JOBS=8 bash scripts/gpu_study.sh
# The study's small networks leave a GPU mostly idle, so the cells run in JOBS worker processes
# (`didicm study --jobs`) and each group of ablations in a process of its own. Everything is resumable: a
# second run skips finished cells and variants. LIMIT (seconds) stops every process; finished work is kept.
# The ablation groups land in results/fashion-mnist/ablations_gpu/<group>.json (validation split only).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-3600}
JOBS=${JOBS:-8}
mkdir -p logs results/fashion-mnist/ablations_gpu
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

timeout "$LIMIT" "$PY" -m didicm.cli study configs/study_fashion_mnist.yaml --jobs "$JOBS" --no-progress \
    > logs/study.log 2>&1 &

ablate() {  # ablate GROUP CELL VARIANT...
    local group=$1 cell=$2
    shift 2
    timeout "$LIMIT" "$PY" benchmarks/ablations.py --cell "$cell" --seeds 0 1 --variants "$@" \
        --out "results/fashion-mnist/ablations_gpu/$group.json" --runs runs/ablations_gpu \
        > "logs/ablations_$group.log" 2>&1 &
}
ablate hard1 res7_ratio0.02 twin base timm_resnet18 wrapper
ablate hard2 res7_ratio0.02 aug twin_aug film mean
ablate hard3 res7_ratio0.02 long twin_long mixup twin_mixup
ablate hard4 res7_ratio0.02 long4 twin_long4 eps1e-2 geometric
ablate easy1 res28_ratio1 twin base timm_resnet18
ablate easy2 res28_ratio1 wrapper film mean
wait
echo "done after ${SECONDS} s"
ls results/fashion-mnist/cells results/fashion-mnist/ablations_gpu
