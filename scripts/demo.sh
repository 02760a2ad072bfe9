#!/usr/bin/env bash
# The main job: sets everything up, starts every service of this machine, submits the
# example container job and follows it to its output, then checks the audit chain.
# Then the tour (medhive/tour.py; MEDHIVE_DEMO_TOUR=0 leaves it out): a data job from a
# local PACS, a VM job reached through the gateway, and the audit of both. Each step
# prints the command that repeats it and checks its outcome (exit 1 if it is not seen).
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
NETGW=http://127.0.0.1:${MEDHIVE_NETGW_PORT:-8084}
TOUR=${MEDHIVE_DEMO_TOUR:-1}
PID_FILE=/var/run/medhive-up.pid
mkdir -p /var/log/medhive

healthy() { python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1/healthz" 2>/dev/null; }
ours_running() { [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; }

if [ "$TOUR" = 1 ]; then
  echo "[demo] preparing the tour: a PACS with a study, the datacache's sources, a VM network"
  prepared=0
  python -m medhive.tour prepare || prepared=$?
  [ "$prepared" = 0 ] || [ "$prepared" = 3 ] || exit 1
  # Services started before the tour's settings existed read them only at start.
  if healthy "$API" && { [ "$prepared" = 3 ] || ! healthy "$NETGW"; }; then
    if ! ours_running; then
      echo "[demo] services run here that the demo did not start, without the tour's settings:"
      echo "[demo] stop them and run this again (or MEDHIVE_DEMO_TOUR=0)"
      exit 1
    fi
    echo "[demo] restarting the services so that they read the tour's settings"
    kill "$(cat "$PID_FILE")"
    for _ in $(seq 1 600); do ours_running || break; sleep 0.1; done
    rm -f "$PID_FILE"
  fi
fi

if ! healthy "$API" || ! healthy "$AUDIT"; then
  echo "[demo] starting the services (medhive up; logs in /var/log/medhive/up.log)"
  logged=$(wc -l < /var/log/medhive/up.log 2>/dev/null || echo 0)
  nohup medhive up >>/var/log/medhive/up.log 2>&1 &
  echo $! > "$PID_FILE"
  ready() { healthy "$API" && healthy "$AUDIT" && { [ "$TOUR" != 1 ] || healthy "$NETGW"; }; }
  for _ in $(seq 1 120); do ready && break; sleep 0.5; done
  ready || { tail -50 /var/log/medhive/up.log; exit 1; }
  tail -n +"$((logged + 1))" /var/log/medhive/up.log | grep "medhive up: " || true
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

if [ "$TOUR" = 1 ]; then
  python -m medhive.tour run --operator-token "$OPERATOR"
fi

echo "[demo] the web console: $API/ui/"
echo "[demo]   sign in as the demo user with: $(cat "$MEDHIVE_TOKEN_FILE")"
echo "[demo]   or as an operator (every tenant, tenants page) with: $OPERATOR"

if [ "${MEDHIVE_DEMO_STOP:-0}" = 1 ] && [ -f "$PID_FILE" ]; then
  kill "$(cat "$PID_FILE")" && rm -f "$PID_FILE"
fi
