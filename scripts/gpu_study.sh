#!/usr/bin/env bash
# The Fashion-MNIST study and its recipe ablations side by side on one GPU machine (16 cores or so).
#   LIMIT=3600 JOBS=8 bash scripts/gpu_study.sh
# The study's small networks leave a GPU mostly idle, so the cells run in JOBS worker processes
# (`didicm study --jobs`) and each group of ablations in a process of its own. Everything is resumable: a
# second run skips finished cells and variants. LIMIT (seconds) stops every process; finished work is kept.
# The ablation groups land in results/fashion-mnist/ablations_gpu/<group>.json (validation split only), the
# generative peers in results/fashion-mnist/peers_parts/<cell>_seed<seed>.json (test split).
# STUDY=0 skips the study grid (e.g. when its cells are already committed).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-3600}
JOBS=${JOBS:-8}
mkdir -p logs results/fashion-mnist/ablations_gpu
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

if [ "${STUDY:-1}" = 1 ]; then
    timeout "$LIMIT" "$PY" -m didicm.cli study configs/study_fashion_mnist.yaml --jobs "$JOBS" --no-progress \
        > logs/study.log 2>&1 &
fi

ablate() {  # ablate GROUP CELL VARIANT...
    local group=$1 cell=$2
    shift 2
    # shellcheck disable=SC2086  # SEEDS is a list
    timeout "$LIMIT" "$PY" benchmarks/ablations.py --cell "$cell" --seeds ${SEEDS:-0 1} --variants "$@" \
        --out "results/fashion-mnist/ablations_gpu/$group.json" --runs runs/ablations_gpu \
        > "logs/ablations_$group.log" 2>&1 &
}
peer() {  # peer CELL SEED: the generative peers (benchmarks/peers.py) in one cell
    timeout "$LIMIT" "$PY" benchmarks/peers.py --cells "$1" --seeds "$2" --steps "${PEER_STEPS:-2000}" \
        --val-limit 1000 --dc-limit "${DC_LIMIT:-5000}" \
        --out "results/fashion-mnist/peers_parts/$1_seed$2.json" > "logs/peers_$1_seed$2.log" 2>&1 &
}
mkdir -p results/fashion-mnist/peers_parts
for cell in res28_ratio1 res7_ratio0.02; do for seed in 0 1; do peer $cell $seed; done; done
# easiest cell (its 800-step twin and DiDiCM are the study's own cells): does DiDiCM's deficit at full data
# close with training length or the hybrid loss? Is the paper's stock-stem baseline weaker than the twin?
ablate easy1 res28_ratio1 long
ablate easy2 res28_ratio1 twin_long
SEEDS=0 ablate easy3 res28_ratio1 long4
SEEDS=0 ablate easy4 res28_ratio1 twin_long4
ablate easy5 res28_ratio1 timm_resnet18 mean_hybrid
# hardest cell: the paper's baseline, the wrapper, augmentation (the twin's TTA control is then fair)
ablate hard1 res7_ratio0.02 timm_resnet18 wrapper
ablate hard2 res7_ratio0.02 aug twin_aug
wait
echo "done after ${SECONDS} s"
ls results/fashion-mnist/cells results/fashion-mnist/ablations_gpu results/fashion-mnist/peers_parts
