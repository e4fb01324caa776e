#!/usr/bin/env bash
# System packages the project needs beyond Python: Slurm (controller, node daemon,
# client commands) and munge for the Slurm tests, iproute2 for the emulated-network
# tool (tc/netem), python3-venv for the project's virtual environment (Debian's and
# Ubuntu's python3 refuse `pip install` outside one, PEP 668). Debian/Ubuntu, run as root. Safe to run again: packages already
# installed are left alone, and nothing is fetched when all are present.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge iproute2 python3-venv)

if [[ $(id -u) -ne 0 ]]; then
    echo "install_system_deps.sh: must run as root (apt-get install)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_deps.sh: apt-get not found; install by hand: ${PACKAGES[*]}" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    # "install ok installed" is dpkg's state for a fully installed package.
    if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "install_system_deps.sh: all present: ${PACKAGES[*]}"
    exit 0
fi

echo "install_system_deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Packages only: the Slurm tests start their own daemons with their own config,
# so the packaged services are not started here (policy-rc.d refuses them).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
trap 'if [[ $created_policy == 1 ]]; then rm -f "$policy"; fi' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install_system_deps.sh: done"
