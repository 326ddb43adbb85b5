#!/usr/bin/env bash
# System packages the test suite needs beyond Python:
# - promtool and the Prometheus server (Debian's `prometheus` package), used by
#   tests/test_deploy.py to check docker/prometheus.yml and its rules and to scrape a live
#   server with them;
# - node and npm, for the Node.js client of tests/server/test_tls.py;
# - dnsmasq (Debian's `dnsmasq-base`: the binary, no service), a real DNS server on loopback
#   that gRPC's resolver is pointed at in tests/test_replicas.py, as a headless Service's DNS.
# Idempotent: installs only what is not already on PATH.
set -euo pipefail

packages=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || packages+=(prometheus)
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || packages+=(nodejs npm)
PATH="$PATH:/usr/sbin" command -v dnsmasq >/dev/null 2>&1 || packages+=(dnsmasq-base)
if [ ${#packages[@]} -eq 0 ]; then
    echo "ci-system-deps: promtool, prometheus, node, npm and dnsmasq already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-system-deps: missing ${packages[*]} and apt-get is not available; install them by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# The prometheus package carries a service; where no init policy exists (plain
# containers), forbid starting services for the install, so no daemon is left running.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    trap '$SUDO rm -f "$POLICY"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends: the binaries, not Prometheus' web UI assets and exporters.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
for tool in promtool prometheus node npm dnsmasq; do
    PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null 2>&1 || { echo "ci-system-deps: $tool still not on PATH" >&2; exit 1; }
done
echo "ci-system-deps: installed ${packages[*]} ($(promtool --version 2>&1 | head -n 1); node $(node --version))"
