#!/bin/bash
# Train on several SLURM nodes: one torchrun agent per node, one process per GPU, meeting at a c10d
# rendezvous on the job's first node. See docs/distributed.md.
#
#   sbatch --nodes 4 scripts/slurm_train.sh -c configs/xcit/xcit_small_12_p16_224.yaml -o data.root=/data/shards
#   sbatch --nodes 4 scripts/slurm_train.sh -c CONFIG --resume runs/NAME/last.pth
#
# Arguments go to `xcit train`. XCIT_RDZV_PORT (default 29500) is the rendezvous port on the first node;
# XCIT_PROCS_PER_NODE (default: the GPUs SLURM gave the node) the processes per node.
#SBATCH --job-name=xcit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --output=%x-%j.out
set -euo pipefail

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
procs=${XCIT_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}

# one task per node: srun starts the agents, torchrun the processes; a failed node ends the job
exec srun --kill-on-bad-exit=1 --ntasks-per-node=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$procs" \
    --rdzv-backend c10d --rdzv-endpoint "$head_node:${XCIT_RDZV_PORT:-29500}" --rdzv-id "$SLURM_JOB_ID" \
    -m xcit.cli.main train "$@"
