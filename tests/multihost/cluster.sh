#!/usr/bin/env bash
# A labq cluster of four "hosts" on one machine, each a Linux network namespace, joined by
# a bridge in a fifth ("switch") namespace on a private /24 that exists nowhere else:
#
#   h1 10.77.0.11  PostgreSQL (its own cluster, initdb'ed here), the backend, RabbitMQ node 1
#   h2 10.77.0.12  RabbitMQ node 2, two workers
#   h3 10.77.0.13  RabbitMQ node 3, two workers
#   h4 10.77.0.14  the client (the driver: tests/multihost/driver.py)
#
# The three RabbitMQ nodes form one cluster; labq's durable queues are quorum queues. The
# shared volume is one folder bind-mounted into each host; every host keeps its own work dir
# (environments, workspaces). The namespaces have no default route: an address of them is
# reached only from inside them (`ip netns exec`), never from the machine itself.
#
#   cluster.sh run [DRIVER ARGS]   set up, run the driver on h4, tear everything down (trap)
# and, for the driver while `run` is on (they need LQ_RUN, which `run` exports):
#   cluster.sh kill-host H         SIGKILL every process of host H (RabbitMQ node included)
#   cluster.sh start-host H        start host H's RabbitMQ node (if it has one) and workers
#   cluster.sh kill-node H         SIGKILL the RabbitMQ node of host H
#   cluster.sh start-node H        start it again and wait until it is back in the cluster
#   cluster.sh kill-backend | start-backend   SIGKILL the backend / start it again
#   cluster.sh node-of-queue Q     the host whose node leads quorum queue Q
#   cluster.sh node-of-connection N  the host whose node serves the connection named N
#   cluster.sh connections H       every client connection (name, node's host), asking H
#
# Needs root, iproute2 (ip netns), util-linux (unshare), rabbitmq-server, PostgreSQL's
# server binaries (initdb, pg_ctl) and labq's venv (LABQ_BIN, default ../../.venv/bin/labq).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SUBNET=10.77.0
HOSTS="h1 h2 h3 h4"
NODE_HOSTS="h1 h2 h3"
WORKER_HOSTS="h2 h3"
WORKERS_PER_HOST=${LQ_WORKERS_PER_HOST:-2}
ip_of() { echo "$SUBNET.$((10 + ${1#h}))"; }

log() { printf '%s cluster: %s\n' "$(date +%T.%3N)" "$*" >&2; }
die() { log "$*"; exit 1; }

# --- state of one run -------------------------------------------------------------------
load_state() {
  [ -n "${LQ_RUN:-}" ] && [ -f "$LQ_RUN/state" ] || die "no cluster is running (LQ_RUN unset)"
  # shellcheck source=/dev/null
  . "$LQ_RUN/state"
}
ns() { echo "${LQ_ID}$1"; }
in_host() { local h=$1; shift; ip netns exec "$(ns "$h")" "$@"; }

# --- preflight: say exactly what is missing ---------------------------------------------
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
preflight() {
  [ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, bind mounts)"; return 1; }
  command -v ip >/dev/null || { echo "needs iproute2 (ip)"; return 1; }
  command -v unshare >/dev/null || { echo "needs util-linux (unshare)"; return 1; }
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || { echo "needs rabbitmq-server"; return 1; }
  [ -n "$(pg_bin)" ] && [ -x "$(pg_bin)/initdb" ] \
    || { echo "needs PostgreSQL's server (apt-get install postgresql)"; return 1; }
  id rabbitmq >/dev/null 2>&1 || { echo "needs the rabbitmq user"; return 1; }
  id postgres >/dev/null 2>&1 || { echo "needs the postgres user"; return 1; }
  [ -x "$LABQ_BIN" ] || { echo "needs labq's venv ($LABQ_BIN)"; return 1; }
  local probe="lqprobe$$"
  ip netns add "$probe" 2>/dev/null || { echo "cannot create network namespaces here"; return 1; }
  ip netns del "$probe"
}

