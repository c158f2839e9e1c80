#!/bin/bash
# A proxy in front of nbdkit's file plugin: `nbdproto serve nbd://...` against nbdkit's nbd plugin proxying the
# same backend, alternating, ROUNDS rounds (default 3). The tests, each RUNTIME seconds (default 5): fio (nbd
# engine) 4 KiB random reads and random writes at queue depth 16, and nbdcopy reading the whole 1 GiB export to
# null: (its default connections: the proxies pass the backend's multi-conn through). One TSV line per run and
# test: label, test, the figure (IOPS, or MiB/s for nbdcopy), the proxy's CPU ms (user+sys of the proxy process
# and its threads, from /proc), and its CPU per request (us) or per GiB (ms).
# The backend serves a copy of DIR/disk.img (1 GiB of random data, made if missing; DIR defaults to
# /dev/shm/nbdproto-proxy), writable, so the writes have somewhere to go; the original is never changed.
# BACKENDS picks our servers (default "anyio threads"; anyio runs on its default loop). BASELINE=PYTHON runs
# each of our servers a second time from another installation (labelled "-before"), in the same rounds; every
# one of our servers runs from /, so each Python imports its own installation, never this checkout's.
# TESTS picks tests (default "randread randwrite nbdcopy-read"). Needs nbdkit, fio and nbdcopy.
#   bash bench/bench_proxy.sh
#   ROUNDS=1 RUNTIME=3 BASELINE=../before/.venv/bin/python bash bench/bench_proxy.sh
set -u
cd "$(dirname "$0")/.."
abs() { case $1 in */*) realpath -s "$1" ;; *) echo "$1" ;; esac; }  # not resolving the venv link
python=$(abs "${PYTHON:-.venv/bin/python}")
baseline=${BASELINE:+$(abs "$BASELINE")}
runtime=${RUNTIME:-5}
dir=${DIR:-/dev/shm/nbdproto-proxy}
backend_port=${PORT:-23161}
proxy_port=$((backend_port + 1))
hz=$(getconf CLK_TCK)
tests=${TESTS:-randread randwrite nbdcopy-read}

wait_port() {  # port pid: until the port listens (bounded: 15 s; ss, so that no probe connection is logged)
  for _ in $(seq 150); do
    ss -ltn "sport = :$1" | grep -q LISTEN && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
cpu_ms() { awk -v hz="$hz" '{print int(($14+$15)*1000/hz)}' /proc/$1/stat; }
fio_iops() {  # rw
  fio --name=x --ioengine=nbd --uri=nbd://127.0.0.1:$proxy_port/ --size=1g --runtime="$runtime" --time_based \
    --output-format=terse --terse-version=3 --rw="$1" --bs=4k --iodepth=16 2>/dev/null |
    awk -F';' -v rw="$1" 'NF>8{print (rw == "randread") ? $8 : $49}'
}
measure() {  # label pid test
  local c0 c1 figure t0 t1 ms
  c0=$(cpu_ms "$2")
  case $3 in
    randread | randwrite)
      figure=$(fio_iops "$3")
      c1=$(cpu_ms "$2")
      printf "%s\t%s\t%s\tIOPS\t%s\tcpu_ms\t%s\tus/req\n" "$1" "$3" "$figure" $((c1 - c0)) \
        "$(echo "scale=1; ($c1 - $c0) * 1000 / (${figure:-0} * $runtime + 1)" | bc -l)" ;;
    nbdcopy-read)
      t0=$(date +%s%N)
      nbdcopy nbd://127.0.0.1:$proxy_port/ null: 2>/dev/null
      t1=$(date +%s%N)
      c1=$(cpu_ms "$2")
      ms=$(((t1 - t0) / 1000000))
      printf "%s\t%s\t%s\tMiB/s\t%s\tcpu_ms\t%s\tms/GiB\n" "$1" "$3" $((1024 * 1000 / (ms + 1))) $((c1 - c0)) \
        $((c1 - c0)) ;;
  esac
}
run_ours() {  # label python backend: serve from /, so that the python imports its own installation
  local label=$1 py=$2 backend=$3 P
  (cd / && exec "$py" -m nbdproto serve "$upstream" --port $proxy_port --backend "$backend") > /dev/null & P=$!
  if wait_port $proxy_port $P; then
    for test in $tests; do measure "$label" $P "$test"; done
  else
    echo "$label did not start" >&2
  fi
  kill $P; wait $P 2>/dev/null
}

mkdir -p "$dir"
[ -f "$dir/disk.img" ] || head -c 1G /dev/urandom > "$dir/disk.img"
cp "$dir/disk.img" "$dir/backend.img"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
nbdkit -f --exit-with-parent -p $backend_port -i 127.0.0.1 file "$dir/backend.img" & B=$!
trap 'kill $B 2>/dev/null; rm -f "$dir/backend.img"' EXIT
wait_port $backend_port $B || { echo "the backend did not start" >&2; exit 1; }
upstream=nbd://127.0.0.1:$backend_port/
for round in $(seq "${ROUNDS:-3}"); do
  nbdkit -f --exit-with-parent -p $proxy_port -i 127.0.0.1 nbd uri=$upstream & P=$!
  if wait_port $proxy_port $P; then
    for test in $tests; do measure nbdkit-nbd-plugin $P "$test"; done
  fi
  kill $P; wait $P 2>/dev/null
  for backend in ${BACKENDS:-anyio threads}; do
    run_ours "nbdproto-serve-nbd-$backend" "$python" "$backend"
    [ -n "$baseline" ] && run_ours "nbdproto-serve-nbd-$backend-before" "$baseline" "$backend"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
