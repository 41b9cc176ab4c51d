#!/usr/bin/env bash
# Install the Debian packages the test suite needs, only those not yet installed.
# Idempotent; run as root on Debian 12. The tests start their own servers (tests/services.py).
set -euo pipefail

packages=(
    postgresql       # initdb, pg_ctl, postgres under /usr/lib/postgresql/<version>/bin
    chromium         # headless browser for the UI test
    fonts-liberation # chromium only recommends fonts; without them screenshots have no legible text
    slurmctld        # a single-node SLURM cluster for hydra/launcher=slurm (tests/services.py starts its own daemons,
    slurmd           #   on free ports, with its own munged and key; the packages' own services are not used)
    slurm-client     # sbatch, squeue, scontrol, scancel, sinfo, sacct
    munge            # SLURM's authentication daemon
)

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for package in "${packages[@]}"; do
    is_installed "$package" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "services.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The tests start their own servers; the packages' daemons (munged, slurmd, ...) stay stopped, as Docker images'
# policy-rc.d already has it.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f "$log" /usr/sbin/policy-rc.d' EXIT
fi
# apt's progress and debconf notes are noise; show them only when something fails.
# No recommends: chromium's would pull in systemd, udev, avahi-daemon and ~100 more packages.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
