#!/usr/bin/env bash
# Runs the compatibility suite: the real openai and ollama libraries (pinned in requirements.txt)
# against vramgate fronting real llama-servers. Builds llama-server on the first run
# (.ci/llama-server.sh caches it outside the checkout), installs the pinned libraries into a
# throwaway venv, and runs pytest on target/debug/vramgate (build it first: `cargo build`), or on
# $VRAMGATE_BIN. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."

llama_server=${LLAMA_SERVER:-$(.ci/llama-server.sh | tail -n 1)}
python=${PYTHON:-python3}
py_env=$(mktemp -d)
trap 'rm -rf "$py_env"' EXIT
"$python" -m venv "$py_env/venv" ||
  { echo "run.sh: $python cannot make a virtual environment: install python3-venv" >&2; exit 1; }
"$py_env/venv/bin/python" -m pip install --quiet --disable-pip-version-check -r clients/compat/requirements.txt
LLAMA_SERVER="$llama_server" VRAMGATE_BIN="${VRAMGATE_BIN:-$PWD/target/debug/vramgate}" \
  "$py_env/venv/bin/python" -m pytest clients/compat -q -rs -p no:cacheprovider "$@"
