#!/bin/bash
# Strong scaling on a Slurm cluster: the same global batch on 1, 2, 4 ... nodes, then
# the report. Submit once from the repository root:
#
#   sbatch slurm/strong_scaling.sh
#   EXP=transformer NODES="1 2 4 8" sbatch --nodes=8 slurm/strong_scaling.sh
#
# EDIT the #SBATCH lines below for your cluster: account, partition, time, and on GPU
# nodes the GPUs per node (one rank per GPU, NCCL). Without GPUs each node runs
# PROCS_PER_NODE ranks on the CPU (gloo). Options given to sbatch override these lines.
#
#SBATCH --job-name=strong-scaling
#SBATCH --nodes=2                 # the largest node count in NODES
#SBATCH --ntasks-per-node=1       # = GPUs per node on GPU nodes (= PROCS_PER_NODE)
#SBATCH --cpus-per-task=1         # cores per rank: its threads (OMP_NUM_THREADS) and data loading
#SBATCH --time=00:30:00           # every point plus the report
##SBATCH --gpus-per-node=4        # GPU nodes: remove one '#' and set the count
##SBATCH --account=my_account     # remove one '#' and set yours
##SBATCH --partition=my_partition # remove one '#' and set yours
#SBATCH --signal=B:USR1@120       # 120 s before the limit: stop the running point cleanly
#SBATCH --requeue                 # after that stop, or preemption, continue in a requeued job
#SBATCH --open-mode=append        # a requeued job appends to the same output file
#SBATCH --output=%x-%j.out
#
# Environment variables, each with a default (docs/contract.md, "Slurm scripts"):
#   NODES="1 2 4"       node counts            (default: 1 2 4 ... up to the allocation)
#   PROCS_PER_NODE=4    ranks per node         (default: GPUs per node, or 1)
#   EXP=resnet          experiment             (default: resnet)
#   OVERRIDES="train.steps=50 dist.bucket_cap_mb=50"   more Hydra overrides
#   GLOBAL_BATCH=256    fixed global batch     (default: train.batch_size x the smallest world size)
#   REPEATS=1           runs per node count
#   SWEEP="dist.bucket_cap_mb=1,25 comm.hook=allreduce,fp16"   a sweep (Hydra's -m syntax): one
#                       study per combination in this allocation, then one comparison report
#   STUDY=name          study name; reuse one to continue it (default: strong-j<jobid>-<time>;
#                       with SWEEP the sweep folder, default strong-sweep-j<jobid>)
#   RUNS_ROOT=runs      where the records go   (default: $SLURM_SUBMIT_DIR/runs)
#   SCALING_SETUP=env.sh  a file sourced first (modules, venv); default: the python on
#                         the PATH exported at submission

# Slurm runs a copy of this script: find the folder of the original to reach common.sh.
SCALING_SLURM_DIR=${SCALING_SLURM_DIR:-$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null |
    sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")}
[[ -r $SCALING_SLURM_DIR/common.sh ]] || SCALING_SLURM_DIR=${SLURM_SUBMIT_DIR:-.}/slurm
# shellcheck source=common.sh
source "$SCALING_SLURM_DIR/common.sh" || { echo "cannot read $SCALING_SLURM_DIR/common.sh; set SCALING_SLURM_DIR" >&2; exit 2; }
scaling_setup

# The study itself (points under srun, resume, the early stop, requeue, the report): scaling.study.
read -ra NODE_COUNTS <<<"${NODES:-}"
scaling_study_args strong
scaling_run child "$PYTHON" -m scaling.study "${NAME_ARGS[@]}" "+exp=$EXP" study=strong "${OVERRIDE_ARGS[@]}" "paths.root=$RUNS_ROOT" \
    ${NODES:+"study.nodes=[$(IFS=,; echo "${NODE_COUNTS[*]}")]"} ${PROCS_PER_NODE:+"study.procs_per_node=$PROCS_PER_NODE"} \
    ${REPEATS:+"study.repeats=$REPEATS"} ${GLOBAL_BATCH:+"train.global_batch_size=$GLOBAL_BATCH"}
