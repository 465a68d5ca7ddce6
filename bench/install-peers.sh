#!/usr/bin/env bash
# Installs the servers Tidepool is compared with, from their registries, outside the repository
# (never committed): llama.cpp's server through PyPI's llama-cpp-python[server], built from its
# sdist with llama.cpp's default CPU flags (GGML_NATIVE=ON: the build machine's vector units), and
# mistral.rs's own server from crates.io (mistralrs-cli, the same version Tidepool links), built
# with the same target-cpu as Tidepool (.cargo/config.toml: x86-64-v3).
#
#   bench/install-peers.sh               # both
#   bench/install-peers.sh llamacpp      # one of: llamacpp mistralrs
#
# Where they go: $TIDEPOOL_PEERS (default ~/.cache/tidepool-bench): venv/ for llama-cpp-python,
# mistralrs/bin/mistralrs for mistral.rs. Re-running skips what is installed already.
set -euo pipefail
cd "$(dirname "$0")/.."
peers="${TIDEPOOL_PEERS:-$HOME/.cache/tidepool-bench}"
mkdir -p "$peers"
want="${1:-all}"

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
# The mistral.rs version Tidepool links, read from Cargo.lock so the two never drift apart.
MISTRALRS_VERSION=$(awk '/^name = "mistralrs-core"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)

if [ "$want" = all ] || [ "$want" = llamacpp ]; then
  if [ -x "$peers/venv/bin/python" ] && "$peers/venv/bin/python" -c "import llama_cpp.server" 2> /dev/null; then
    echo "==> llama-cpp-python: installed ($("$peers/venv/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)'))"
  else
    echo "==> llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION (builds llama.cpp from source: several minutes)"
    python3 -m venv "$peers/venv"
    "$peers/venv/bin/pip" install --quiet --upgrade pip
    # Build from source with llama.cpp's defaults for a CPU build; -DGGML_NATIVE=ON is the default
    # and compiles for this machine's vector units (AVX2/FMA/F16C here).
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_BLAS=OFF}" \
      "$peers/venv/bin/pip" install --no-binary llama-cpp-python --verbose \
      "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION" > "$peers/llama-cpp-python-build.log" 2>&1 \
      || { tail -40 "$peers/llama-cpp-python-build.log" >&2; exit 1; }
    "$peers/venv/bin/python" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "installed")'
  fi
fi

if [ "$want" = all ] || [ "$want" = mistralrs ]; then
  if [ -x "$peers/mistralrs/bin/mistralrs" ]; then
    echo "==> mistralrs-cli: installed ($("$peers/mistralrs/bin/mistralrs" --version 2> /dev/null || echo "$MISTRALRS_VERSION"))"
  else
    echo "==> cargo install mistralrs-cli@$MISTRALRS_VERSION (a from-scratch mistral.rs build: 20+ minutes on 2 cores)"
    RUSTFLAGS="-C target-cpu=x86-64-v3" cargo install --locked --quiet \
      --root "$peers/mistralrs" --target-dir "$peers/mistralrs-target" \
      "mistralrs-cli@$MISTRALRS_VERSION"
    ls "$peers/mistralrs/bin"
  fi
fi
