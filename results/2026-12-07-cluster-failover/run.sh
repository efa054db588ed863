#!/usr/bin/env bash
# Failover: a manager of three stopped while about 1,000 calls are held, calls still arriving.
#
#   run.sh [ROUNDS]     (default 3)
#
# `loadgen setup --cluster-nodes 3`: a nats-server and three managers in the generator's
# process; calls arrive at 100/s for 25 s and each talks 10 s (so about 1,000 are up at
# once), 100 callers and 100 callees spread over the managers. 12 s in, the last manager is
# stopped (`--kill-node-at 12`): its clients fail over to the next manager and register
# there. Each round into round-N/: the summary's `cluster` object has `failover_s` (stop to
# every client connected again) and `killed_node_clients`; calls_ok / calls_failed and the
# media counts say whether the held calls kept their media and the new ones went through.
set -euo pipefail
rounds=${1:-3}
here=$(cd "$(dirname "$0")" && pwd)
lg=$(cd "$here/../.." && pwd)/target/release/loadgen
for r in $(seq "$rounds"); do
    "$lg" setup --cluster-nodes 3 --rate 100 --duration 25 --talk 10 --callers 100 --callees 100 \
        --kill-node-at 12 --out "$here/round-$r" >"$here/round-$r.txt" 2>"$here/round-$r.stderr" || true
    python3 - "$here/round-$r/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
c = s["cluster"]
print(sys.argv[1].split("/")[-2], {k: s.get(k) for k in ["calls", "calls_ok", "calls_failed", "failures", "packets_sent", "packets_delivered", "loss_ratio", "setup_p99_ms"]},
      {k: c.get(k) for k in ["killed_at_s", "killed_node_clients", "failover_s"]})
PY
done
