#!/bin/bash
# `nbdproto serve --workers N` against the single process (and nbdkit's file plugin, for scale): nbdcopy reads of
# a 1 GiB tmpfs file to null:, alternating, ROUNDS rounds (each server started afresh, COPIES copies of each
# client kind each). The clients: `nbdcopy --connections=4`, which nbdcopy 1.14 caps at one connection per
# thread (its --threads defaults to the cores: 2 connections on 2 cores), and `--connections=4 --threads=4`,
# which really opens 4. One TSV line per copy: round, server, client, MiB/s, the server's CPU in ms (user+system
# of every process: the supervisor and each worker, read from /proc as measure.sh does), the client's CPU in ms,
# the CPU left idle in ms (all cores), and the 1-minute load average before the copy. Then the median of each
# server and client, and its ratio to the single process of its backend with the same client.
#   bash bench/bench_workers.sh                     # threads and anyio, 1 and 2 workers, and nbdkit
#   ROUNDS=5 WORKERS="1 2 4" BACKENDS=threads bash bench/bench_workers.sh
# Needs nbdkit and libnbd-bin (nbdcopy); the file is made (1 GiB of random data) at DISK if missing.
set -u
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
disk=${DISK:-/dev/shm/nbw/disk.img}
rounds=${ROUNDS:-3} copies=${COPIES:-3}
port=${PORT:-$((20000 + RANDOM % 40000))}
hz=$(getconf CLK_TCK)
[[ -f $disk ]] || { mkdir -p "$(dirname "$disk")" && head -c 1G /dev/urandom >"$disk"; }
size=$(stat -c %s "$disk")
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT

tree_ticks() {  # CPU ticks of process $1 and its children (user, system, and their reaped children's)
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1"); do
    [[ -r /proc/$pid/stat ]] && total=$((total + $(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12+$13+$14+$15}')))
  done
  echo "$total"
}
idle_ticks() { awk '/^cpu /{print $5+$6}' /proc/stat; }

start() {  # label: start that server on $port, wait until it serves; sets S (its pid)
  local label=$1 backend=${1%%-*} workers=${1##*-w}
  rm -f "$run/pid"
  if [[ $label == nbdkit ]]; then
    nbdkit -f --exit-with-parent -p "$port" -i 127.0.0.1 -P "$run/pid" file "$disk" & S=$!
  else
    $python -m nbdproto serve "$disk" --port "$port" --backend "$backend" --workers "$workers" \
      --pid-file "$run/pid" >/dev/null & S=$!
  fi
  for _ in $(seq 200); do [[ -s $run/pid ]] && return; sleep 0.05; done
  echo "$label did not start" >&2
}

servers=(nbdkit)
for backend in ${BACKENDS:-threads anyio}; do
  for workers in ${WORKERS:-1 2}; do servers+=("$backend-w$workers"); done
done
clients=("--connections=4" "--connections=4 --threads=4")
echo -e "round\tserver\tclient\tMiB/s\tserver_cpu_ms\tclient_cpu_ms\tidle_cpu_ms\tload1"
for round in $(seq "$rounds"); do
  # Alternate the order from round to round, so no server always follows the same one.
  order=("${servers[@]}")
  ((round % 2 == 0)) && order=($(printf '%s\n' "${servers[@]}" | tac))
  for label in "${order[@]}"; do
    start "$label"
    for client in "${clients[@]}"; do
      for _ in $(seq "$copies"); do
        load=$(cut -d' ' -f1 /proc/loadavg)
        c0=$(tree_ticks "$S") i0=$(idle_ticks) t0=$(date +%s.%N)
        # shellcheck disable=SC2086
        /usr/bin/time -f "%U %S" -o "$run/time" nbdcopy $client "nbd://127.0.0.1:$port/" null: \
          || echo "FAILED: $label" >&2
        t1=$(date +%s.%N) c1=$(tree_ticks "$S") i1=$(idle_ticks)
        used=$(awk '{printf "%d", ($1 + $2) * 1000}' "$run/time")
        mibs=$(echo "scale=0; $size / 1048576 / ($t1 - $t0)" | bc -l)
        echo -e "$round\t$label\t$client\t$mibs\t$(((c1 - c0) * 1000 / hz))\t$used\t$(((i1 - i0) * 1000 / hz))\t$load"
      done
    done
    kill "$S"; wait "$S" 2>/dev/null
  done
done | tee "$run/lines"
echo
echo -e "server\tclient\tmedian MiB/s\tmedian server_cpu_ms\tratio to one process"
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
column() {  # server, client, column number: that column of their lines
  awk -F'\t' -v l="$1" -v c="$2" -v n="$3" '$2 == l && $3 == c {print $n}' "$run/lines"
}
for client in "${clients[@]}"; do
  for label in "${servers[@]}"; do
    mibs=$(column "$label" "$client" 4 | median)
    cpu=$(column "$label" "$client" 5 | median)
    base=$(column "${label%-w*}-w1" "$client" 4 | median)
    ratio=$([[ $label != nbdkit && -n $base ]] && echo "scale=2; $mibs / $base" | bc -l || echo -)
    echo -e "$label\t$client\t$mibs\t$cpu\t$ratio"
  done
done
