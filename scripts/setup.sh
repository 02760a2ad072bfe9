#!/usr/bin/env bash
# Brings a fresh Debian 12 machine (as root) to the point where medhive runs and its
# tests pass: system packages, RabbitMQ, the Docker engine, the registry-free test
# image, and the project's virtualenv. Idempotent: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${MEDHIVE_VENV:-$ROOT/.venv}
STATE=${MEDHIVE_STATE_DIR:-/var/lib/medhive}
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# orthanc: the real PACS the data cache's tests stage from (DICOMweb and DIMSE).
# libvirt, QEMU and the disk tools: VM jobs (libvirt-dev, pkg-config and gcc build
# libvirt-python). dnsmasq-base, nftables, conntrack: the network gateway; udhcpc: the
# DHCP client of the stand-in guests in its tests. openssl: the reference pipeline of
# bench.datacache (curl | tee sha256sum | openssl enc). docker-compose (Debian's 1.29,
# a Python program; Debian 12 has no compose v2 plugin): the suite checks
# docker-compose.yml with `docker-compose config`. chromium: the web console's tests
# drive it headless through Playwright (never a browser Playwright downloads itself).
# util-linux-extra (fincore), mount (losetup) and e2fsprogs: the tests of the datacache's
# direct writes look at the page cache and make a disk of 4 KiB sectors.
APT_PACKAGES=(rabbitmq-server docker.io busybox-static python3-venv ca-certificates iproute2 curl
  openssl docker-compose chromium util-linux-extra mount
  orthanc orthanc-dicomweb
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
  libvirt-dev pkg-config gcc cpio genisoimage e2fsprogs dosfstools mtools
  dnsmasq-base nftables libnftables1 conntrack udhcpc)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=900 update -q
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -q \
    --no-install-recommends "${missing[@]}"
fi

# RabbitMQ: loopback only, management API for per-test vhosts. Its schedulers do not
# spin while idle: on a small host they would take CPU from the services.
if ! grep -qs '^NODE_IP_ADDRESS=' /etc/rabbitmq/rabbitmq-env.conf; then
  echo "NODE_IP_ADDRESS=127.0.0.1" >> /etc/rabbitmq/rabbitmq-env.conf
fi
if ! grep -qs '^SERVER_ADDITIONAL_ERL_ARGS=' /etc/rabbitmq/rabbitmq-env.conf; then
  echo 'SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none"' >> /etc/rabbitmq/rabbitmq-env.conf
fi
if ! grep -qs "management.tcp.ip" /etc/rabbitmq/rabbitmq.conf; then
  printf 'management.tcp.ip = 127.0.0.1\n' >> /etc/rabbitmq/rabbitmq.conf
fi
# The broker's own ceiling on a message (8 MiB). The services refuse, with a reason and
# an audit record, anything over MEDHIVE_AMQP_MAX_MESSAGE_BYTES (1 MiB) below it.
MAX_MESSAGE_SIZE=8388608
if ! grep -qs "^max_message_size" /etc/rabbitmq/rabbitmq.conf; then
  printf 'max_message_size = %s\n' "$MAX_MESSAGE_SIZE" >> /etc/rabbitmq/rabbitmq.conf
fi
rabbitmq-plugins enable --offline rabbitmq_management >/dev/null
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  say "starting rabbitmq"
  rabbitmq-server -detached
  rabbitmqctl -q wait --timeout 120 "/var/lib/rabbitmq/mnesia/rabbit@$(hostname -s).pid"
fi
# A broker started before the ceiling was configured takes it at once.
rabbitmqctl -q eval "application:set_env(rabbit, max_message_size, $MAX_MESSAGE_SIZE)." >/dev/null
# The services' own user: an administrator (it provisions integrators' users, and tests
# make vhosts through the API) and an impersonator (a dead-letter copy keeps the
# original sender's user_id).
if ! rabbitmqctl -q list_users | grep -q '^medhive\b'; then
  # (a busy broker may have answered the look-up late: an existing user is fine)
  rabbitmqctl -q add_user medhive medhive || rabbitmqctl -q list_users | grep -q '^medhive\b'
  rabbitmqctl -q set_permissions -p / medhive '.*' '.*' '.*'