# --- network ----------------------------------------------------------------------------
setup_network() {
  local sw; sw=$(ns sw)
  ip netns add "$sw"
  ip -n "$sw" link add br0 type bridge
  ip -n "$sw" link set br0 up
  ip -n "$sw" link set lo up
  for h in $HOSTS; do
    local n; n=$(ns "$h")
    ip netns add "$n"
    # Both ends are made inside the namespaces: no interface ever appears on the machine.
    ip -n "$sw" link add "p$h" type veth peer name eth0 netns "$n"
    ip -n "$sw" link set "p$h" master br0 up
    ip -n "$n" addr add "$(ip_of "$h")/24" dev eth0
    ip -n "$n" link set eth0 up
    ip -n "$n" link set lo up
    # `ip netns exec` bind-mounts this over /etc/hosts: the hosts know each other by name.
    mkdir -p "/etc/netns/$n"
    { echo "127.0.0.1 localhost"; for o in $HOSTS; do echo "$(ip_of "$o") $o"; done; } \
      > "/etc/netns/$n/hosts"
  done
}

# --- processes: each started in its host, with the host's name, the volume mounted ---------
# spawn HOST NAME CMD...: run CMD in HOST in the background, log to logs/HOST-NAME.log.
spawn() {
  local h=$1 name=$2; shift 2
  ip netns exec "$(ns "$h")" unshare --uts --mount --propagation slave \
    "$HERE/cluster.sh" _host "$h" "$@" >> "$LQ_RUN/logs/$h-$name.log" 2>&1 &
  echo $! > "$LQ_RUN/pids/$h-$name"
}

# Inside a host: its own hostname and the shared volume at this host's mount point.
host_exec() {
  local h=$1; shift
  hostname "$h"
  mount --bind "$LQ_RUN/volume" "$LQ_RUN/hosts/$h/data"
  exec "$@"
}

labq_env() {  # the settings labq's processes on host $1 get (docs/admin.md, "Several hosts")
  local h=$1 urls="" n
  for n in $NODE_HOSTS; do urls="${urls:+$urls,}amqp://labq:$LQ_AMQP_PASS@$n:5672/%2F"; done
  cat <<EOF
LABQ_RABBITMQ_URL=$urls
LABQ_QUEUE_TYPE=quorum
LABQ_PREFIX=lqmh
LABQ_DATA_DIR=$LQ_RUN/hosts/$h/data
LABQ_WORK_DIR=$LQ_RUN/hosts/$h/work
LABQ_LOG_LEVEL=INFO
LABQ_HEARTBEAT_S=10
LABQ_SHUTDOWN_GRACE_S=5
EOF
  if [ "$h" = h1 ]; then  # only the backend needs the database (workers never touch it)
    cat <<EOF
LABQ_DATABASE_URL=postgresql+psycopg://postgres@h1:5432/labq
LABQ_HOST=$(ip_of h1)
LABQ_PORT=8080
LABQ_ALLOWED_HOSTS=h1,$(ip_of h1)
LABQ_RECONCILE_INTERVAL_S=5
LABQ_RECONCILE_AFTER_S=20
EOF
  fi
}

start_labq() {  # start_labq HOST NAME labq-args...
  local h=$1 name=$2; shift 2
  local -a envs; mapfile -t envs < <(labq_env "$h")
  spawn "$h" "$name" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "${envs[@]}" \
    "$LABQ_BIN" "$@"
}

# --- PostgreSQL (h1): a cluster of its own, never the machine's -----------------------------
start_postgres() {
  local pg="$LQ_RUN/pg" bin; bin=$(pg_bin)
  mkdir -p "$pg"; chown postgres: "$pg"
  runuser -u postgres -- "$bin/initdb" -D "$pg/data" --auth=trust --encoding=UTF8 \
    --locale=C.UTF-8 > "$LQ_RUN/logs/h1-initdb.log" 2>&1
  echo "host all all $SUBNET.0/24 trust" >> "$pg/data/pg_hba.conf"
  in_host h1 runuser -u postgres -- "$bin/pg_ctl" -D "$pg/data" -l "$pg/postgres.log" \
    -o "-c listen_addresses=$(ip_of h1) -c unix_socket_directories=$pg -c fsync=off" -w start \
    > /dev/null
  in_host h1 runuser -u postgres -- "$bin/createdb" -h "$(ip_of h1)" labq
}

