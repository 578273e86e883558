#!/usr/bin/env bash
# Redis Cluster, 3 primaries + 3 replicas, one redisguard sidecar per node, all on loopback.
#
#   bash config/examples/cluster/cluster.sh start [DIR]   # default DIR: run/cluster
#   bash config/examples/cluster/cluster.sh stop  [DIR]
#
# Node i (0..5) uses these ports (override the bases with BASE=, SIDECARS=, METRICS=):
#   sidecar TLS  SIDECARS+i (6380+i)  what clients connect to, and what the node announces (cluster-announce-port)
#   metrics      METRICS+i (9187+i)   redisguard's /metrics, /healthz, /readyz
#   Redis plain  BASE+i      127.0.0.1 only: the sidecar's upstream
#   Redis TLS    BASE+100+i  Redis's own TLS port: cluster bus peers, replicas, MIGRATE, operators
#                            (tls-cluster, tls-replication, cluster-announce-tls-port)
#   cluster bus  BASE+10000+i (cluster-port, cluster-announce-bus-port)
# On several hosts: set cluster-announce-ip to each host's address, bind Redis to loopback plus the
# private interface its TLS port and bus are reached on, and firewall the plain port (or use port 0 and
# a unix socket for the sidecar). See docs/cluster.md.
set -euo pipefail
cmd=${1:-start}
dir=$(realpath -m "${2:-run/cluster}")
base=${BASE:-7000}
sidecars=${SIDECARS:-6380}
metrics_base=${METRICS:-9187}
redisguard=${REDISGUARD:-redisguard}
[ -x .venv/bin/redisguard ] && [ -z "${REDISGUARD:-}" ] && redisguard=.venv/bin/redisguard

if [ "$cmd" = stop ]; then
  for pid in "$dir"/*.pid; do [ -e "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true; rm -f "$pid"; done
  exit 0
fi

mkdir -p "$dir"
[ -e "$dir/certs/ca.pem" ] || "$redisguard" certs init --dir "$dir/certs" --client-name admin >/dev/null
svc_pw=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
echo "$svc_pw" > "$dir/upstream.pw" && chmod 600 "$dir/upstream.pw"
cat > "$dir/users.acl" <<'USERS'
user default off
user admin on >admin-password ~* &* +@all
user app on >app-password ~* &* +@all -@dangerous
USERS

tls_ports=()
for i in 0 1 2 3 4 5; do
  port=$((base + i)) tls=$((base + 100 + i)) bus=$((base + 10000 + i)) sidecar=$((sidecars + i)) metrics=$((metrics_base + i))
  node="$dir/node$i"
  mkdir -p "$node"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$node" --daemonize no \
    --cluster-enabled yes --cluster-config-file "$node/nodes.conf" --cluster-node-timeout 5000 --cluster-port "$bus" \
    --cluster-announce-ip 127.0.0.1 --cluster-announce-port "$sidecar" \
    --cluster-announce-tls-port "$tls" --cluster-announce-bus-port "$bus" \
    --tls-port "$tls" --tls-cluster yes --tls-replication yes \
    --tls-cert-file "$dir/certs/server.pem" --tls-key-file "$dir/certs/server.key" \
    --tls-client-cert-file "$dir/certs/client.pem" --tls-client-key-file "$dir/certs/client.key" \
    --tls-ca-cert-file "$dir/certs/ca.pem" \
    --user default off --user svc on ">$svc_pw" '~*' '&*' +@all -@dangerous +cluster +restore-asking +info '+config|get' \
    --user repl on ">$svc_pw-repl" +psync +replconf +ping \
    --masteruser repl --masterauth "$svc_pw-repl" >"$node/redis.log" 2>&1 &
  echo $! > "$dir/redis$i.pid"
  cat > "$node/redisguard.toml" <<TOML
[[listener]]
name = "tls"
type = "tls"
address = "127.0.0.1:$sidecar"
cert_file = "$dir/certs/server.pem"
key_file = "$dir/certs/server.key"

[upstream]
address = "127.0.0.1:$port"
username = "svc"
password_file = "$dir/upstream.pw"

[acl]
users_file = "$dir/users.acl"

[metrics]
address = "127.0.0.1:$metrics"
TOML
  tls_ports+=("127.0.0.1:$tls")
done
for i in 0 1 2 3 4 5; do
  until redis-cli -p $((base + i)) --user svc --pass "$svc_pw" --no-auth-warning ping >/dev/null 2>&1; do sleep 0.1; done
  "$redisguard" serve -c "$dir/node$i/redisguard.toml" >"$dir/node$i/redisguard.log" 2>&1 &
  echo $! > "$dir/redisguard$i.pid"
done

# The cluster is created on Redis's own TLS ports, as an operator (not through redisguard).
redis-cli --tls --cacert "$dir/certs/ca.pem" --cert "$dir/certs/client.pem" --key "$dir/certs/client.key" \
  --user svc --pass "$svc_pw" --no-auth-warning --cluster create "${tls_ports[@]}" --cluster-replicas 1 --cluster-yes
until redis-cli -p "$base" --user svc --pass "$svc_pw" --no-auth-warning info replication | grep -q connected_slaves:1; do
  sleep 0.2
done
for i in 0 1 2 3 4 5; do
  "$redisguard" audit-upstream -c "$dir/node$i/redisguard.toml" | grep cluster- || true
done
echo
echo "clients: redis-cli -c --tls --cacert $dir/certs/ca.pem -p $sidecars --user app --pass app-password"
echo "stop:    bash $0 stop $dir"
