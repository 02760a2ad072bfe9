#!/usr/bin/env bash
# A second Docker engine on this machine, joined as a worker to the Swarm that the main
# engine manages (scripts/setup.sh): for the tests of Swarm tasks that run on a node
# other than the manager (placement, logs, volumes, secrets, reaching the host).
#
#   scripts/swarm-worker.sh start    start it, join it, copy the images; idempotent.
#                                    The last line of stdout is its Swarm node id.
#   scripts/swarm-worker.sh stop     leave the Swarm, stop it, remove its network
#   scripts/swarm-worker.sh status   whether it runs, and its node id (exit 3: stopped)
#
# The worker is a dockerd in the network namespace medhive-w1 (10.213.0.2/24, a veth
# into the manager's bridge mhswarm0, 10.213.0.1), entered with nsenter (`ip netns
# exec` remounts /sys and dockerd then finds no devices cgroup). Apart from the main
# engine: its own data (/var/lib/medhive/swarm-w1), exec root, socket
# (unix:///run/medhive-w1/docker.sock: `docker -H` it), containerd (which it starts
# under its exec root, in a containerd namespace of its own), cgroup parent and
# hostname; its iptables, docker0 and docker_gwbridge are the namespace's own. Its node
# has the label medhive.test-worker=1, and every local medhive/* image (same ids).
#
# Timings here (2 cores): start 1.1-1.4 s (dockerd answers after ~0.75 s, the join takes
# ~0.15 s, the manager lists the node Ready at once), 2.3 s the first time (copying the
# images, ~1 s), 0.25 s when it runs already. stop 4-5 s: the leave ~1.5-2 s, dockerd
# and its containerd ~2 s; ~10 s within seconds of a start (the leave then waits 5 s for
# the ingress network to go: "timeout while waiting for ingress network removal" in its
# log); ~1 s when dockerd was dead already.
# A task pinned to the worker completes ~1.5 s after `docker service create`.
set -euo pipefail

NAME=medhive-w1
NETNS=/run/netns/$NAME
BRIDGE=mhswarm0
MANAGER_ADDR=10.213.0.1
WORKER_ADDR=10.213.0.2
VETH=mhw1              # its end on the bridge; the namespace's end is eth0
STATE=/var/lib/medhive/swarm-w1
DATA_ROOT=$STATE/docker
RUN=/run/$NAME
EXEC_ROOT=$RUN/exec
PIDFILE=$RUN/docker.pid
SOCK=$RUN/docker.sock
LOG=/var/log/$NAME-dockerd.log
LABEL=medhive.test-worker=1

say() { printf '\033[1m[swarm-worker]\033[0m %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
w() { docker -H "unix://$SOCK" "$@"; }
answering() { w version >/dev/null 2>&1; }

# The dockerd of the pidfile, if it is alive and ours (a pid may be reused).
daemon_pid() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--pidfile $PIDFILE " &&
    echo "$pid"
}

# Everything the worker started that may outlive its dockerd: its containerd and the
# shims (named by our exec root), and the task processes (in our cgroup parent).
leftover_pids() {
  local p exe
  for p in /proc/[0-9]*; do
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    case "${exe##*/}" in
      dockerd|containerd|containerd-shim*|docker-proxy)
        tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q -- "$RUN/" && echo "${p#/proc/}" ;;
    esac
  done
  cgroups | while read -r d; do find "$d" -name cgroup.procs -exec cat {} +; done 2>/dev/null || true
}

# The worker's cgroup parent in each hierarchy (/sys/fs/cgroup/*/medhive-w1: cgroupfs).
cgroups() { find /sys/fs/cgroup -mindepth 1 -maxdepth 2 -type d -name "$NAME"; }

node_id() { w info --format '{{.Swarm.NodeID}}' 2>/dev/null; }

# The worker as the manager knows it: "ready", "down", ... or nothing.
manager_sees() { docker node inspect --format '{{.Status.State}}' "$1" 2>/dev/null; }

