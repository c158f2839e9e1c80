#!/bin/bash
# nbdproto copy against nbdcopy: a 1 GiB export of nbdkit's file plugin to null: and to a tmpfs file,
# alternating, best of 5 each. Needs nbdkit and libnbd-bin, and /dev/shm/nb/src.img (1 GiB of non-zero data:
# mkdir -p /dev/shm/nb && head -c 1G /dev/urandom > /dev/shm/nb/src.img).
# Run from the repository after .ci/run (or any venv with nbdproto installed):   bash bench/bench_copy.sh
# NBDPROTO picks the command (default: .venv/bin/nbdproto; a pyenv shim in front of it adds ~60 ms).
set -eu
# Start-up is part of a copy's time: compile our modules' bytecode now, as a wheel install does, so that an
# editable install in an environment with PYTHONDONTWRITEBYTECODE=1 does not compile them on every run (~15 ms).
"$(dirname "$(readlink -f "${NBDPROTO:-.venv/bin/nbdproto}")")/python" -m compileall -q nbdproto nbdproto_anyio nbdproto_threads
img=/dev/shm/nb/src.img
port=10990
nbdproto=${NBDPROTO:-.venv/bin/nbdproto}
rounds=${ROUNDS:-5}
nbdkit -f --exit-with-parent -p $port -i 127.0.0.1 file "$img" & K=$!
trap 'kill $K 2>/dev/null' EXIT
sleep 1
uri=nbd://127.0.0.1:$port/
t() {  # the seconds a command takes; a failed command ends the benchmark (a failure must not look fast)
  local s e; s=$(date +%s.%N)
  "$@" >/dev/null 2>/tmp/bench_copy.err || { echo "FAILED: $* ($(cat /tmp/bench_copy.err))" >&2; kill $$; }
  e=$(date +%s.%N); echo "$e - $s" | bc -l
}
same() { [[ $1 == null: ]] || cmp -s "$img" "$1" || { echo "FAILED: $1 differs from $img" >&2; exit 1; }; }
for dst in null: /dev/shm/nb/copy.img; do
  a=999 b=999
  for _ in $(seq "$rounds"); do
    rm -f /dev/shm/nb/copy.img
    v=$(t nbdcopy "$uri" "$dst"); a=$(echo "if ($v < $a) $v else $a" | bc -l); same "$dst"
    rm -f /dev/shm/nb/copy.img
    v=$(t "$nbdproto" copy --no-progress "$uri" "$dst"); b=$(echo "if ($v < $b) $v else $b" | bc -l); same "$dst"
  done
  printf "%s\tnbdcopy %.3fs\tnbdproto copy %.3fs\tratio %.2f\n" "$dst" "$a" "$b" "$(echo "$b / $a" | bc -l)"
done
rm -f /dev/shm/nb/copy.img
