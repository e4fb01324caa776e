# Shared logic of slurm/train.sbatch, slurm/strong_scaling.sh and slurm/weak_scaling.sh.
# Sourced by them inside the allocation; not a job script itself.
#
# Environment variables (all optional; sbatch passes your shell's environment on):
#   EXP             experiment overlay, +exp=$EXP                      (default: resnet)
#   OVERRIDES       more Hydra overrides, space-separated               (default: none)
#   RUNS_ROOT       paths.root, where the records go                    (default: $SLURM_SUBMIT_DIR/runs)
#   STUDY           study name; set it to continue an earlier study     (default: <kind>-j<jobid>-<start time>)
#   NODES           node counts to run, space-separated                 (default: 1 2 4 ... up to the allocation)
#   PROCS_PER_NODE  processes (ranks) per node                          (default: GPUs per node, or 1)
#   REPEATS         runs per node count                                 (default: 1)
#   GLOBAL_BATCH    strong scaling: the fixed global batch              (default: 32 per rank at the smallest point)
#   BATCH_PER_RANK  weak scaling: the fixed per-rank batch              (default: the experiment's train.batch_size)
#   SCALING_SETUP   a file sourced first (module load ..., source venv/bin/activate)
#                   (default: none; the python on the PATH exported at submission is used)
#
# Exit status of a job: 0 every point completed; 1 a point or the report failed; 2 a configuration
# mistake; 3 stopped early by a signal (time limit, preemption): resubmit with the
# printed STUDY=... to continue from the first incomplete point.

SCALING_EXIT_FAILED=1
SCALING_EXIT_CONFIG=2
SCALING_EXIT_STOPPED=3

scaling_log() { echo "[scaling $(date +%H:%M:%S)] $*"; }
scaling_die() {
    echo "[scaling $(date +%H:%M:%S)] error: $*" >&2
    exit "$SCALING_EXIT_CONFIG"
}

scaling_on_exit() {
    local rc=$?
    scaling_log "job ${SLURM_JOB_ID:-?} ends with exit status $rc"
}

