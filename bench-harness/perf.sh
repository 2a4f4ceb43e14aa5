#!/usr/bin/env bash
# One run of every figure in the README's "Performance" section: ruyi (durable,
# sync = "always"), mosquitto and nats-server (persistence on, PEERS.md) under
# the same loads, the chaos runs, and the load generator's own ceiling against
# the null sink. Writes OUT/*.json and OUT/*.svg and prints the table.
#
#   bench-harness/perf.sh [OUT]          (from the repository root)
#
# Needs mosquitto and nats-server (Debian: apt-get install mosquitto
# nats-server); the peers' runs are skipped when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/ruyi-perf}
rm -rf "$out"
mkdir -p "$out"
cargo build --release -p ruyi -p bench-harness >&2
bin=${CARGO_TARGET_DIR:-target}/release
bench=$bin/ruyi-bench
ruyi=$bin/ruyi
secs=${PERF_SECONDS:-10}
warm=${PERF_WARMUP:-2}

cat >"$out/durable.toml" <<'EOF'
[storage]
sync = "always"
[api]
token = "t"
[limits]
accepts_per_ip_per_second = 0
frames_per_second_per_connection = 0
EOF

serve() { # data directory name
  echo "$ruyi serve --config $out/durable.toml --listen 127.0.0.1:5100 --auth-secret s --data-dir $out/data-$1"
}
common=(--secret s --duration-s "$secs" --warmup-s "$warm" --payload-bytes 64)
# ruyi's own latency budget (its /metrics), for the ruyi runs.
budget=(--metrics http://127.0.0.1:5001 --metrics-token t)
chat_load=(--pairs 100 --window 16)
group_load=(--groups 10 --members 100 --online-percent 50 --senders-per-group 1 --window 4)
mixed_load=(--pairs 50 --chat-window 4 --groups 5 --members 100 --group-window 2)

# Which peers this run measured (the table names them).
{
  git rev-parse --short HEAD 2>/dev/null | sed 's/^/ruyi commit /' || true
  command -v mosquitto >/dev/null && mosquitto -h 2>/dev/null | head -1 || true
  command -v nats-server >/dev/null && nats-server --version 2>/dev/null || true
} >"$out/versions.txt"

echo "== harness ceiling: chat against the null sink" >&2
$bench sink --listen 127.0.0.1:5200 >"$out/sink.log" 2>&1 &
sink=$!
sleep 1
$bench chat --target ruyi://127.0.0.1:5200 "${common[@]}" "${chat_load[@]}" \
  --server-pid "$sink" --json "$out/ceiling.json" >&2 || true
kill "$sink"
wait "$sink" 2>/dev/null || true

echo "== ruyi" >&2
# The same chat load flat out, paced at 25,000 and 5,000 sends/s, and flat
# out pinned (the server on CPU 0 with one shard, the generator on CPU 1
# with one executor): issue 13's rows.
chat_runs() { # target-name server-cmd-maker [target args...]
  local name=$1 make=$2
  shift 2
  $bench chat --server-cmd "$($make chat)" "$@" "${common[@]}" "${chat_load[@]}" \
    --json "$out/$name-chat.json" --plot "$out/$name-chat.svg" >&2 || true
  for rate in 25000 5000; do
    $bench chat --server-cmd "$($make chat-$rate)" "$@" "${common[@]}" "${chat_load[@]}" --rate $rate \
      --json "$out/$name-chat-$rate.json" >&2 || true
  done
  taskset -c 1 $bench chat --server-cmd "taskset -c 0 $($make chat-pinned) $pin_args" "$@" "${common[@]}" \
    "${chat_load[@]}" --threads 1 --json "$out/$name-chat-pinned.json" >&2 || true
}
pin_args="--shards 1"
chat_runs ruyi serve "${budget[@]}"
pin_args=""
$bench group --server-cmd "$(serve group)" --api-token t "${common[@]}" "${budget[@]}" "${group_load[@]}" \
  --json "$out/ruyi-group.json" --plot "$out/ruyi-group.svg" >&2
$bench mixed --server-cmd "$(serve mixed)" --api-token t "${common[@]}" "${budget[@]}" "${mixed_load[@]}" \
  --idle 1000 --json "$out/ruyi-mixed.json" >&2
$bench chat --server-cmd "$(serve chaos-chat)" --chaos kill:5 --secret s --duration-s 30 \
  --pairs 50 --window 4 --json "$out/ruyi-chaos-chat.json" --plot "$out/ruyi-chaos-chat.svg" >&2
$bench group --server-cmd "$(serve chaos-group)" --chaos kill:5 --api-token t --secret s \
  --duration-s 30 --groups 5 --members 100 --senders-per-group 2 --window 2 \
  --json "$out/ruyi-chaos-group.json" >&2
$ruyi serve --config "$out/durable.toml" --listen 127.0.0.1:5100 --auth-secret s \
  --data-dir "$out/data-connect" >"$out/connect-server.log" 2>&1 &
server=$!
sleep 2
$bench connect --secret s --connections 10000 --hold-s 5 --server-pid "$server" \
  --json "$out/ruyi-connect.json" >&2
kill "$server"
wait "$server" 2>/dev/null || true

if command -v mosquitto >/dev/null; then
  echo "== mosquitto" >&2
  cat >"$out/mosquitto.conf" <<EOF
listener 1883 127.0.0.1
allow_anonymous true
persistence true
persistence_location $out/mosquitto/
autosave_interval 1
max_inflight_messages 1000
max_queued_messages 0
max_queued_bytes 0
set_tcp_nodelay true
EOF
  broker="mosquitto -c $out/mosquitto.conf"
  fresh() { # mosquitto drops to its own user, which must own the store
    rm -rf "$out/mosquitto" && mkdir -p "$out/mosquitto"
    if id mosquitto >/dev/null 2>&1; then chown mosquitto: "$out/mosquitto"; fi
  }
  fresh_broker() { fresh; echo "$broker"; }
  chat_runs mqtt fresh_broker --target mqtt://127.0.0.1:1883
  fresh
  $bench group --target mqtt://127.0.0.1:1883 --server-cmd "$broker" "${common[@]}" "${group_load[@]}" \
    --json "$out/mqtt-group.json" >&2 || true
  fresh
  $bench mixed --target mqtt://127.0.0.1:1883 --server-cmd "$broker" "${common[@]}" "${mixed_load[@]}" \
    --idle 0 --json "$out/mqtt-mixed.json" >&2 || true
  fresh
  $broker >"$out/mosquitto-connect.log" 2>&1 &
  peer=$!
  sleep 1
  $bench connect --target mqtt://127.0.0.1:1883 --connections 10000 --hold-s 5 --server-pid "$peer" \
    --json "$out/mqtt-connect.json" >&2 || true
  kill "$peer"
  wait "$peer" 2>/dev/null || true
fi

if command -v nats-server >/dev/null; then
  echo "== nats-server" >&2
  nats() { echo "nats-server -a 127.0.0.1 -p 4222 -js -sd $out/nats-$1"; }
  chat_runs nats nats --target nats://127.0.0.1:4222
  $bench group --target nats://127.0.0.1:4222 --server-cmd "$(nats group)" "${common[@]}" "${group_load[@]}" \
    --json "$out/nats-group.json" >&2 || true
  $bench mixed --target nats://127.0.0.1:4222 --server-cmd "$(nats mixed)" "${common[@]}" "${mixed_load[@]}" \
    --idle 0 --json "$out/nats-mixed.json" >&2 || true
  $(nats connect) >"$out/nats-connect.log" 2>&1 &
  peer=$!
  sleep 1
  $bench connect --target nats://127.0.0.1:4222 --connections 10000 --hold-s 5 --server-pid "$peer" \
    --json "$out/nats-connect.json" >&2 || true
  kill "$peer"
  wait "$peer" 2>/dev/null || true
fi

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
        v = v.get("chat", v)  # mixed: the chat part's
        return "-" if p not in v else f"{v[p] / 1000:.1f}"
    cpu = j.get("server_cpu_percent")
    gen = j.get("generator_cpu_percent")
    rss = j.get("server_rss_bytes")
    checks = "/".join(str(j.get(k, 0)) for k in ("lost", "duplicated", "reordered", "unexpected"))
    return (f"| {label} | {j.get('sends_per_s', 0):,.0f} | {j.get('deliveries_per_s', 0):,.0f} | "
            f"{lat('ack_latency_us', 'p50')} / {lat('ack_latency_us', 'p99')} | "
            f"{lat('delivery_latency_us', 'p99')} | "
            f"{'-' if cpu is None else f'{cpu:.0f}%'} | {'-' if gen is None else f'{gen:.0f}%'} | {'-' if rss is None else f'{rss / 1048576:.0f} MiB'} | {checks} |")
print("Versions: " + "; ".join(open(os.path.join(out, "versions.txt")).read().split("\n")).strip("; "))
print()
print("| run | acked sends/s | deliveries/s | SendAck p50 / p99 ms | delivery p99 ms | server CPU | generator CPU | server RSS | lost/dup/reord/unexp |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
for name, label in [
    ("ceiling", "harness ceiling: chat vs null sink"),
    ("ruyi-chat", "ruyi chat (durable), flat out"),
    ("mqtt-chat", "mosquitto chat (QoS 1, persistent), flat out"),
    ("nats-chat", "nats chat (JetStream file), flat out"),
    ("ruyi-chat-25000", "ruyi chat at 25,000/s"),
    ("mqtt-chat-25000", "mosquitto chat at 25,000/s"),
    ("nats-chat-25000", "nats chat at 25,000/s"),
    ("ruyi-chat-5000", "ruyi chat at 5,000/s"),
    ("mqtt-chat-5000", "mosquitto chat at 5,000/s"),
    ("nats-chat-5000", "nats chat at 5,000/s"),
    ("ruyi-chat-pinned", "ruyi chat pinned (1 shard on CPU 0, generator on CPU 1)"),
    ("mqtt-chat-pinned", "mosquitto chat pinned"),
    ("nats-chat-pinned", "nats chat pinned"),
    ("ruyi-group", "ruyi group 10x100 (durable)"),
    ("mqtt-group", "mosquitto group"),
    ("nats-group", "nats group"),
    ("ruyi-mixed", "ruyi mixed (chat+group+1k idle)"),
    ("mqtt-mixed", "mosquitto mixed (chat+group)"),
    ("nats-mixed", "nats mixed (chat+group)"),
    ("ruyi-chaos-chat", "ruyi chat, kill -9 every 5 s"),
    ("ruyi-chaos-group", "ruyi group, kill -9 every 5 s"),
]:
    print(row(name, label))
print()
print("Latency budget of the ruyi chat runs (stage: p50 / p99 ms):")
for name in ("ruyi-chat", "ruyi-chat-25000", "ruyi-chat-5000", "ruyi-chat-pinned", "ruyi-group"):
    p = os.path.join(out, name + ".json")
    if os.path.exists(p):
        stages = json.load(open(p)).get("latency_budget") or []
        print(f"- {name}: " + ", ".join(
            f"{s['stage']} {s['p50_us'] / 1000:.2f} / {s['p99_us'] / 1000:.2f}" for s in stages))
print()
print("| connect (10,000 held) | set-up/s | set-up p99 ms | server RSS per connection | server CPU, storm + hold | server CPU, hold only |")
print("|---|---:|---:|---:|---:|---:|")
for name, label in [("ruyi-connect", "ruyi"), ("mqtt-connect", "mosquitto"), ("nats-connect", "nats")]:
    c = os.path.join(out, name + ".json")
    if os.path.exists(c):
        j = json.load(open(c))
        per = j.get("server_rss_bytes_per_connection")
        per = "-" if per is None else f"{per:,} B"
        idle = j.get("server_cpu_percent_idle")
        idle = "-" if idle is None else f"{idle:.1f}%"
        print(f"| {label} | {j['connections_per_s']:,.0f} | {j['setup_latency_us']['p99'] / 1000:.1f} | "
              f"{per} | {j.get('server_cpu_percent') or 0:.1f}% | {idle} |")
print()
for name in ("ruyi-chaos-chat", "ruyi-chaos-group"):
    p = os.path.join(out, name + ".json")
    if os.path.exists(p):
        j = json.load(open(p))
        print(f"{name}: {j.get('server_kills')} kills, longest restart {j.get('longest_restart_s', 0):.2f} s, "
              f"acked {j['acked']}, delivered {j['delivered']}, redelivered {j['redelivered']}, "
              f"failed {j['failed']}")
EOF
