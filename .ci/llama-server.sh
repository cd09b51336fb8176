#!/usr/bin/env bash
# Builds llama.cpp's llama-server for the CPU from source, once, and prints its path as the last
# line of stdout. The compatibility suite (clients/compat) runs vramgate in front of it.
#
# The sources come from the PyPI sdist of llama-cpp-python, which vendors llama.cpp at a known
# commit: a package registry is reachable from CI where GitHub may not be, and the version pin
# below fixes the llama.cpp revision. The binary is cached OUTSIDE the checkout, keyed by that
# version, so a later run (or another worktree) reuses it at once:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/vramgate-ci/llama-server-<version>/llama-server
# Set VRAMGATE_CI_CACHE to put the cache elsewhere. Progress goes to stderr; stdout carries only
# the path, so `bin=$(.ci/llama-server.sh)` works.
set -euo pipefail

# Raising this rebuilds: the cache directory is named after it.
llama_cpp_python_version=0.3.36
# scikit-build-core must be importable for pip to prepare the sdist's metadata (its build backend).
scikit_build_core_version=0.11.6

cache_root=${VRAMGATE_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vramgate-ci}
cache_dir="$cache_root/llama-server-$llama_cpp_python_version"
binary="$cache_dir/llama-server"

log() { echo "llama-server.sh: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

if [ -x "$binary" ]; then
  log "cached: $binary"
  echo "$binary"
  exit 0
fi

can_apt() { [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; }
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq >&2 || return 1
    apt_updated=yes
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# The tools: a C/C++ compiler, make, cmake, and a Python with venv and pip.
missing=()
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
if [ ${#missing[@]} -gt 0 ]; then
  if can_apt; then
    log "installing ${missing[*]} with apt-get"
    apt_install "${missing[@]}" || die "apt-get could not install ${missing[*]}"
  else
    die "missing ${missing[*]}: install them (e.g. \`sudo apt-get install ${missing[*]}\`) and rerun"
  fi
fi
python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || die "missing $python: install it (e.g. \`sudo apt-get install python3 python3-venv\`)"

# Everything is built in a scratch directory, and the binary is moved into place only when the
# build succeeded, so an interrupted run never leaves a half-built cache entry behind.
mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "downloading llama-cpp-python $llama_cpp_python_version (sdist) into $work"
if "$python" -m venv "$work/venv" >/dev/null 2>&1 && "$work/venv/bin/python" -m pip --version >/dev/null 2>&1; then
  py="$work/venv/bin/python"
else
  die "$python cannot make a virtual environment with pip: install python3-venv (e.g. \`sudo apt-get install python3-venv\`)"
fi
"$py" -m pip install --quiet --disable-pip-version-check "scikit-build-core==$scikit_build_core_version" >&2
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
  --no-build-isolation --dest "$work/sdist" "llama-cpp-python==$llama_cpp_python_version" >&2
sdist=$(find "$work/sdist" -maxdepth 1 -name 'llama_cpp_python-*.tar.gz' | head -n 1)
[ -n "$sdist" ] || die "pip downloaded no llama_cpp_python sdist into $work/sdist"
tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_python-$llama_cpp_python_version/vendor/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || die "the sdist has no vendored llama.cpp at $src"

jobs=$(nproc 2>/dev/null || echo 2)
log "building llama-server with $jobs jobs (9 to 20 minutes on 2 cores)"
started=$(date +%s)
# CPU only, no curl/OpenSSL (no downloads at run time), no web UI (the UI flags stop a download at
# build time), static libraries so the one binary can be cached and moved on its own.
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$work/build" --config Release --target llama-server -j "$jobs" >&2
built="$work/build/bin/llama-server"
[ -x "$built" ] || die "the build finished without $built"
"$built" --version >&2 2>&1 || die "the built llama-server does not run: $built --version failed"
log "built in $(($(date +%s) - started)) s"

mkdir -p "$cache_dir"
# Same file system as the cache: mv is atomic, so two runs racing both end with a whole binary.
mv "$built" "$cache_dir/llama-server.tmp.$$"
mv "$cache_dir/llama-server.tmp.$$" "$binary"
log "cached: $binary"
echo "$binary"
