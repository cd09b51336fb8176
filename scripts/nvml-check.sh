#!/usr/bin/env bash
# vramgate's NVML probe on a real NVIDIA GPU, end to end: starts the given release binary with
# probe = "nvml" in a temp dir of its own (own home, XDG and state dirs, an ephemeral loopback
# port), allocates GPU memory from a child process (PyTorch, else a tiny CUDA program built with
# nvcc), and checks that GET /vramgate/status attributes it to the child's pid within one sample
# interval and sees it released; prints the timings. Never run in CI (no GPU there).
#
#   scripts/nvml-check.sh [BINARY] [--mib N] [--device I] [--interval 500ms] [--library PATH] ...
#   scripts/nvml-check.sh --help
#
# BINARY defaults to target/release/vramgate (cargo build --release). Exit 0: ok; 1: a step
# failed (the message says which); 77: skipped (no PyTorch and no nvcc, or no python3).
# The work is done by nvml_check.py beside this script (standard library only).
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
if ! command -v python3 >/dev/null 2>&1; then
    echo "skipped: the check needs python3" >&2
    exit 77
fi
exec python3 "$here/nvml_check.py" "$@"