# --- RabbitMQ: one node per host, each with its own env file (Debian's pins 127.0.0.1) ------
node_dir() { echo "$LQ_RUN/rabbit/$1"; }
write_node_config() {
  local h=$1 d; d=$(node_dir "$h")
  mkdir -p "$d/mnesia" "$d/log"
  cat > "$d/rabbitmq-env.conf" <<EOF
NODENAME=rabbit@$h
NODE_IP_ADDRESS=$(ip_of "$h")
NODE_PORT=5672
CONFIG_FILE=$d/rabbitmq
ADVANCED_CONFIG_FILE=$d/advanced.config
ENABLED_PLUGINS_FILE=$d/enabled_plugins
MNESIA_BASE=$d/mnesia
LOG_BASE=$d/log
PID_FILE=$d/pid
EOF
  {
    echo "listeners.tcp.1 = $(ip_of "$h"):5672"
    echo "default_user = labq"
    echo "default_pass = $LQ_AMQP_PASS"
    echo "loopback_users = none"
    if [ "$h" != h1 ]; then  # h1 boots alone at once (it would retry its peers for 5 s)
      echo "cluster_formation.peer_discovery_backend = classic_config"
      local i=1 n
      for n in $NODE_HOSTS; do echo "cluster_formation.classic_config.nodes.$i = rabbit@$n"; i=$((i + 1)); done
    fi
    echo "log.file.level = info"
  } > "$d/rabbitmq.conf"
  echo "[]." > "$d/advanced.config"
  echo "[]." > "$d/enabled_plugins"
  chown -R rabbitmq: "$d"
}
rabbit_env() {  # a clean environment: nothing of the machine's broker settings leaks in
  echo -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME="$LQ_RUN/rabbit/home" \
    RABBITMQ_CONF_ENV_FILE="$(node_dir "$1")/rabbitmq-env.conf"
}
start_node() {
  local h=$1
  # shellcheck disable=SC2046
  spawn "$h" rabbit runuser -u rabbitmq -- env $(rabbit_env "$h") /usr/lib/rabbitmq/bin/rabbitmq-server
}
ctl() {  # ctl HOST args...: rabbitmqctl against HOST's node, from inside HOST
  local h=$1; shift
  # shellcheck disable=SC2046
  in_host "$h" runuser -u rabbitmq -- env $(rabbit_env "$h") \
    /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "rabbit@$h" "$@"
}
await_node() {  # until HOST's node has booted (await_startup fails while it is not up yet)
  local i
  for i in $(seq 1 180); do
    ctl "$1" await_startup --timeout 60 > /dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "the RabbitMQ node of $1 did not start (logs/$1-rabbit.log)"
}
running_nodes() {  # how many nodes HOST's node sees running
  ctl "$1" cluster_status --formatter json 2>/dev/null \
    | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["running_nodes"]))' 2>/dev/null \
    || echo 0
}
await_cluster() {  # await_cluster HOST N: HOST's node sees N running nodes
  local i
  for i in $(seq 1 300); do
    [ "$(running_nodes "$1")" = "$2" ] && return 0
    sleep 0.2
  done
  die "the RabbitMQ cluster did not reach $2 running nodes"
}

start_workers() {
  local h=$1 i
  for i in $(seq 1 "$WORKERS_PER_HOST"); do start_labq "$h" "worker$i" worker; done
}

await_backend() {  # until the backend answers /healthz on h1's address, seen from h4
  local i pid; pid=$(cat "$LQ_RUN/pids/h1-backend")
  for i in $(seq 1 300); do
    in_host h4 python3 -c "import urllib.request as u; u.urlopen('http://$(ip_of h1):8080/healthz', timeout=2)" \
      2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || die "the backend exited (logs/h1-backend.log)"
    sleep 0.2
  done
  die "the backend did not answer within 60 s"
}

