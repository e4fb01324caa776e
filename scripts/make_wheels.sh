#!/usr/bin/env bash
# The wheels gpu_check.sh installs where the GPU machine has no package index, in .whl/ (git-ignored).
# Run where PyPI is reachable, then copy .whl/ along with the checkout.
#
#   bash scripts/make_wheels.sh [TARGET_PYTHON]        (default 3.12: the GPU machine's Python)
#
# Hydra, OmegaConf, its parser and packaging are pure Python (py3-none-any: they install on any
# Python 3). PyYAML, numpy and psutil have compiled parts: their wheels are fetched for
# TARGET_PYTHON on x86-64 Linux; gpu_check.sh installs only those the machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TARGET=${1:-3.12}
mkdir -p .whl
pip=("$PYTHON" -m pip --disable-pip-version-check -q)
# antlr4-python3-runtime 4.9.3 is published as a source archive only: pip wheel builds it.
"${pip[@]}" wheel --no-deps -w .whl hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 'packaging>=23'
for name in hydra_core-1.3.2 omegaconf-2.3.0 antlr4_python3_runtime-4.9.3 packaging-; do
    if ! compgen -G ".whl/$name*-py3-none-any.whl" >/dev/null; then
        echo "make_wheels: error: no .whl/$name*-py3-none-any.whl (a platform-specific wheel would not travel)" >&2
        exit 1
    fi
done
"${pip[@]}" download --no-deps --only-binary=:all: --python-version "$TARGET" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl 'PyYAML>=6' 'numpy>=1.26' 'psutil>=5.9'
ls -1 .whl/*.whl