network_up() {
  [ -e "$NETNS" ] || ip netns add "$NAME"
  if ! ip -n "$NAME" link show eth0 >/dev/null 2>&1; then
    ip link del "$VETH" 2>/dev/null || true  # its peer died with an earlier namespace
    ip link add "$VETH" type veth peer name eth0 netns "$NAME"
  fi
  ip link set "$VETH" master "$BRIDGE" up
  ip -n "$NAME" -4 -o addr show dev eth0 | grep -q " $WORKER_ADDR/24 " ||
    ip -n "$NAME" addr add "$WORKER_ADDR/24" dev eth0
  ip -n "$NAME" link set lo up
  ip -n "$NAME" link set eth0 up
  ip -n "$NAME" route replace default via "$MANAGER_ADDR"
}

daemon_up() {
  answering && return 0
  [ -z "$(daemon_pid)" ] || die "dockerd $(daemon_pid) does not answer on $SOCK (see $LOG)"
  mkdir -p "$RUN" "$DATA_ROOT"
  # Not /etc/docker/daemon.json, nor /etc/docker/key.json (the engine's id): the main
  # engine's.
  printf '{"deprecated-key-path": "%s"}\n' "$STATE/key.json" > "$STATE/daemon.json"
  say "starting dockerd in $NAME (log: $LOG)"
  # A UTS namespace too, so that the node has a hostname of its own in `docker node ls`
  # and in `docker service logs`.
  nohup nsenter --net="$NETNS" unshare --uts sh -c 'hostname "$0" && exec dockerd "$@"' "$NAME" \
    --config-file "$STATE/daemon.json" --data-root "$DATA_ROOT" --exec-root "$EXEC_ROOT" \
    --pidfile "$PIDFILE" -H "unix://$SOCK" --cgroup-parent "/$NAME" \
    --containerd-namespace "$NAME" --containerd-plugins-namespace "$NAME-plugins" \
    </dev/null >>"$LOG" 2>&1 9>&- &
  local i
  for i in $(seq 1 300); do
    answering && return 0
    kill -0 $! 2>/dev/null || break
    sleep 0.1
  done
  tail -n 20 "$LOG" >&2
  die "dockerd in $NAME did not answer within 30 s"
}

join() {
  local state id
  state=$(w info --format '{{.Swarm.LocalNodeState}}')
  id=$(node_id)
  if [ "$state" = active ] && [ -n "$(manager_sees "$id")" ]; then return 0; fi
  # Part of no Swarm, or of one the manager forgot (it was re-initialised, or the node
  # removed): start afresh.
  [ "$state" = inactive ] || w swarm leave --force >/dev/null 2>&1 || true
  say "joining the Swarm at $MANAGER_ADDR:2377"
  w swarm join --token "$(docker swarm join-token -q worker)" \
    --advertise-addr "$WORKER_ADDR" --listen-addr "$WORKER_ADDR:2377" "$MANAGER_ADDR:2377" >/dev/null
}

wait_ready() {
  local id=$1 i
  for i in $(seq 1 300); do
    [ "$(manager_sees "$id")" = ready ] && return 0
    sleep 0.1
  done
  die "the manager does not see node $id as ready within 30 s"
}

label() {
  local id=$1
  docker node inspect --format '{{range $k, $v := .Spec.Labels}}{{$k}}={{$v}} {{end}}' "$id" |
    grep -q "$LABEL " || docker node update --label-add "$LABEL" "$id" >/dev/null
}

