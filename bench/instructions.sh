#!/usr/bin/env bash
# Instructions per request through sidecar, counted by valgrind (callgrind): deterministic,
# whatever else the machine is doing, so a change to the hot path can be judged on a noisy
# box where CPU-time ratios move by 10% between runs.
#
#   bench/instructions.sh [json|sdkjson|stream|sat|aggregate|synthesize] [N]
#
# Runs the daemon under callgrind twice, over N and 3N requests on one keep-alive connection
# (json: non-streaming, 64 tokens; sdkjson: json with the ~15 headers the openai Python SDK
# sends; stream: 64-token streams paced at 1 ms; sat: 64-token
# streams, 8 events per worker write; aggregate: 64-token worker streams paced at 1 ms,
# each aggregated into one JSON answer for a non-streaming client; synthesize: streaming
# clients on a `never` route, each worker JSON answer made into SSE), and prints
# (I(3N) - I(N)) / 2N: the user-space instructions one request costs, start-up excluded.
# Kernel work is not counted. Needs valgrind (Debian's package) and the repo's .venv.
# Measures only; edits nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-stream}
n=${2:-100}
py=${SIDECAR_PYTHON:-.venv/bin/python}
tokens=${TOKENS:-64}  # tokens per answer (TOKENS=16 and TOKENS=272 split per-stream from per-token cost)
command -v valgrind >/dev/null || { echo "bench/instructions.sh: needs valgrind (apt-get install valgrind)" >&2; exit 2; }
case $kind in
  json) args=(--json --tokens "$tokens") ;;
  sdkjson) args=(--json --tokens "$tokens" --sdk-headers) ;;
  stream) args=(--tokens "$tokens") ;;
  sat) args=(--path /sat/v1/chat/completions --tokens "$tokens") ;;
  aggregate) args=(--json --path /always/v1/chat/completions --tokens "$tokens") ;;
  synthesize) args=(--path /never/v1/chat/completions --tokens "$tokens") ;;
  *) echo "usage: bench/instructions.sh [json|sdkjson|stream|sat|aggregate|synthesize] [N]" >&2; exit 2 ;;
esac
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wport=$(free_port)
"$py" bench/fakeworker.py --port "$wport" --tick-ms 1 --sat-batch 8 >"$tmp/worker.log" 2>&1 &

count() {  # count N -> instructions of a whole daemon run serving N requests
  local port
  port=$(free_port)
  cat >"$tmp/sidecar.yaml" <<EOF
listen: 127.0.0.1:$port
upstream: {url: "http://127.0.0.1:$wport"}
pricing:
  models:
    "m": {prompt: 0.10, completion: 0.30}
routes:
  - {name: chat, match: {path: /v1/chat/completions}, dialect: openai-chat}
  - {name: sat, match: {path: /sat/v1/chat/completions}, dialect: openai-chat}
  - {name: always, match: {path: /always/v1/chat/completions}, dialect: openai-chat, upstream_stream: always}
  - {name: never, match: {path: /never/v1/chat/completions}, dialect: openai-chat, upstream_stream: never}
EOF
  valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" \
    "$py" -m sidecar run -c "$tmp/sidecar.yaml" >"$tmp/sidecar.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 240); do
    sleep 0.5
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  done
  "$py" bench/loadgen.py --port "$port" --conns 1 --requests "$1" --duration 900 "${args[@]}" >"$tmp/load.json"
  kill -TERM "$pid"
  wait "$pid" || true
  grep -o "Collected : [0-9]*" "$tmp/sidecar.log" | grep -o "[0-9]*"
}

a=$(count "$n")
b=$(count $((3 * n)))
echo "$kind: $(((b - a) / (2 * n))) instructions per request (user space, callgrind; N=$n and $((3 * n)))"
