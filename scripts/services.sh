#!/usr/bin/env bash
# PostgreSQL and Redis on loopback for a Prefect server that holds large runs (README, "Large
# runs"). Every command is idempotent.
#
#   scripts/services.sh install    Debian's postgresql + redis-server (as root; skipped when there)
#   scripts/services.sh start  [--dir DIR] [--pg-port P] [--redis-port R] [--no-redis]
#       a private PostgreSQL cluster in DIR/pg (initdb once; database and role "prefect", a
#       generated password) and a Redis server (password too), both listening on 127.0.0.1
#       only; writes DIR/prefect-server.env (0600): the environment of a `prefect server` on
#       them (database URL; with Redis, Prefect's Redis messaging, cache, ordering, lease
#       storage and docket). Start the server with:
#           set -a; . DIR/prefect-server.env; set +a; prefect server start
#   scripts/services.sh stop   [--dir DIR]    stops both (the data stays in DIR)
#   scripts/services.sh status [--dir DIR]
#
# Defaults: DIR=.state/services, PostgreSQL 55432, Redis 56379 (clear of system-wide ones).
# As root, PostgreSQL runs as the `postgres` account (it refuses root) and DIR/pg is its own.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "services: $*" >&2; exit 1; }

cmd=${1:-}
[[ -n $cmd ]] && shift || true
dir=.state/services
pg_port=55432
redis_port=56379
with_redis=1
while (($#)); do
  case $1 in
    --dir) dir=${2:?--dir needs a directory}; shift 2 ;;
    --pg-port) pg_port=${2:?--pg-port needs a port}; shift 2 ;;
    --redis-port) redis_port=${2:?--redis-port needs a port}; shift 2 ;;
    --no-redis) with_redis=0; shift ;;
    *) die "unknown option '$1' (see the top of $0)" ;;
  esac
done
[[ $pg_port =~ ^[0-9]+$ && $redis_port =~ ^[0-9]+$ ]] || die "ports must be numbers"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
pgdata=$dir/pg

install() {
  local missing=()
  for p in postgresql redis-server; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  [[ $(id -u) -eq 0 ]] || die "install as root: apt-get install ${missing[*]}"
  echo "services: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # the packages' own system-wide services are not used: each start below runs its own
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pg_bin() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [[ -n $bin && -x $bin/postgres ]] || die "PostgreSQL is not installed (scripts/services.sh install)"
  echo "$bin"
}

# Run a PostgreSQL program as the account that owns the cluster (never root).
as_pg() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

secret() {  # a password kept in DIR (0600), made once
  local file=$dir/$1.password
  if [[ ! -s $file ]]; then
    (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$file")
  fi
  cat "$file"
}

start_postgres() {
  local bin pw
  bin=$(pg_bin)
  pw=$(secret postgres)
  if [[ ! -s $pgdata/PG_VERSION ]]; then
    mkdir -p "$pgdata"
    chmod 700 "$pgdata"
    local pwfile=$dir/.initdb-pw
    (umask 077; printf '%s\n' "$pw" > "$pwfile")
    if [[ $(id -u) -eq 0 ]]; then chown postgres: "$pgdata" "$pwfile"; chmod o+x "$dir"; fi
    as_pg "$bin/initdb" -D "$pgdata" -U prefect --pwfile="$pwfile" --auth-local=scram-sha-256 \
      --auth-host=scram-sha-256 -E UTF8 >"$dir/initdb.log" 2>&1 || {
        rm -f "$pwfile"; tail -20 "$dir/initdb.log" >&2; die "initdb failed"; }
    rm -f "$pwfile"
  fi
  if as_pg "$bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
    echo "services: PostgreSQL already running ($pgdata)" >&2
  else
    as_pg "$bin/pg_ctl" -D "$pgdata" -l "$pgdata/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $pgdata -c max_connections=300 -c shared_buffers=256MB" \
      start >/dev/null || { tail -20 "$pgdata/server.log" >&2; die "PostgreSQL did not start"; }
    echo "services: PostgreSQL on 127.0.0.1:$pg_port ($pgdata)" >&2
  fi
  local port
  port=$(sed -n 4p "$pgdata/postmaster.pid")
  if ! PGPASSWORD=$pw "$bin/psql" -h 127.0.0.1 -p "$port" -U prefect -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = 'prefect'" | grep -q 1; then
    PGPASSWORD=$pw "$bin/createdb" -h 127.0.0.1 -p "$port" -U prefect prefect >&2
  fi
  echo "$port"
}

redis_running() { [[ -s $dir/redis.pid ]] && kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null; }

start_redis() {
  command -v redis-server >/dev/null || die "redis-server is not installed (scripts/services.sh install)"
  local pw conf=$dir/redis.conf
  pw=$(secret redis)
  if redis_running; then
    echo "services: Redis already running (pid $(cat "$dir/redis.pid"))" >&2
  else
    (umask 077; cat > "$conf" <<EOF
bind 127.0.0.1
port $redis_port
protected-mode yes
daemonize yes
dir $dir
pidfile $dir/redis.pid
logfile $dir/redis.log
save ""
appendonly no
requirepass $pw
EOF
    )
    redis-server "$conf"
    for _ in $(seq 50); do redis_running && break; sleep 0.1; done
    redis_running || { tail -20 "$dir/redis.log" >&2; die "Redis did not start"; }
    echo "services: Redis on 127.0.0.1:$redis_port" >&2
  fi
  awk '$1 == "port" {print $2}' "$conf"
}

write_env() {  # PG_PORT [REDIS_PORT]
  local env=$dir/prefect-server.env pw
  pw=$(secret postgres)
  (umask 077; {
    echo "PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect:$pw@127.0.0.1:$1/prefect"
    if [[ -n ${2:-} ]]; then
      local url="redis://:$(secret redis)@127.0.0.1:$2"
      echo "PREFECT_SERVER_EVENTS_MESSAGING_BROKER=prefect_redis.messaging"
      echo "PREFECT_SERVER_EVENTS_MESSAGING_CACHE=prefect_redis.messaging"
      echo "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=prefect_redis.ordering"
      echo "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect_redis.lease_storage"
      echo "PREFECT_REDIS_MESSAGING_URL=$url/0"
      echo "PREFECT_SERVER_DOCKET_URL=$url/1"
    fi
  } > "$env")
  echo "services: the Prefect server's environment is in $env"
}

stop() {
  if [[ -s $pgdata/PG_VERSION ]] && as_pg "$(pg_bin)/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
    as_pg "$(pg_bin)/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null
    echo "services: PostgreSQL stopped"
  fi
  if redis_running; then
    local pid
    pid=$(cat "$dir/redis.pid")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "services: Redis stopped"
  fi
}

case $cmd in
  install) install ;;
  start)
    pg=$(start_postgres)
    redis=""
    ((with_redis)) && redis=$(start_redis)
    write_env "$pg" "$redis" ;;
  stop) stop ;;
  status)
    if [[ -s $pgdata/PG_VERSION ]]; then as_pg "$(pg_bin)/pg_ctl" -D "$pgdata" status || true; fi
    if redis_running; then echo "Redis running (pid $(cat "$dir/redis.pid"))"; else echo "Redis not running"; fi ;;
  *) die "usage: $0 install | start [--dir DIR] [--pg-port P] [--redis-port R] [--no-redis] | stop [--dir DIR] | status [--dir DIR]" ;;
esac
