#!/usr/bin/env bash
# CPU A/B of this checkout against another commit, and against the Python
# processor (bench/python_processor), in one benchmark run:
#   bench/ab.sh BASE_REF [ROUNDS] [BENCH ARGS...]   # e.g. bench/ab.sh origin/main 7
# Builds BASE_REF's paysync in a temporary worktree (sharing target/, so only
# paysync itself is rebuilt), installs the Python processor's requirements into
# bench/python_processor/.venv, and runs the 0 ms scenario (50,000 requests, 256
# in flight) for each side, alternating, ROUNDS times (default 5).
# Results: bench/results/ab.md and ab.json.
# BENCH ARGS change the load and skip the Python processor (it holds batches of
# 1,000, not a number in flight), e.g. the 50 ms run:
#   bench/ab.sh perf-base 3 --latency-ms 50 --in-flight 500 --requests 40000 \
#     --out bench/results/ab-50ms
set -euo pipefail
cd "$(dirname "$0")/.."
base_ref=${1:?usage: bench/ab.sh BASE_REF [ROUNDS]}
rounds=${2:-5}
shift $(( $# < 2 ? $# : 2 ))
export PATH="$HOME/.cargo/bin:$PATH"
work=$(mktemp -d)
trap 'git worktree remove --force "$work/base" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add --detach "$work/base" "$base_ref" >/dev/null
root=$PWD
(cd "$work/base" && CARGO_TARGET_DIR="$root/target" cargo build --release --bin paysync)
cp target/release/paysync "$work/paysync-base"
cargo build --release --bin paysync
if [ ! -x bench/python_processor/.venv/bin/python ]; then
  python3 -m venv bench/python_processor/.venv
  bench/python_processor/.venv/bin/pip install --quiet -r bench/python_processor/requirements.txt
fi
python=(--ab python=python)
if [ $# -gt 0 ]; then python=(); fi
cargo bench --bench pipeline -- \
  --ab "base=$work/paysync-base" \
  --ab head=self \
  --ab "head-h2c=self:PAYSYNC_CONNECTORS__CM__HTTP2=prior_knowledge" \
  "${python[@]}" \
  --rounds "$rounds" "$@"
