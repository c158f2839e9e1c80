#!/bin/bash
# Our servers against nbdkit's file plugin on the same kind of 1 GiB tmpfs file, alternating, ROUNDS rounds:
# nbdcopy and fio (nbd engine) figures from ../shared/bench/measure.sh, one TSV line each (label, test, unit,
# value, server CPU ms). Needs nbdkit, libnbd-bin, fio, and /dev/shm/nb/{disk,ours,src}.img (1 GiB of random data
# each: mkdir -p /dev/shm/nb; for f in disk ours src; do head -c 1G /dev/urandom > /dev/shm/nb/$f.img; done).
# BACKENDS chooses what is measured (default: threads, and anyio on asyncio, uvloop (when installed) and trio).
#   bash bench/bench_servers.sh
set -u
cd "$(dirname "$0")/.."
measure=${MEASURE:-../shared/bench/measure.sh}
python=${PYTHON:-.venv/bin/python}
export RUNTIME=${RUNTIME:-5}
for round in $(seq "${ROUNDS:-1}"); do
  nbdkit -f --exit-with-parent -p 10951 -i 127.0.0.1 file /dev/shm/nb/disk.img & K=$!; sleep 1
  bash "$measure" nbd://127.0.0.1:10951/ nbdkit-file $K
  kill $K; wait $K 2>/dev/null
  default="threads anyio anyio:trio"
  $python -c "import uvloop" 2>/dev/null && default="threads anyio anyio:uvloop anyio:trio"
  for backend in ${BACKENDS:-$default}; do
    loop=asyncio
    [[ $backend == *:* ]] && loop=${backend#*:} && backend=${backend%%:*}
    $python -m nbdproto serve /dev/shm/nb/ours.img --port 10952 --backend "$backend" --loop "$loop" & P=$!
    sleep 1.5
    bash "$measure" nbd://127.0.0.1:10952/ "nbdproto-$backend-$loop" $P
    kill $P; wait $P 2>/dev/null
  done
done
