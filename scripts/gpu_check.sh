#!/usr/bin/env bash
# Every CUDA/NCCL claim of the training job checked on one GPU, in one table (see scripts/gpu_check.py).
#
#   bash scripts/gpu_check.sh [--out results.json]
#
# Uses the python3 that has torch with CUDA. Hydra and OmegaConf come from the
# environment, or else from wheels in .whl/ (for a machine without a package index).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/scaling-site .whl/*.whl
        export PYTHONPATH="/tmp/scaling-site${PYTHONPATH:+:$PYTHONPATH}"
    else
        python3 -m pip install -q 'hydra-core>=1.3.2,<1.4' 'omegaconf>=2.3'
    fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec python3 scripts/gpu_check.py "$@"
