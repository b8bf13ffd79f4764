#!/usr/bin/env bash
# The README's main command runs this after building: the evio demo (`make demo`).
# Arguments are passed on to `evio-demo`; with make, use DEMO_ARGS, e.g.
#   make demo DEMO_ARGS="--nodes 4 --symmetric-nat 2 --check"
set -euo pipefail
cd "$(dirname "$0")/.."
bin=./target/release/evio-demo
if [ ! -x "$bin" ]; then
  echo "demo: $bin is missing; build it first: cargo build --release --workspace --bins" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "demo: the demo creates network namespaces; run it as root (sudo make demo)" >&2
  exit 1
fi
# shellcheck disable=SC2086 # DEMO_ARGS is a list of words on purpose
exec "$bin" "$@" ${DEMO_ARGS:-}
