#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, beside the single broker the other
# tests use: what the high-availability tests fail over between.
#
#   scripts/rabbit-cluster.sh start      start (and cluster) the nodes; idempotent
#   scripts/rabbit-cluster.sh stop       stop them and forget their data
#   scripts/rabbit-cluster.sh status     the cluster as its first node sees it
#
# Node i is `medhive-haI@<host>`: AMQP on 5680+i, management on 15680+i, Erlang
# distribution on 25680+i, its data under /var/lib/rabbitmq/medhive-ha/haI. They
# share the Erlang cookie of the system broker (same user), which a cluster needs, and
# find each other as they boot (peer discovery from the node list in each config;
# RabbitMQ takes a lock so that one of them forms the cluster and the others join).
# Nothing of this is for production: there, three hosts run one node each.
set -euo pipefail

NODES=(1 2 3)
BASE=/var/lib/rabbitmq/medhive-ha
HOST=$(hostname -s)

node_name() { echo "medhive-ha$1@$HOST"; }

node_env() {
  local i=$1 dir="$BASE/ha$1"
  export RABBITMQ_NODENAME
  RABBITMQ_NODENAME=$(node_name "$i")
  export RABBITMQ_NODE_PORT=$((5680 + i))
  export RABBITMQ_DIST_PORT=$((25680 + i))
  export RABBITMQ_MNESIA_BASE="$dir/mnesia"
  export RABBITMQ_LOG_BASE="$dir/log"
  export RABBITMQ_PID_FILE="$dir/pid"
  export RABBITMQ_CONFIG_FILE="$dir/rabbitmq"  # .conf is added by RabbitMQ
  export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
  # As the system broker (setup.sh), plus the cluster's own traffic on loopback only.
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none \
-kernel inet_dist_use_interface {127,0,0,1}"
}

ctl() { local i=$1; shift; rabbitmqctl -q -n "$(node_name "$i")" "$@"; }

running() { ctl "$1" ping >/dev/null 2>&1; }

# The processes of node i (its Erlang VM and helpers), found by their environment:
# the VM's command line does not name the node.
node_pids() {
  grep -lsz "^RABBITMQ_NODENAME=$(node_name "$1")\$" /proc/[0-9]*/environ | cut -d/ -f3 || true
}

start_node() {
  local i=$1 dir="$BASE/ha$1"
  install -d -o rabbitmq -g rabbitmq "$dir" "$dir/mnesia" "$dir/log"
  cat > "$dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$((5680 + i))
management.tcp.ip = 127.0.0.1
management.tcp.port = $((15680 + i))
max_message_size = 16777216
cluster_partition_handling = pause_minority
cluster_formation.peer_discovery_backend = classic_config
cluster_formation.classic_config.nodes.1 = $(node_name 1)
cluster_formation.classic_config.nodes.2 = $(node_name 2)
cluster_formation.classic_config.nodes.3 = $(node_name 3)
CONF
  echo "[rabbitmq_management]." > "$dir/enabled_plugins"
  chown rabbitmq:rabbitmq "$dir/rabbitmq.conf" "$dir/enabled_plugins"
  ( node_env "$i"; rabbitmq-server -detached )
}

start() {
  local i
  for i in "${NODES[@]}"; do running "$i" || start_node "$i"; done
  for i in "${NODES[@]}"; do
    rabbitmqctl -q -n "$(node_name "$i")" wait --timeout 120 "$BASE/ha$i/pid"
  done
  local first
  first=$(node_name 1)
  for i in "${NODES[@]:1}"; do  # a node that booted alone joins by hand
    if ! ctl "$i" cluster_status --formatter json | grep -q "\"$first\""; then
      ctl "$i" stop_app
      ctl "$i" join_cluster "$first"
      ctl "$i" start_app
    fi
  done
  if ! ctl 1 list_users | grep -q '^medhive\b'; then
    ctl 1 add_user medhive medhive >/dev/null
    ctl 1 set_user_tags medhive administrator impersonator >/dev/null
    ctl 1 set_permissions -p / medhive '.*' '.*' '.*' >/dev/null
  fi
}

stop() {
  local i pid
  # All at once: stopped one by one, the last node would be a minority and pause
  # itself (pause_minority) instead of stopping.
  for i in "${NODES[@]}"; do
    if running "$i"; then timeout 60 rabbitmqctl -q -n "$(node_name "$i")" stop >/dev/null 2>&1 & fi
  done
  wait || true
  for i in "${NODES[@]}"; do
    for pid in $(node_pids "$i"); do kill -9 "$pid" 2>/dev/null || true; done
  done
  rm -rf "$BASE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) ctl 1 cluster_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
