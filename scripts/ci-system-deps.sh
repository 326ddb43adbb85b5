#!/usr/bin/env bash
# System packages the test suite needs beyond Python: promtool (Debian's `prometheus`
# package), used by tests/test_deploy.py to check docker/prometheus.yml and its rules.
# Idempotent: does nothing when promtool is already on PATH.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    echo "ci-system-deps: promtool already installed ($(command -v promtool))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-system-deps: promtool is missing and apt-get is not available; install Prometheus' promtool by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# The package also carries the Prometheus server; where no init policy exists (plain
# containers), forbid starting services for the install, so no daemon is left running.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    trap '$SUDO rm -f "$POLICY"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends: promtool only, not the web UI assets and exporters.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null 2>&1 || { echo "ci-system-deps: promtool still not on PATH" >&2; exit 1; }
echo "ci-system-deps: installed $(promtool --version 2>&1 | head -n 1)"
