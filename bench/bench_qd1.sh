#!/bin/bash
# One request at a time (fio, 4 KiB random reads, queue depth 1): nbdkit's file plugin, the plain Python floor
# (bench/plain_server.py), and our threads server without and with --busy-poll, alternating, ROUNDS rounds.
# Each line: label, IOPS, server CPU microseconds per request. Every server first serves a second of the same
# reads unmeasured: our servers answer reads with views of the file's mapping, whose pages a fresh process
# faults in the first time it sends them (3-5 us of CPU a request in a first 2 s run on a 1 GiB tmpfs image),
# which a server that has run a while has done. Needs nbdkit, fio, and /dev/shm/nb/disk.img
# (1 GiB: mkdir -p /dev/shm/nb && head -c 1G /dev/urandom > /dev/shm/nb/disk.img).
#   bash bench/bench_qd1.sh            POLLS="50 200" ROUNDS=3 RUNTIME=5 bash bench/bench_qd1.sh
set -u
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
img=/dev/shm/nb/disk.img
runtime=${RUNTIME:-5}
port=10971
hz=$(getconf CLK_TCK)
cpu() { awk -v hz=$hz '{print ($14+$15+$16+$17)*1000000/hz}' /proc/$1/stat; }
fio_qd1() {  # seconds
  fio --name=x --ioengine=nbd --uri=nbd://127.0.0.1:$port/ --size=1g --runtime=$1 --time_based \
    --rw=randread --bs=4k --iodepth=1 --output-format=terse --terse-version=3 2>/dev/null
}
measure() {  # label pid
  local c0 c1 iops
  fio_qd1 1 >/dev/null  # warm up (see above)
  c0=$(cpu $2)
  iops=$(fio_qd1 "$runtime" | awk -F';' 'NF>8{print $8}')
  c1=$(cpu $2)
  printf "%s\t%s IOPS\t%.1f us CPU/request\n" "$1" "$iops" "$(echo "($c1 - $c0) / ($iops * $runtime)" | bc -l)"
}
ready() { for _ in $(seq 100); do nbdinfo --size nbd://127.0.0.1:$port/ >/dev/null 2>&1 && return; sleep 0.1; done; }
for round in $(seq "${ROUNDS:-1}"); do
  nbdkit -f --exit-with-parent -p $port -i 127.0.0.1 file "$img" & P=$!; ready; measure nbdkit-file $P; kill $P; wait $P 2>/dev/null
  $python bench/plain_server.py "$img" $port & P=$!; ready; measure plain-python $P; kill $P; wait $P 2>/dev/null
  for poll in 0 ${POLLS:-50 200}; do
    $python -m nbdproto serve "$img" --read-only --port $port --backend threads --busy-poll "$poll" >/dev/null & P=$!
    ready; measure "nbdproto-threads-poll-${poll}us" $P; kill $P; wait $P 2>/dev/null
  done
done