# Every local medhive/* image, by the same id (save | load keeps it): medhive never pulls.
copy_images() {
  local ref id have missing=()
  have=$(w images --no-trunc --format '{{.Repository}}:{{.Tag}} {{.ID}}')
  while read -r ref id; do
    grep -qxF "$ref $id" <<<"$have" && continue
    if grep -q " $id\$" <<<"$have"; then
      w tag "$id" "$ref"  # the layers are there already
    else
      missing+=("$ref")
    fi
  done < <(docker images --no-trunc --format '{{.Repository}}:{{.Tag}} {{.ID}}' |
           grep '^medhive/' | grep -v ':<none> ')
  if [ ${#missing[@]} -gt 0 ]; then
    say "copying ${missing[*]}"
    docker save "${missing[@]}" | w load -q >/dev/null
  fi
}

start() {
  [ "$(docker info --format '{{.Swarm.ControlAvailable}} {{.Swarm.NodeAddr}}')" = "true $MANAGER_ADDR" ] ||
    die "the main engine is not a Swarm manager on $MANAGER_ADDR: run scripts/setup.sh"
  ip link show "$BRIDGE" >/dev/null 2>&1 || die "no bridge $BRIDGE: run scripts/setup.sh"
  network_up
  daemon_up
  join
  local id
  id=$(node_id)
  wait_ready "$id"
  label "$id"
  copy_images
  echo "$id"
}

stop() {
  local id="" pid i
  if answering; then
    id=$(node_id)
    w swarm leave --force >/dev/null 2>&1 || true
    # The next start finds no containers or volumes of before, only the images.
    w ps -aq | xargs -r docker -H "unix://$SOCK" rm -f >/dev/null 2>&1 || true
    w volume ls -q | xargs -r docker -H "unix://$SOCK" volume rm -f >/dev/null 2>&1 || true
  fi
  # The node as the manager has it (also when the worker died without leaving).
  if [ "$(docker info --format '{{.Swarm.ControlAvailable}}' 2>/dev/null)" = true ]; then
    for i in $id $(docker node ls -q | xargs -r docker node inspect \
                     --format '{{.ID}} {{.Status.Addr}}' | awk -v a="$WORKER_ADDR" '$2 == a {print $1}'); do
      docker node rm --force "$i" >/dev/null 2>&1 || true
    done
  fi
  pid=$(daemon_pid) || true
  if [ -n "$pid" ]; then
    say "stopping dockerd $pid"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  # What is left (dockerd killed -9 earlier, or hung): kill and wait.
  for i in $(seq 1 50); do
    pid=$(leftover_pids | sort -u | tr '\n' ' ')
    [ -n "${pid// /}" ] || break
    [ "$i" -gt 1 ] || say "killing what is left: $pid"
    # shellcheck disable=SC2086
    kill -9 $pid 2>/dev/null || true
    sleep 0.1
  done
  [ -z "${pid// /}" ] || die "processes left: $pid"
  # Mounts a dead dockerd left (network namespaces, overlay layers, shm), deepest first.
  awk -v r="$RUN" -v d="$DATA_ROOT" '$5 == d || index($5, d "/") == 1 || index($5, r "/") == 1 {print $5}' \
    /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l
  cgroups | while read -r d; do find "$d" -depth -type d -delete; done 2>/dev/null || true
  ip link del "$VETH" 2>/dev/null || true
  [ ! -e "$NETNS" ] || ip netns del "$NAME"
  # Its Swarm state goes: a node that was removed cannot come back with it.
  rm -rf "$RUN" "$DATA_ROOT/swarm"
}

status() {
  if answering; then
    echo "running: dockerd $(daemon_pid || echo '?') in $NETNS, $SOCK"
    echo "swarm: $(w info --format '{{.Swarm.LocalNodeState}}'), node $(node_id)"
    [ -z "$(node_id)" ] || echo "manager sees it: $(manager_sees "$(node_id)" || echo nothing)"
  else
    echo "stopped"
    return 3
  fi
}

# One start or stop at a time (tests may call it side by side).
exec 9>"${TMPDIR:-/tmp}/medhive-swarm-w1.lock"
case "${1:-}" in
  start) flock 9; start ;;
  stop) flock 9; stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
