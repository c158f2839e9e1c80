#!/usr/bin/env bash
# Mutation testing of the modules that state the rules (the commands, the budgets, admission, the limits, the
# engine's handshake and transmission checks, the client's checks, the region lock, the serving logic, the
# state machine): mutmut 2 (pip install -e '.[mutation]') changes one thing at a time in a module (a
# comparison, a number, a boolean, an argument) and runs the tests that prove the module's rules; every mutant
# must make them fail, or be listed in bench/mutation-equivalent.txt with why no test can tell it apart.
#
#   bash bench/mutation.sh                    every module below
#   bash bench/mutation.sh budget state       some of them, by the names below
#
# mutmut writes each mutant into the source, so the run works on a copy of the checkout (tracked and new
# files) in $MUTATION_DIR (default /tmp/nbdproto-mutation-$USER); its cache stays there, and a second run
# tests again only the mutants not killed yet (MUTATION_FRESH=1 starts from nothing). mutmut runs through
# bench/mutmut_run.py, which fixes its cache look-up for a line repeated in a module (else never tested). The
# tests run in a warm process that forks per mutant (bench/mutation_runner.py), one module at a time, at nice
# 10: the machine is shared. The report (bench/mutation_report.py) goes to
# stdout and $MUTATION_DIR/report.md; the exit status is 1 if a mutant survived that is not listed.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$PWD
python=${PYTHON:-$checkout/.venv/bin/python}
work=${MUTATION_DIR:-/tmp/nbdproto-mutation-${USER:-$(id -un)}}

# name: the module, then the tests that state its rules (the first to fail ends a mutant's run: fast, precise
# files first).
declare -A modules=(
  [commands]="nbdproto/engine/_commands.py tests/test_command_table.py tests/test_command_rules.py tests/test_commands.py tests/test_client_rules.py tests/test_server.py tests/test_annotations.py"
  [budget]="nbdproto/serving/_budget.py tests/test_budget.py tests/test_dispatch.py tests/test_memory_fairness.py tests/test_annotations.py"
  [admission]="nbdproto/serving/_admission.py tests/test_admission.py tests/test_policy.py tests/test_annotations.py"
  [limits]="nbdproto/serving/_limits.py tests/test_limits.py tests/test_budget.py tests/test_annotations.py"
  [server_handshake]="nbdproto/engine/_server_handshake.py tests/test_server_option_rules.py tests/test_server.py tests/test_options.py tests/test_tls_rules.py tests/test_opt_mode.py tests/test_pair.py tests/test_state_machine.py tests/test_annotations.py"
  [server_requests]="nbdproto/engine/_server_requests.py tests/test_server_read_chunks.py tests/test_server_request_rules.py tests/test_server_write_paths.py tests/test_next_requests.py tests/test_command_rules.py tests/test_server.py tests/test_commands.py tests/test_pair.py tests/test_streamed_writes.py tests/test_state_machine.py tests/test_annotations.py"
  [server_replies]="nbdproto/engine/_server_replies.py tests/test_server_read_chunks.py tests/test_server_request_rules.py tests/test_server_write_paths.py tests/test_command_rules.py tests/test_server.py tests/test_commands.py tests/test_pair.py tests/test_streamed_writes.py tests/test_state_machine.py tests/test_annotations.py"
  [client_checks]="nbdproto/engine/_client_checks.py tests/test_client_check_rules.py tests/test_client_checks.py tests/test_client_rules.py tests/test_pair.py tests/test_annotations.py"
  [client_requests]="nbdproto/engine/_client_requests.py tests/test_client_request_rules.py tests/test_client_rules.py tests/test_client_checks.py tests/test_pair.py tests/test_strict_mode.py tests/test_annotations.py"
  [client_replies]="nbdproto/engine/_client_replies.py tests/test_client_reply_rules.py tests/test_client_whole_replies.py tests/test_client_checks.py tests/test_client_rules.py tests/test_pair.py tests/test_strict_mode.py tests/test_annotations.py"
  [regionlock]="nbdproto/devices/_regions.py tests/test_regionlock.py tests/test_filters.py tests/test_mirror.py tests/test_annotations.py"
  [session_transmission]="nbdproto/serving/_session_transmission.py tests/test_session_logic.py tests/test_session_carry_out.py tests/test_pipelined_batch.py tests/test_backend_rules.py tests/test_streamed_writes.py tests/test_receive_size.py tests/test_server_concurrency.py tests/test_writes_in_place.py tests/test_memory_fairness.py tests/test_annotations.py"
  [state]="nbdproto/engine/_state.py tests/test_state_machine.py tests/test_pair.py tests/test_server.py tests/test_annotations.py"
)
order=(commands budget admission limits server_handshake server_requests server_replies client_checks client_requests
  client_replies regionlock session_transmission state)
chosen=("$@")
((${#chosen[@]})) || chosen=("${order[@]}")
for name in "${chosen[@]}"; do
  [[ -n ${modules[$name]:-} ]] || { echo "unknown module $name (known: ${order[*]})" >&2; exit 2; }
done
"$python" -c "import mutmut" 2>/dev/null || { echo "mutmut is missing: pip install -e '.[mutation]'" >&2; exit 2; }

# A fresh copy of the checkout, keeping mutmut's cache unless told not to.
mkdir -p "$work"
[[ ${MUTATION_FRESH:-} != 1 ]] || rm -f "$work/.mutmut-cache"
find "$work" -mindepth 1 -maxdepth 1 ! -name .mutmut-cache -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -C "$work" -xf -

socket=$work/runner.sock
server=""
stop_server() {
  if [[ -n $server ]]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
  fi
}
trap stop_server EXIT

tested=()
for name in "${chosen[@]}"; do
  read -r module tests <<<"${modules[$name]}"
  echo "== $name: $module against $tests"
  started=$SECONDS
  # The warm test process, ready once it says so on its first line.
  exec {ready}< <(cd "$work" && exec nice -n 10 "$python" "$checkout/bench/mutation_runner.py" serve "$socket" \
    "$module" -- -x -q $tests 2>"$work/runner-$name.log")
  server=$!
  if ! read -r -t 900 -u "$ready" line || [[ $line != ready* ]]; then
    echo "the test process for $name did not start:" >&2
    cat "$work/runner-$name.log" >&2
    exit 1
  fi
  status=0
  (cd "$work" && nice -n 10 "$python" "$checkout/bench/mutmut_run.py" run --paths-to-mutate "$module" --tests-dir tests --no-progress \
    --simple-output --runner "$python $checkout/bench/mutation_runner.py run $socket") >"$work/mutmut-$name.log" 2>&1 ||
    status=$?
  stop_server
  exec {ready}<&-
  # mutmut's status is a sum of bits: 1 is a fatal error; 2, 4 and 8 are survivors, timeouts, slow mutants.
  if ((status & 1)); then
    echo "mutmut failed on $name:" >&2
    tail -n 30 "$work/mutmut-$name.log" >&2
    exit 1
  fi
  echo "   $((SECONDS - started)) s"
  tested+=("$module")
done
"$python" bench/mutation_report.py "$work" bench/mutation-equivalent.txt "${tested[@]}" | tee "$work/report.md"
