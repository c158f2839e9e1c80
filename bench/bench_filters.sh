#!/bin/bash
# What a filter costs: fio (nbd engine) 4k random reads at queue depth 16 against `nbdproto serve` of a 1 GiB tmpfs
# file, without a filter and with each of FILTERS, alternating within each of ROUNDS rounds (in a rotating order) so
# that every ratio compares runs made side by side. One TSV line per run (round, backend, filter, IOPS, server CPU
# ms), then the ratios of each filter's IOPS and server CPU per request to the unfiltered run of the same round and
# backend, and their medians. On a busy machine fio's figures swing by tens of percent between runs; the CPU per
# request measured in one process, bench/bench_filters.py, is steadier.
# The file is served read-only (it is only read), so the shared /dev/shm/nb images are never changed.
#   bash bench/bench_filters.sh                     # delay at zero (a pass-through) and stats, both backends
#   FILTERS="delay readonly error:rate=0" ROUNDS=5 BACKENDS=anyio bash bench/bench_filters.sh
set -u
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
image=${IMAGE:-/dev/shm/nb/ours.img}
runtime=${RUNTIME:-5}
port=${PORT:-$((20000 + RANDOM % 40000))}
hz=$(getconf CLK_TCK)
cpu() { awk -v hz="$hz" '{print int(($14+$15+$16+$17)*1000/hz)}' "/proc/$1/stat"; }
results=$(mktemp)
trap 'rm -f "$results"' EXIT

serve_and_measure() {  # round backend filter
  local round=$1 backend=$2 filter=$3 out pid c0 c1 iops
  local args=(serve "$image" --read-only --port "$port" --backend "$backend")
  [[ $filter != none ]] && args+=(--filter "$filter")
  out=$(mktemp)
  $python -m nbdproto "${args[@]}" >"$out" 2>&1 & pid=$!
  for _ in $(seq 100); do grep -q serving "$out" && break; sleep 0.1; done
  if ! grep -q serving "$out"; then echo "server did not start: $(cat "$out")" >&2; kill $pid; return 1; fi
  c0=$(cpu $pid)
  iops=$(fio --name=x --ioengine=nbd --uri="nbd://127.0.0.1:$port/" --size=1g --runtime="$runtime" --time_based \
    --rw=randread --bs=4k --iodepth=16 --output-format=terse --terse-version=3 2>/dev/null | awk -F';' 'NF>8{print $8}')
  c1=$(cpu $pid)
  kill $pid; wait $pid 2>/dev/null; rm -f "$out"
  echo -e "$round\t$backend\t$filter\t$iops\t$((c1 - c0))" | tee -a "$results"
}

echo -e "round\tbackend\tfilter\tIOPS\tserver_cpu_ms"
variants=(none ${FILTERS:-delay stats})
for round in $(seq "${ROUNDS:-3}"); do
  for backend in ${BACKENDS:-anyio threads}; do
    for i in "${!variants[@]}"; do  # each round starts with the next variant: none is not always first
      serve_and_measure "$round" "$backend" "${variants[$(( (i + round) % ${#variants[@]} ))]}"
    done
  done
done

echo
echo -e "backend\tfilter\tIOPS ratio to none, per round\tmedian\tserver CPU per request ratio, per round\tmedian"
$python - "$results" <<'EOF'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
rows = [r for r in rows if r[3] and float(r[3]) > 0]
iops = {(r[0], r[1], r[2]): float(r[3]) for r in rows}
cpu = {(r[0], r[1], r[2]): float(r[4]) / float(r[3]) for r in rows}  # per request: the runtime cancels out
out = {}
for rnd, backend, name in iops:
    if name != "none" and (rnd, backend, "none") in iops:
        ratios, cpus = out.setdefault((backend, name), ([], []))
        ratios.append(iops[rnd, backend, name] / iops[rnd, backend, "none"])
        cpus.append(cpu[rnd, backend, name] / cpu[rnd, backend, "none"])
for (backend, name), (ratios, cpus) in out.items():
    print(f"{backend}\t{name}\t{' '.join(f'{v:.3f}' for v in ratios)}\t{statistics.median(ratios):.3f}"
          f"\t{' '.join(f'{v:.3f}' for v in cpus)}\t{statistics.median(cpus):.3f}")
EOF
