# Sourced by slurm/train.sbatch, strong_scaling.sh and weak_scaling.sh inside the allocation:
# the job's environment, and a command run with the scheduler's signals passed on to it.
#
#   SCALING_SETUP   a file sourced first (module load ..., source venv/bin/activate)
#                   (default: none; the python on the PATH exported at submission is used)
#
# Exit status of a job: 0 every point completed; 1 a point or the report failed; 2 a configuration
# mistake; 3 stopped early by a signal (time limit, preemption).

scaling_log() { echo "[scaling $(date +%H:%M:%S)] $*"; }
scaling_die() {
    scaling_log "error: $*" >&2
    exit 2
}

scaling_setup() {
    [[ -n ${SLURM_JOB_ID:-} ]] || scaling_die "submit this script with sbatch (SLURM_JOB_ID is not set)"
    trap 'scaling_log "job ${SLURM_JOB_ID:-?} ends with exit status $?"' EXIT
    if [[ -n ${SCALING_SETUP:-} ]]; then
        [[ -r $SCALING_SETUP ]] || scaling_die "SCALING_SETUP=$SCALING_SETUP is not a readable file"
        scaling_log "sourcing $SCALING_SETUP"
        # shellcheck disable=SC1090
        source "$SCALING_SETUP" || scaling_die "SCALING_SETUP=$SCALING_SETUP failed"
    fi
    # A venv or module provides `python`; some systems only `python3`.
    PYTHON=$(command -v python || command -v python3) ||
        scaling_die "no python on the PATH; point SCALING_SETUP at a file that loads your modules or venv"
    "$PYTHON" -c "import scaling" 2>/dev/null ||
        scaling_die "$PYTHON cannot import scaling; pip install -e . in the environment SCALING_SETUP activates"
    scaling_log "python: $PYTHON"
    EXP=${EXP:-resnet}
    read -ra OVERRIDE_ARGS <<<"${OVERRIDES:-}"
    RUNS_ROOT=$(realpath -m "${RUNS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}/runs}")
}

# scaling_study_args KIND: NAME_ARGS, the arguments that name the study, or with SWEEP set the
# sweep (scaling.study -m, one study per combination, all in this allocation). The sweep's folder
# is $RUNS_ROOT/$STUDY, by default KIND-sweep-j<job id>: a requeued job finds it again.
scaling_study_args() {
    local kind=$1 sweep_args
    if [[ -n ${SWEEP:-} ]]; then
        read -ra sweep_args <<<"$SWEEP"
        STUDY=${STUDY:-$kind-sweep-j$SLURM_JOB_ID}
        NAME_ARGS=(-m "${sweep_args[@]}" "hydra.sweep.dir=$RUNS_ROOT/$STUDY")
        scaling_log "sweep $STUDY: ${sweep_args[*]}"
    else
        NAME_ARGS=(${STUDY:+"study.name=$STUDY"})
    fi
}

# scaling_run HOW COMMAND...: run COMMAND, passing the early-stop SIGUSR1 (--signal=B:USR1@<s>
# reaches this shell only) on: HOW=child to COMMAND itself, HOW=steps to the job's steps.
# Returns COMMAND's exit status.
scaling_run() {
    local how=$1 pid rc
    shift
    "$@" &
    pid=$!
    # shellcheck disable=SC2064
    if [[ $how == child ]]; then
        trap "scaling_log 'received SIGUSR1: passing it on'; kill -USR1 $pid" USR1
    else
        trap "scaling_log 'received SIGUSR1: stopping the run cleanly'; STOPPED=1; scancel --signal=USR1 $SLURM_JOB_ID || kill -USR1 $pid" USR1
    fi
    trap 'scaling_log "received SIGTERM"; STOPPED=1' TERM
    while true; do
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || break  # else a trap interrupted the wait
    done
    trap - USR1 TERM
    return "$rc"
}
