#!/bin/bash
# nbdproto copy against nbdcopy: a 1 GiB export of nbdkit's file plugin to null: and to a tmpfs file,
# alternating, best of 3 each. Needs nbdkit and libnbd-bin, and /dev/shm/nb/src.img (1 GiB of non-zero data:
# head -c 1G /dev/urandom > /dev/shm/nb/src.img).   bash bench/bench_copy.sh
set -eu
img=/dev/shm/nb/src.img
port=10990
nbdkit -f --exit-with-parent -p $port -i 127.0.0.1 file "$img" & K=$!
trap 'kill $K 2>/dev/null' EXIT
sleep 1
uri=nbd://127.0.0.1:$port/
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc -l; }
best() { local b=999; for _ in 1 2 3; do v=$(t "$@"); b=$(echo "if ($v < $b) $v else $b" | bc -l); done; echo "$b"; }
for dst in null: /dev/shm/nb/copy.img; do
  rm -f /dev/shm/nb/copy.img
  a=$(best nbdcopy "$uri" "$dst")
  rm -f /dev/shm/nb/copy.img
  b=$(best python -m nbdproto_anyio copy --no-progress "$uri" "$dst")
  printf "%s\tnbdcopy %.2fs\tnbdproto copy %.2fs\tratio %.2f\n" "$dst" "$a" "$b" "$(echo "$b / $a" | bc -l)"
done
rm -f /dev/shm/nb/copy.img
