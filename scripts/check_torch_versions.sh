#!/usr/bin/env bash
# The ends of the supported torch range, tried for real (docs/gpu-and-torch-versions.md).
#
#   bash scripts/check_torch_versions.sh [TORCH_VERSION ...]     (default: 2.9.0 2.15.0, the two ends)
#
# For each version: a virtual environment of its own under $VENVS (outside the repository),
# torch==VERSION with the torchvision pip picks for it, then `pip install -e '.[test]'`, which must
# keep that torch (the check a cluster user relies on), then the fast subset of the suite: one job
# per instrument, one study, one fault, one FSDP run, the commbench, and the compatibility tests.
# Then a fresh environment gets `pip install -e .` with no torch at all: which torch it picked.
# Each step is timed; one table at the end. An environment that already has the version is reused
# (its install time is then that of the check alone).
#
# PyPI's Linux torch wheels are CUDA builds: about 3 GB per version with their nvidia-* libraries.
# A pip configuration that caps torch (a constraint file) must be lifted for the newer end:
# PIP_CONFIG_FILE=/dev/null bash scripts/check_torch_versions.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENVS=${VENVS:-$HOME/.cache/scaling-torch-venvs}
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-1}
SUBSET=(
    tests/test_compat.py
    tests/test_cuda_logic.py
    "tests/test_train.py::test_parts_add_up_to_the_step[mlp]"
    "tests/test_train.py::test_comm_and_memory_bytes_match_the_model[mlp]"
    "tests/test_ops.py::test_each_operator_in_its_pass"
    "tests/test_study.py::test_strong_study_runs_every_point_as_a_torchrun_job"
    "tests/test_faults.py::test_a_rank_that_raises"
    "tests/test_strategy.py::test_same_loss_as_ddp_after_the_same_steps"
    "tests/test_commbench.py::test_torchrun_gloo_three_ranks"
)
if [ $# -gt 0 ]; then versions=("$@"); else versions=(2.9.0 2.15.0); fi
mkdir -p "$VENVS"
pip_q() { "$1/bin/python" -m pip install -q --disable-pip-version-check "${@:2}"; }
torch_of() { "$1/bin/python" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)' 2>/dev/null; }

rows=()
for version in "${versions[@]}"; do
    venv="$VENVS/torch-$version"
    log="$VENVS/torch-$version.log"
    : >"$log"
    start=$SECONDS
    if [[ "$(torch_of "$venv")" != "$version"* ]]; then
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv" && pip_q "$venv" "torch==$version" torchvision >>"$log" 2>&1
    fi
    before=$(torch_of "$venv")
    install_s=$((SECONDS - start))
    start=$SECONDS
    pip_q "$venv" -e "$REPO[test]" >>"$log" 2>&1
    after=$(torch_of "$venv")
    kept=$([ -n "$before" ] && [ "$before" = "$after" ] && echo kept || echo "CHANGED ($before -> $after)")
    editable_s=$((SECONDS - start))
    start=$SECONDS
    OMP_NUM_THREADS=$THREADS nice -n 10 "$venv/bin/python" -m pytest -q -p no:cacheprovider "${SUBSET[@]}" \
        >>"$log" 2>&1
    status=$([ $? -eq 0 ] && echo passed || echo FAILED)
    summary=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$log" | tail -1 | tr -d '=')
    rows+=("$(printf '%-8s %-22s %5ss   %-8s %4ss   %-7s %5ss  %s' "$version" "${before:-none}" "$install_s" \
        "$kept" "$editable_s" "$status" "$((SECONDS - start))" "$summary")")
done

fresh="$VENVS/fresh"
rm -rf "$fresh"
start=$SECONDS
"$PYTHON" -m venv "$fresh" && pip_q "$fresh" -e "$REPO" >"$VENVS/fresh.log" 2>&1
fresh_row="fresh \`pip install -e .\`: $(torch_of "$fresh" || echo 'no torch (see '"$VENVS"'/fresh.log)') in $((SECONDS - start))s"

echo
echo "torch    torch/torchvision      install  editable  time  subset   time   pytest"
printf '%s\n' "${rows[@]}"
echo "$fresh_row"
echo "logs: $VENVS/*.log"
