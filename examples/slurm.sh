#!/usr/bin/env bash
# Build an atlas on a Slurm cluster with torchrun: one torchrun per node, every GPU of each node a rank.
# Usage: sbatch examples/slurm.sh my.toml     (data_dir must be on a filesystem all nodes share)
#SBATCH --job-name=neuron-atlas
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
set -euo pipefail
CONFIG=${1:?usage: sbatch examples/slurm.sh CONFIG}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc-per-node "${SLURM_GPUS_PER_NODE:-8}" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD:29500" --rdzv-id "$SLURM_JOB_ID" \
    -m atlas_builder build "$CONFIG"
