#!/usr/bin/env bash
# Runs the paysync benchmark end to end and draws its charts:
#   bench/run.sh            # every scenario (about 15 minutes on 2 cores)
#   bench/run.sh --quick    # a tenth of the requests
#   bench/run.sh --only latency-50ms,cpu-0ms
# Needs Java 17 and Maven (the benchmark starts Apache Kafka with
# tests/kafka/broker.sh) and Python 3 (matplotlib is installed into bench/.venv). Results: bench/results/{results.md,results.json,*.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo bench --bench pipeline -- "$@"
if [ ! -x bench/.venv/bin/python ]; then
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install --quiet matplotlib
fi
bench/.venv/bin/python bench/plot.py bench/results
