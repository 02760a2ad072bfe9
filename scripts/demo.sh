#!/usr/bin/env bash
# The main job: sets everything up, starts every service of this machine, submits the
# example container job and follows it to its output, then checks the audit chain.
# The services keep running afterwards unless MEDHIVE_DEMO_STOP=1; `medhive up` logs
# go to /var/log/medhive/up.log.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MEDHIVE_VENV:-$PWD/.venv}
export PATH="$VENV/bin:$PATH"
export MEDHIVE_TOKEN_FILE=${MEDHIVE_TOKEN_FILE:-$HOME/.config/medhive/token}
API=${MEDHIVE_API_URL:-http://127.0.0.1:8080}
AUDIT=${MEDHIVE_AUDIT_URL:-http://127.0.0.1:8081}
mkdir -p /var/log/medhive

healthy() { python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1/healthz" 2>/dev/null; }
if ! healthy "$API" || ! healthy "$AUDIT"; then
  echo "[demo] starting the services (medhive up; logs in /var/log/medhive/up.log)"
  nohup medhive up >>/var/log/medhive/up.log 2>&1 &
  echo $! > /var/run/medhive-up.pid
  for _ in $(seq 1 120); do healthy "$API" && healthy "$AUDIT" && break; sleep 0.5; done
  healthy "$API" && healthy "$AUDIT" || { tail -50 /var/log/medhive/up.log; exit 1; }
fi

echo "[demo] a token for tenant 'demo' (saved to $MEDHIVE_TOKEN_FILE)"
medhive token create --tenant demo --name demo-user --save >/dev/null
OPERATOR=$(medhive token create --tenant ops --role operator --name demo-operator)

echo "[demo] submitting examples/hello.yaml"
medhive submit examples/hello.yaml --follow
echo "[demo] nodes:"
medhive nodes
echo "[demo] audit chain:"
medhive --token "$OPERATOR" audit verify

if [ "${MEDHIVE_DEMO_STOP:-0}" = 1 ] && [ -f /var/run/medhive-up.pid ]; then
  kill "$(cat /var/run/medhive-up.pid)" && rm -f /var/run/medhive-up.pid
fi
