#!/bin/bash
# A proxy in front of nbdkit's file plugin: `nbdproto serve nbd://...` against nbdkit's nbd plugin proxying the
# same backend, alternating, ROUNDS rounds (default 3). fio (nbd engine) 4 KiB random reads at queue depth 16
# for RUNTIME seconds (default 5); one TSV line per run: label, IOPS, proxy CPU ms (user+sys), proxy CPU us per
# request (as ../shared/bench/measure.sh counts it: utime+stime of the proxy process and its threads).
# The backend serves /dev/shm/nb/disk.img read-only (it is never changed). Needs nbdkit and fio.
# BACKENDS picks our servers (default "anyio threads"; anyio runs on its default loop).
#   bash bench/bench_proxy.sh
set -u
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
runtime=${RUNTIME:-5}
backend_port=${PORT:-23161}
proxy_port=$((backend_port + 1))
hz=$(getconf CLK_TCK)

wait_port() {  # port pid: until the port listens (bounded: 15 s; ss, so that no probe connection is logged)
  for _ in $(seq 150); do
    ss -ltn "sport = :$1" | grep -q LISTEN && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
cpu_ms() { awk -v hz="$hz" '{print int(($14+$15)*1000/hz)}' /proc/$1/stat; }
measure() {  # label pid
  local c0 c1 iops
  c0=$(cpu_ms "$2")
  iops=$(fio --name=x --ioengine=nbd --uri=nbd://127.0.0.1:$proxy_port/ --size=1g --runtime="$runtime" --time_based \
    --output-format=terse --terse-version=3 --rw=randread --bs=4k --iodepth=16 2>/dev/null | awk -F';' 'NF>8{print $8}')
  c1=$(cpu_ms "$2")
  printf "%s\t%s\tIOPS\t%s\tcpu_ms\t%s\tus/req\n" "$1" "$iops" $((c1 - c0)) \
    "$(echo "scale=1; ($c1 - $c0) * 1000 / ($iops * $runtime)" | bc -l)"
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
nbdkit -f --exit-with-parent -r -p $backend_port -i 127.0.0.1 file /dev/shm/nb/disk.img & B=$!
trap 'kill $B 2>/dev/null' EXIT
wait_port $backend_port $B || { echo "the backend did not start" >&2; exit 1; }
upstream=nbd://127.0.0.1:$backend_port/
for round in $(seq "${ROUNDS:-3}"); do
  nbdkit -f --exit-with-parent -p $proxy_port -i 127.0.0.1 nbd uri=$upstream & P=$!
  wait_port $proxy_port $P && measure nbdkit-nbd-plugin $P
  kill $P; wait $P 2>/dev/null
  for backend in ${BACKENDS:-anyio threads}; do
    $python -m nbdproto serve $upstream --port $proxy_port --backend "$backend" > /dev/null & P=$!
    wait_port $proxy_port $P && measure "nbdproto-serve-nbd-$backend" $P
    kill $P; wait $P 2>/dev/null
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