# ---------------------------------------------------------------- environment
scaling_setup() {
    [[ -n ${SLURM_JOB_ID:-} ]] || scaling_die "submit this script with sbatch (SLURM_JOB_ID is not set)"
    trap scaling_on_exit EXIT
    trap 'scaling_on_signal USR1' USR1
    trap 'scaling_on_signal TERM' TERM
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
    mkdir -p "$RUNS_ROOT" || scaling_die "RUNS_ROOT=$RUNS_ROOT cannot be created"
    ALLOC_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

    local gpus=${SLURM_GPUS_ON_NODE:-}
    if [[ -z $gpus && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        gpus=${SLURM_GPUS_PER_NODE##*:}  # "4" or "a100:4"
    fi
    [[ $gpus =~ ^[0-9]+$ && $gpus -gt 0 ]] || gpus=1
    PROCS_PER_NODE=${PROCS_PER_NODE:-$gpus}
    scaling_positive_int PROCS_PER_NODE "$PROCS_PER_NODE"
    REPEATS=${REPEATS:-1}
    scaling_positive_int REPEATS "$REPEATS"

    # srun sets no thread count, and torch would start one thread per core on every rank.
    CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
    export OMP_NUM_THREADS=$CPUS_PER_TASK

    # Rank 0 runs on the first node of every step (srun --relative=0); Slurm's own
    # address for that node is the one every node can reach.
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    MASTER_ADDR=$(scontrol show node "$first" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n1)
    export MASTER_ADDR=${MASTER_ADDR:-$first}
}

# $1 in single quotes, for a command line a user can paste.
scaling_quote() {
    local q="'\\''"
    printf "'%s'" "${1//\'/$q}"
}

scaling_positive_int() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || scaling_die "$1 must be a positive integer (got '$2')"
}

# NODES from the environment, checked against the allocation; default 1 2 4 ... N.
scaling_node_counts() {
    local n
    if [[ -z ${NODES:-} ]]; then
        NODES=""
        for ((n = 1; n < ALLOC_NODES; n *= 2)); do NODES+="$n "; done
        NODES+="$ALLOC_NODES"
    fi
    read -ra NODE_COUNTS <<<"$NODES"
    ((${#NODE_COUNTS[@]} > 0)) || scaling_die "NODES is empty"
    for n in "${NODE_COUNTS[@]}"; do
        scaling_positive_int NODES "$n"
        ((n <= ALLOC_NODES)) || scaling_die "NODES has $n, but the job holds $ALLOC_NODES node(s); submit with --nodes=$n or more"
    done
}

# ---------------------------------------------------------------- study name
# A name derived from the job id alone would collide with an earlier study after the
# cluster's job ids restart, so the start time is added and the folder is claimed with
# mkdir. The name is kept in the job's Comment, so a requeued job finds its study again.
scaling_study_name() {
    local kind=$1 stored base k
    if [[ -n ${STUDY:-} ]]; then
        [[ $STUDY != */* && $STUDY != . && $STUDY != .. ]] || scaling_die "STUDY must be a plain folder name (got '$STUDY')"
        mkdir -p "$RUNS_ROOT/$STUDY" || scaling_die "cannot create $RUNS_ROOT/$STUDY"
        return
    fi
    stored=$(squeue -h -j "$SLURM_JOB_ID" -o %k 2>/dev/null | grep -o 'scaling_study=[^ ,]*' | head -n1)
    if [[ -n $stored && -d $RUNS_ROOT/${stored#*=} ]]; then
        STUDY=${stored#*=}
        scaling_log "restart ${SLURM_RESTART_COUNT:-0} of job $SLURM_JOB_ID: continuing study $STUDY"
        return
    fi
    base="$kind-j$SLURM_JOB_ID-$(date +%Y%m%d-%H%M%S)"
    STUDY=$base
    for ((k = 2; ; k++)); do
        mkdir "$RUNS_ROOT/$STUDY" 2>/dev/null && break
        [[ -d $RUNS_ROOT ]] || scaling_die "cannot create $RUNS_ROOT/$STUDY"
        STUDY="$base-$k"
    done
    local comment
    comment=$(squeue -h -j "$SLURM_JOB_ID" -o %k 2>/dev/null)
    [[ $comment == "(null)" ]] && comment=""
    scontrol update JobId="$SLURM_JOB_ID" Comment="${comment:+$comment }scaling_study=$STUDY" >/dev/null 2>&1 ||
        scaling_log "note: could not store the study name in the job's comment; after a requeue a new study starts"
}

# ---------------------------------------------------------------- signals
STEP_PID=""
STOP_SIGNAL=""

# --signal=B:USR1@<secs> reaches this shell only: pass it on to the running step, whose
# ranks record the run as failed with the reason and keep the steps measured so far.
# A TERM (scancel, preemption) reaches the steps from Slurm itself.
scaling_on_signal() {
    STOP_SIGNAL=$1
    scaling_log "received SIG$1: stopping the running point cleanly"
    if [[ $1 == USR1 && -n $STEP_PID ]] && kill -0 "$STEP_PID" 2>/dev/null; then
        scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$STEP_PID"
    fi
}

# ---------------------------------------------------------------- points
# The status in DIR/run.json: completed | failed | running | missing.
scaling_run_status() {
    "$PYTHON" - "$1/run.json" <<'PY' 2>/dev/null || echo missing
import json, sys
print(json.load(open(sys.argv[1])).get("status", "missing"))
PY
}

# A run stopped before its ranks could record why still says "running": say why.
scaling_mark_stopped() {
    "$PYTHON" - "$1/run.json" "$2" <<'PY' 2>/dev/null
import json, os, sys, time
path, reason = sys.argv[1], sys.argv[2]
run = json.load(open(path))
if run.get("status") == "running":
    run.update(status="failed", error=reason, failed_at=time.time())
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(run, f, indent=2)
    os.replace(tmp, path)
PY
}

# An earlier, incomplete attempt at a point is renamed <run_id>.failed-<time>, as a
# local study does (no run overwrites another); the point then runs again.
scaling_set_aside() {
    local dir=$1 dest
    dest="$dir.failed-$(date +%Y%m%d-%H%M%S)"
    [[ -e $dest ]] && dest="$dest-$$"
    mv "$dir" "$dest" && scaling_log "earlier attempt ($(scaling_run_status "$dest")) kept in $dest"
}

# A study continued under its old name must measure the same thing: the experiment,
# the overrides and the batch may not change (NODES and REPEATS may, to extend it).
scaling_check_resume() {
    local problem
    [[ -r $RUNS_ROOT/$STUDY/study.json ]] || return 0
    problem=$(SCALING_KIND=$1 SCALING_BATCH="$2" EXP=$EXP OVERRIDES=${OVERRIDES:-} "$PYTHON" - "$RUNS_ROOT/$STUDY/study.json" <<'PY'
import json, os, sys
try:
    old = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(0)
env = os.environ
now = {"kind": env["SCALING_KIND"], "exp": env["EXP"], "overrides": env["OVERRIDES"].split(),
       "batch": env["SCALING_BATCH"]}
before = {"kind": old.get("kind"), "exp": old.get("exp"), "overrides": old.get("overrides", []),
          "batch": old.get("batch_args", now["batch"])}
for key in now:
    if now[key] != before[key]:
        print(f"{key} was {before[key]!r}, now {now[key]!r}")
        break
PY
    )
    [[ -z $problem ]] || scaling_die "study $STUDY exists with other settings ($problem); use the same settings to continue it, or another STUDY"
}

# study.json, as a local study writes it: the definition, and each point's state
# read from its run folder (completed | failed | running | pending).
scaling_write_study_json() {
    SCALING_STUDY_STATUS=$1 SCALING_KIND=$2 SCALING_WORLDS="$3" SCALING_BATCH="$4" SCALING_GLOBAL_BATCH=${GLOBAL_BATCH:-} \
        SCALING_BATCH_PER_RANK=${BATCH_PER_RANK:-} SCALING_DIR="$RUNS_ROOT/$STUDY" STUDY=$STUDY EXP=$EXP REPEATS=$REPEATS \
        OVERRIDES=${OVERRIDES:-} "$PYTHON" - <<'PY' || scaling_log "note: could not write study.json"
import json, os, time
from pathlib import Path
env = os.environ
folder = Path(env["SCALING_DIR"])
worlds = [int(w) for w in env["SCALING_WORLDS"].split()]
repeats = int(env["REPEATS"])
kind = env["SCALING_KIND"]

def state(run_id):
    try:
        return json.loads((folder / run_id / "run.json").read_text()).get("status", "pending")
    except (OSError, ValueError):
        return "pending"

path = folder / "study.json"
try:
    started = json.loads(path.read_text()).get("started_at", time.time())
except (OSError, ValueError):
    started = time.time()
per_rank = env["SCALING_BATCH_PER_RANK"]
definition = {
    "name": env["STUDY"], "kind": kind, "exp": env["EXP"], "nprocs": worlds, "repeats": repeats,
    "global_batch_size": int(env["SCALING_GLOBAL_BATCH"]) if kind == "strong" else None,
    "batch_size_per_rank": ({str(w): int(env["SCALING_GLOBAL_BATCH"]) // w for w in worlds} if kind == "strong"
                            else {str(w): int(per_rank) for w in worlds} if per_rank else None),
    "launcher": f"srun (Slurm job {env.get('SLURM_JOB_ID')} on {env.get('SLURM_JOB_NODELIST')})",
    "overrides": env["OVERRIDES"].split(), "batch_args": env["SCALING_BATCH"],
    "status": env["SCALING_STUDY_STATUS"], "started_at": started, "updated_at": time.time(),
    "points": [{"run_id": f"n{w}-r{r}", "world_size": w, "repeat": r, "status": state(f"n{w}-r{r}")}
               for r in range(1, repeats + 1) for w in worlds],
}
tmp = path.with_name(f".study.json.{os.getpid()}.tmp")
tmp.write_text(json.dumps(definition, indent=2) + "\n")
os.replace(tmp, path)
PY
}

POINTS_RUN=0
POINTS_FAILED=0
POINTS_SKIPPED=0

# scaling_run_point NODES RUN_ID OVERRIDE...: one training job over NODES nodes, unless
# its run folder holds a completed run already. Returns the job's exit status.
scaling_run_point() {
    local nodes=$1 run_id=$2
    shift 2
    local world=$((nodes * PROCS_PER_NODE)) dir="$RUNS_ROOT/$STUDY/$run_id" status rc
    status=$(scaling_run_status "$dir")
    if [[ $status == completed ]]; then
        scaling_log "point $run_id: completed earlier, skipped"
        POINTS_SKIPPED=$((POINTS_SKIPPED + 1))
        return 0
    fi
    [[ -e $dir ]] && scaling_set_aside "$dir"
    # A port derived from the job id and the point: jobs sharing a node do not collide,
    # and a point never waits for the previous point's socket to be released.
    export MASTER_PORT=$((10000 + (SLURM_JOB_ID % 1000) * 20 + POINTS_RUN % 20))
    scaling_log "point $run_id: $nodes node(s) x $PROCS_PER_NODE process(es) = world size $world, $OMP_NUM_THREADS thread(s) each"
    srun --nodes="$nodes" --ntasks="$world" --ntasks-per-node="$PROCS_PER_NODE" \
        --cpus-per-task="$CPUS_PER_TASK" --relative=0 --kill-on-bad-exit=1 \
        "$PYTHON" -m scaling.train "+exp=$EXP" "${OVERRIDE_ARGS[@]}" \
        "paths.root=$RUNS_ROOT" "study.name=$STUDY" "paths.run_id=$run_id" "$@" &
    STEP_PID=$!
    while true; do
        wait "$STEP_PID"
        rc=$?
        kill -0 "$STEP_PID" 2>/dev/null || break  # else a trap interrupted the wait
    done
    STEP_PID=""
    POINTS_RUN=$((POINTS_RUN + 1))
    if [[ -n $STOP_SIGNAL ]]; then
        scaling_mark_stopped "$dir" "stopped by SIG$STOP_SIGNAL from Slurm (time limit or preemption ahead)"
    fi
    status=$(scaling_run_status "$dir")
    if ((rc == 0)) && [[ $status == completed ]]; then
        scaling_log "point $run_id: completed ($dir)"
    else
        POINTS_FAILED=$((POINTS_FAILED + 1))
        scaling_log "point $run_id: FAILED with exit status $rc, run.json status: $status ($dir)"
    fi
    return "$rc"
}

# After the early-stop signal: a requeueable job that made progress requeues itself
# and continues where it stopped; otherwise say how to continue.
scaling_stop_early() {
    local script=$1 requeue
    requeue=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Requeue=[01]' | head -n1)
    # No point completed in this run: the stopped point does not fit in the time limit,
    # and running it again would only repeat that.
    if [[ $STOP_SIGNAL == USR1 && $requeue == Requeue=1 ]] && ((POINTS_RUN - POINTS_FAILED > 0)); then
        scaling_log "requeueing job $SLURM_JOB_ID: it continues study $STUDY from the first incomplete point"
        scontrol requeue "$SLURM_JOB_ID" && exit "$SCALING_EXIT_STOPPED"
    fi
    scaling_log "study $STUDY is incomplete (stopped by SIG$STOP_SIGNAL); to continue it, submit again with the same settings:"
    scaling_log "  STUDY=$(scaling_quote "$STUDY") RUNS_ROOT=$(scaling_quote "$RUNS_ROOT") NODES=$(scaling_quote "$NODES") EXP=$(scaling_quote "$EXP") OVERRIDES=$(scaling_quote "${OVERRIDES:-}") sbatch --nodes=$ALLOC_NODES $(scaling_quote "$script")"
    exit "$SCALING_EXIT_STOPPED"
}

# True when `python -m scaling.report` can run in this environment.
scaling_report_available() {
    "$PYTHON" - <<'PY' 2>/dev/null
import importlib.util as u, sys
spec = u.find_spec("scaling.report")
ok = spec is not None and (spec.submodule_search_locations is None or u.find_spec("scaling.report.__main__") is not None)
sys.exit(0 if ok else 1)
PY
}

scaling_report() {
    local study_dir="$RUNS_ROOT/$STUDY" rc
    if ! scaling_report_available; then
        scaling_log "python -m scaling.report is not available here; make the report later with: python -m scaling.report $study_dir"
        return 0
    fi
    scaling_log "report: python -m scaling.report $study_dir"
    "$PYTHON" -m scaling.report "$study_dir"
    rc=$?
    ((rc == 0)) || scaling_log "the report FAILED (exit $rc); the records are in $study_dir"
    return "$rc"
}

# ---------------------------------------------------------------- a whole study
# scaling_study strong|weak SCRIPT_PATH
scaling_study() {
    local kind=$1 script=$2 n rep world rc min_world=0 worlds=() batch_args=()
    scaling_setup
    scaling_node_counts
    scaling_study_name "$kind"
    for n in "${NODE_COUNTS[@]}"; do
        world=$((n * PROCS_PER_NODE))
        worlds+=("$world")
        ((min_world == 0 || world < min_world)) && min_world=$world
    done
    if [[ $kind == strong ]]; then
        if [[ -z ${GLOBAL_BATCH:-} ]]; then
            GLOBAL_BATCH=$(scaling_round_up $((32 * min_world)) "$(scaling_lcm "${worlds[@]}")")
        fi
        scaling_positive_int GLOBAL_BATCH "$GLOBAL_BATCH"
        for world in "${worlds[@]}"; do
            ((GLOBAL_BATCH % world == 0)) ||
                scaling_die "GLOBAL_BATCH=$GLOBAL_BATCH is not divisible by world size $world; use a multiple of $(scaling_lcm "${worlds[@]}")"
        done
        batch_args=("train.global_batch_size=$GLOBAL_BATCH")
    elif [[ -n ${BATCH_PER_RANK:-} ]]; then
        scaling_positive_int BATCH_PER_RANK "$BATCH_PER_RANK"
        batch_args=("train.batch_size=$BATCH_PER_RANK")
    fi
    scaling_check_resume "$kind" "${batch_args[*]}"
    scaling_write_study_json running "$kind" "${worlds[*]}" "${batch_args[*]}"
    scaling_log "study $STUDY ($kind scaling) in $RUNS_ROOT/$STUDY: nodes ${NODE_COUNTS[*]}, $PROCS_PER_NODE process(es) per node, ${REPEATS} repeat(s), exp=$EXP ${batch_args[*]} ${OVERRIDE_ARGS[*]}"
    for n in "${NODE_COUNTS[@]}"; do
        world=$((n * PROCS_PER_NODE))
        for ((rep = 1; rep <= REPEATS; rep++)); do
            scaling_run_point "$n" "n$world-r$rep" "study.kind=$kind" "${batch_args[@]}"
            rc=$?
            if [[ -n $STOP_SIGNAL ]]; then
                scaling_write_study_json stopped "$kind" "${worlds[*]}" "${batch_args[*]}"
                scaling_stop_early "$script"
            fi
            # A configuration mistake fails every point alike: stop at the first.
            if ((rc == SCALING_EXIT_CONFIG)); then
                scaling_write_study_json failed "$kind" "${worlds[*]}" "${batch_args[*]}"
                scaling_die "the training job rejected its configuration (see the line above)"
            fi
        done
    done
    local final=completed
    ((POINTS_FAILED == 0)) || final=failed
    scaling_write_study_json "$final" "$kind" "${worlds[*]}" "${batch_args[*]}"
    scaling_report
    rc=$?
    scaling_log "study $STUDY: $((POINTS_RUN - POINTS_FAILED)) point(s) run, $POINTS_SKIPPED skipped (completed earlier), $POINTS_FAILED failed"
    ((POINTS_FAILED == 0 && rc == 0)) || exit "$SCALING_EXIT_FAILED"
    exit 0
}

scaling_gcd() {
    local a=$1 b=$2 t
    while ((b)); do t=$((a % b)); a=$b; b=$t; done
    echo "$a"
}

scaling_lcm() {
    local l=1 x
    for x in "$@"; do l=$((l / $(scaling_gcd "$l" "$x") * x)); done
    echo "$l"
}

scaling_round_up() { echo $((($1 + $2 - 1) / $2 * $2)); }

# ---------------------------------------------------------------- one run
scaling_train() {
    local rc world
    scaling_setup
    STUDY=${STUDY:-adhoc}
    [[ $STUDY != */* && $STUDY != . && $STUDY != .. ]] || scaling_die "STUDY must be a plain folder name (got '$STUDY')"
    world=$((ALLOC_NODES * PROCS_PER_NODE))
    # Chosen here rather than by rank 0, so this script knows the run folder too.
    scaling_run_point "$ALLOC_NODES" "$EXP-n$world-j$SLURM_JOB_ID-$(date +%Y%m%d-%H%M%S)"
    rc=$?
    [[ -n $STOP_SIGNAL ]] && exit "$SCALING_EXIT_STOPPED"
    exit "$rc"
}
