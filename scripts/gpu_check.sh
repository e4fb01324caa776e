#!/usr/bin/env bash
# Every CUDA/NCCL claim of the training job checked on one GPU node, in one table (scripts/gpu_check.py).
#
#   bash scripts/gpu_check.sh [--out results.json] [--only GROUP[,GROUP]] [--deadline-s 360]
#
# Uses the python3 that has torch with CUDA ($PYTHON to choose another). What the jobs import
# beyond torch (Hydra, OmegaConf, its parser, PyYAML, ...) comes from that Python, or else from the
# wheels in .whl/ (scripts/make_wheels.sh makes them where a package index is reachable): only the
# missing ones, into a folder of their own, never from an index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
shopt -s nocaseglob nullglob
wheels=()
for pair in hydra_core:hydra omegaconf:omegaconf antlr4_python3_runtime:antlr4 packaging:packaging pyyaml:yaml \
            numpy:numpy psutil:psutil; do
    "$PYTHON" -c "import ${pair#*:}" 2>/dev/null && continue
    wheels+=(.whl/"${pair%%:*}"-*.whl)
done
if [ ${#wheels[@]} -gt 0 ]; then
    site="${TMPDIR:-/tmp}/scaling-gpu-check-site"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
            --target "$site" "${wheels[@]}" >"$site.log" 2>&1; then
        echo "gpu_check: error: the wheels in .whl/ did not install on $("$PYTHON" -V 2>&1) (see $site.log)" >&2
        exit 2
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