fi
if ! rabbitmqctl -q list_users | grep '^medhive\b' | grep -q impersonator; then
  rabbitmqctl -q set_user_tags medhive administrator impersonator
fi
# An unbounded dead-letter queue of an earlier version cannot be re-declared with its
# bounds: it goes (its letters are in the audit trail), and the services make it anew.
if rabbitmqctl -q list_queues name arguments 2>/dev/null | grep '^medhive\.dead\b' | grep -qv x-max-length; then
  say "replacing the unbounded medhive.dead queue"
  rabbitmqctl -q delete_queue medhive.dead >/dev/null
fi

# The Swarm manager's own address: a bridge with no uplink, which a second engine in a
# network namespace (scripts/swarm-worker.sh) can reach, unlike loopback. It exists
# before dockerd starts: a Swarm manager restores its listener on this address.
SWARM_BRIDGE=mhswarm0
SWARM_ADDR=10.213.0.1
if ! ip link show "$SWARM_BRIDGE" >/dev/null 2>&1; then
  say "creating the bridge $SWARM_BRIDGE ($SWARM_ADDR/24)"
  ip link add "$SWARM_BRIDGE" type bridge
fi
ip -4 -o addr show dev "$SWARM_BRIDGE" | grep -q " $SWARM_ADDR/24 " ||
  ip addr add "$SWARM_ADDR/24" dev "$SWARM_BRIDGE"
ip link set "$SWARM_BRIDGE" up

# Docker engine (no systemd here: start it by hand when it is not answering).
if ! docker version >/dev/null 2>&1; then
  say "starting dockerd"
  nohup /usr/sbin/dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker version >/dev/null 2>&1 && break; sleep 0.5; done
  docker version >/dev/null
fi

# A Docker Swarm managed by this engine, for the node agent's `swarm` runtime
# (MEDHIVE_VMNODE_RUNTIME=swarm) and its tests; it pins each job to this node. It is
# advertised on the bridge so that the test worker can join it; a Swarm of before
# (advertised on 127.0.0.1, or not a manager, or broken) is left and made anew.
swarm=$(docker info --format '{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}} {{.Swarm.NodeAddr}}')
if [ "$swarm" != "active true $SWARM_ADDR" ]; then
  if [ "${swarm%% *}" != inactive ]; then
    say "leaving the Docker Swarm ($swarm)"
    docker swarm leave --force >/dev/null
  fi
  say "initialising a Docker Swarm on $SWARM_ADDR"
  docker swarm init --advertise-addr "$SWARM_ADDR" --listen-addr "$SWARM_ADDR:2377" >/dev/null
fi

# libvirt without systemd or the libvirt-daemon-system package: its user, virtlogd and
# a qemu.conf without a security driver (with one, every define takes ~50 s here).
id libvirt-qemu >/dev/null 2>&1 ||
  useradd -r -U -M -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/images
if ! grep -qs '^security_driver = "none"' /etc/libvirt/qemu.conf; then
  printf 'user = "root"\ngroup = "root"\nsecurity_driver = "none"\n' > /etc/libvirt/qemu.conf
fi
pgrep -x virtlogd >/dev/null || virtlogd -d
if ! virsh -q -c qemu:///system version >/dev/null 2>&1; then
  say "starting libvirtd"
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 1 60); do virsh -q -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.5; done
  virsh -q -c qemu:///system version >/dev/null
fi
# The tiny guest the VM tests and the VM benchmark boot (kernel from the Debian mirror).
bash scripts/build-guest.sh "$STATE/guest"

# The project's virtualenv.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.medhive-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing medhive into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e ".[test,bench]"
  touch "$stamp"
fi
# The local workload images (the demo's reader takes pydicom from the virtualenv).
bash scripts/build-images.sh
mkdir -p "$STATE"
say "ready"
