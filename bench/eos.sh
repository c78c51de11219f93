#!/usr/bin/env bash
# What exactly once costs, in one invocation per load on Apache Kafka (started by
# the benchmark: tests/kafka/broker.sh): at_least_once against exactly_once,
# alternating, ROUNDS rounds each (default 5): throughput and CPU per request of a
# backlog, then end-to-end latency of a paced run.
#   bench/eos.sh [ROUNDS]
# Results: bench/results/eos-0ms/ and bench/results/eos-50ms/ (ab.md, ab.json).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
variants=(--ab at_least_once=self --ab "exactly_once=self:PAYSYNC_PROCESSING__GUARANTEE=exactly_once")
cargo bench --bench pipeline -- "${variants[@]}" --rounds "$rounds" \
  --requests 50000 --paced 1000 --out bench/results/eos-0ms
cargo bench --bench pipeline -- "${variants[@]}" --rounds "$rounds" \
  --latency-ms 50 --in-flight 500 --requests 40000 --paced 1000 --out bench/results/eos-50ms
