#!/usr/bin/env bash
# The README's main command runs this after building: the evio demo.
set -euo pipefail
cd "$(dirname "$0")/.."
exec ./target/release/evioctl demo "$@"
