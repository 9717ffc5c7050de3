#!/bin/bash
# Each worker on its own host: two network namespaces on a bridge (10.78.0.0/24), a worker in each, the
# coordinator in the root namespace running no layers. The golden prompts give the single-node tokens and
# logprobs; cutting one host's link is detected by heartbeats (/health 503 naming the stage) and serving
# resumes when the link comes back.
source "$(dirname "$0")/server_env.bash"
[ "$(id -u)" -eq 0 ] || skip "needs root for network namespaces"
command -v ip >/dev/null || skip "iproute2 (ip) is not installed"
TAG=s$$
BR=br-$TAG
NS=("$TAG-a" "$TAG-b")
ADDR=(10.78.0.2 10.78.0.3)
WORKER_PIDS=()

net_cleanup() {
    local rc=$?
    for p in "${WORKER_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${WORKER_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    for n in "${NS[@]}"; do ip netns del "$n" 2>/dev/null; done
    ip link del "$BR" 2>/dev/null
    (exit $rc)
    e2e_cleanup
}
trap net_cleanup EXIT

ip netns add "${NS[0]}" 2>/dev/null || skip "cannot create network namespaces here"
ip netns add "${NS[1]}"
ip link add "$BR" type bridge
ip addr add 10.78.0.1/24 dev "$BR"
ip link set "$BR" up
for i in 0 1; do
    ip link add "v$TAG$i" type veth peer name eth0 netns "${NS[$i]}"
    ip link set "v$TAG$i" master "$BR" up
    ip -n "${NS[$i]}" addr add "${ADDR[$i]}/24" dev eth0
    ip -n "${NS[$i]}" link set eth0 up
    ip -n "${NS[$i]}" link set lo up
done
for i in 0 1; do
    ip netns exec "${NS[$i]}" timeout -s TERM 600 "$STRATA_BIN" worker --listen "${ADDR[$i]}:50051" --name "host$i" \
        --threads 1 >"$E2E_TMP/w$i.out" 2>"$E2E_TMP/w$i.log" &
    WORKER_PIDS+=($!)
done
for i in 0 1; do
    for _ in $(seq 1 100); do grep -q listening "$E2E_TMP/w$i.out" 2>/dev/null && break; sleep 0.1; done
    grep -q listening "$E2E_TMP/w$i.out" || { echo "FAIL: worker in ${NS[$i]} did not start"; cat "$E2E_TMP/w$i.log"; exit 1; }
done

start_server single -m "$DEFAULT_MODEL" --parallel 4
SINGLE=$SERVER_URL
start_server coord -m "$DEFAULT_MODEL" --parallel 4 --coordinator-only --worker "${ADDR[0]}:50051" \
    --worker "${ADDR[1]}:50051" --dead-ms 2000
COORD=$SERVER_URL
python3 tests/e2e/cluster_check.py status "$COORD" 2 8 || exit 1
python3 tests/e2e/cluster_check.py compare "$SINGLE" "$COORD" "$STRATA_FIXTURES/goldens/kjv-qwen3.goldens.json" q8 || exit 1

# cut the second host's link
t0=$(date +%s.%N)
ip link set "v${TAG}1" down
python3 tests/e2e/cluster_check.py wait_health "$COORD" 503 8 || exit 1
echo "ok: link cut detected after $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-4) s"
curl -s "$COORD/health" | grep -q "stage 1" || { echo "FAIL: /health does not name the stage"; exit 1; }
ip link set "v${TAG}1" up
python3 tests/e2e/cluster_check.py wait_health "$COORD" 200 30 || exit 1
python3 tests/e2e/cluster_check.py generate "$COORD" || exit 1
echo "PASS"