kill_pids_of() {  # SIGKILL every process in namespace $1 until none is left
  local n=$1 i pids
  for i in $(seq 1 100); do
    pids=$(ip netns pids "$n" 2>/dev/null || true)
    [ -z "$pids" ] && return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.05
  done
  log "processes survive in $n: $pids"
  return 1
}
kill_node() {  # SIGKILL HOST's RabbitMQ node: the rabbitmq-user processes of its namespace
  local n pid i left
  n=$(ns "$1")
  for i in $(seq 1 100); do
    left=""
    for pid in $(ip netns pids "$n" 2>/dev/null); do
      [ "$(stat -c %U "/proc/$pid" 2>/dev/null)" = rabbitmq ] && left="$left $pid"
    done
    [ -z "$left" ] && return 0
    # shellcheck disable=SC2086
    kill -9 $left 2>/dev/null || true
    sleep 0.05
  done
  die "the RabbitMQ node of $1 survives: $left"
}

# --- teardown: everything this run made, pass or fail ----------------------------------------
teardown() {
  local rc=$?
  set +e
  if [ -n "${LQ_KEEP_LOGS:-}" ] || [ "$rc" != 0 ]; then
    for f in "$LQ_RUN"/logs/*.log; do
      [ -s "$f" ] || continue
      echo "----- $(basename "$f") (last 40 lines)" >&2; tail -n 40 "$f" >&2
    done
  fi
  if [ -n "${LQ_LOG_DIR:-}" ]; then  # keep the services' logs (the RabbitMQ nodes' too)
    mkdir -p "$LQ_LOG_DIR"
    cp "$LQ_RUN"/logs/*.log "$LQ_LOG_DIR"/ 2>/dev/null
    for h in $NODE_HOSTS; do cp "$(node_dir "$h")/log/rabbit@$h.log" "$LQ_LOG_DIR/" 2>/dev/null; done
  fi
  for h in $HOSTS sw; do kill_pids_of "$(ns "$h")" 2>/dev/null; done
  # Job processes live in namespaces of their own; their worker's death ends them, but
  # make sure: anything still holding this run's folder goes.
  local left
  left=$(grep -l -s -- "$LQ_RUN" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 || true)
  # shellcheck disable=SC2086
  [ -n "$left" ] && kill -9 $left 2>/dev/null
  for h in $HOSTS sw; do
    ip netns del "$(ns "$h")" 2>/dev/null
    rm -rf "/etc/netns/$(ns "$h")"
  done
  for h in $HOSTS; do umount -l "$LQ_RUN/hosts/$h/data" 2>/dev/null; done
  rm -rf "$LQ_RUN"
  log "torn down (exit $rc)"
  exit "$rc"
}

cmd_run() {
  local why
  if ! why=$(preflight); then echo "SKIP: $why"; exit 77; fi
  LQ_ID="lq$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')"
  # /tmp, not $TMPDIR: the postgres and rabbitmq users and the job uids must pass through.
  LQ_RUN=$(mktemp -d /tmp/labq-multihost.XXXXXX)
  export LQ_ID LQ_RUN LABQ_BIN
  trap teardown EXIT
  trap 'exit 130' INT TERM
  chmod 755 "$LQ_RUN"  # job uids pass through to their work dirs
  mkdir -p "$LQ_RUN"/{logs,pids,volume,rabbit/home}
  for h in $HOSTS; do mkdir -p "$LQ_RUN/hosts/$h/data" "$LQ_RUN/hosts/$h/work"; done
  LQ_AMQP_PASS=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
  od -An -N20 -tx1 /dev/urandom | tr -d ' \n' > "$LQ_RUN/rabbit/home/.erlang.cookie"
  chmod 400 "$LQ_RUN/rabbit/home/.erlang.cookie"
  chown -R rabbitmq: "$LQ_RUN/rabbit"
  printf 'LQ_ID=%s\nLQ_AMQP_PASS=%s\n' "$LQ_ID" "$LQ_AMQP_PASS" > "$LQ_RUN/state"
  echo "LQ_ID=$LQ_ID LQ_RUN=$LQ_RUN"  # what the pytest wrapper checks is gone afterwards
  local t0=$SECONDS
  setup_network
  log "network up: switch $(ns sw), hosts $HOSTS on $SUBNET.0/24"
  for h in $NODE_HOSTS; do write_node_config "$h"; done
  start_node h1
  start_postgres
  log "PostgreSQL up on h1"
  await_node h1
  start_node h2; start_node h3
  await_node h2; await_node h3
  await_cluster h1 3
  log "RabbitMQ cluster of 3 nodes up ($((SECONDS - t0)) s)"
  start_labq h1 backend backend
  await_backend
  for h in $WORKER_HOSTS; do start_workers "$h"; done
  log "backend and $((WORKERS_PER_HOST * 2)) workers started ($((SECONDS - t0)) s)"
  # In the background, so a TERM (a timeout) reaches the trap at once: `wait` yields to it.
  in_host h4 env LABQ_URL="http://$(ip_of h1):8080" LQ_ADMIN_TOKEN_FILE="$LQ_RUN/volume/admin-token" \
    LQ_CLUSTER="$HERE/cluster.sh" LQ_RUN="$LQ_RUN" LQ_ID="$LQ_ID" LABQ_BIN="$LABQ_BIN" \
    ${LQ_DRIVER:-"$(dirname "$LABQ_BIN")/python" "$HERE/driver.py"} "$@" &
  wait $!
}

LABQ_BIN=${LABQ_BIN:-$REPO/.venv/bin/labq}
cmd=${1:-}; shift || true
case "$cmd" in
  run) cmd_run "$@" ;;
  preflight) preflight ;;
  _host) host_exec "$@" ;;
  kill-host) load_state; kill_pids_of "$(ns "$1")" ;;
  start-host) load_state
    if [[ " $NODE_HOSTS " == *" $1 "* ]]; then start_node "$1"; await_node "$1"; await_cluster "$1" 3; fi
    [[ " $WORKER_HOSTS " == *" $1 "* ]] && start_workers "$1"; true ;;
  kill-node) load_state; kill_node "$1" ;;
  start-node) load_state; start_node "$1"; await_node "$1"; await_cluster "$1" 3 ;;
  kill-backend) load_state; p=$(cat "$LQ_RUN/pids/h1-backend")  # gunicorn's master
    # A crash, not a clean stop: SIGKILL the master and its worker process at once.
    kill -9 $(pgrep -P "$p") "$p" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$p" 2>/dev/null || [ -n "$(pgrep -P "$p")" ] || exit 0; sleep 0.1
    done
    die "the backend survived SIGKILL" ;;
  start-backend) load_state; start_labq h1 backend backend; await_backend ;;
  node-of-queue) load_state
    ctl h1 list_queues name leader --formatter json \
      | python3 -c 'import json,sys; q=[r for r in json.load(sys.stdin) if r["name"]==sys.argv[1]]; print(q[0]["leader"].split("@")[1] if q else "")' "$1" ;;
  connections) load_state  # "NAME<TAB>HOST" of every client connection, asking HOST $1's node
    ctl "$1" list_connections host client_properties --formatter json \
      | python3 -c '
import json, sys
hosts = {"'"$(ip_of h1)"'": "h1", "'"$(ip_of h2)"'": "h2", "'"$(ip_of h3)"'": "h3"}
for c in json.load(sys.stdin):
    host = c["host"] if isinstance(c["host"], str) else ".".join(map(str, c["host"]))
    props = {p[0]: p[2] for p in c["client_properties"]}
    print(props.get("connection_name", "?") + "\t" + hosts.get(host, host))' ;;
  node-of-connection) load_state  # the host whose node serves the connection named $1
    ctl h1 list_connections host client_properties --formatter json \
      | python3 -c '
import json, sys
hosts = {"'"$(ip_of h1)"'": "h1", "'"$(ip_of h2)"'": "h2", "'"$(ip_of h3)"'": "h3"}
for c in json.load(sys.stdin):
    host = c["host"] if isinstance(c["host"], str) else ".".join(map(str, c["host"]))
    props = {p[0]: p[2] for p in c["client_properties"]}
    if props.get("connection_name") == sys.argv[1]:
        print(hosts.get(host, host)); break' "$1" ;;
  *) echo "usage: cluster.sh run [DRIVER ARGS] | preflight" >&2; exit 2 ;;
esac
