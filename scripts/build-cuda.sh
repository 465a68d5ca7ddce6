#!/usr/bin/env bash
# Builds `tidepool` with CUDA (`--features cuda`) on a machine that has no GPU and no system CUDA,
# for a GPU machine that has the NVIDIA driver and CUDA 13 runtime libraries.
#
#   scripts/build-cuda.sh [--compute-cap 90] [--out dist/cuda] [--prepare-only]
#
# 1. Downloads the CUDA 13.0 toolkit pieces from PyPI (nvcc, nvvm, headers, runtime, cuBLAS,
#    cuRAND, NVRTC, CCCL) and unpacks them into a cache folder (not a pip install).
# 2. Adds unversioned .so links for the linker and a link-time stub of the driver library
#    (libcuda.so.1 is in no wheel; at run time the GPU machine's real driver is used).
# 3. Builds for the compute capability given (90: H100/H200) with x86-64-v3 CPU code, so the
#    binary also runs on the GPU machine's CPU, then strips and compresses it (xz) to send.
#
# About 40 minutes from scratch on 2 cores; relinking after a change is seconds. CI does not run
# this; see ../shared/CUDA-NOTES.md for the facts it rests on. On the GPU machine:
#   xz -d tidepool.xz && chmod +x tidepool
#   export LD_LIBRARY_PATH="$(python3 -c 'import site; print(site.getsitepackages()[0])')/nvidia/cu13/lib:$LD_LIBRARY_PATH"
#   ./tidepool fixture --size qwen2.5-0.5b --quant q4_k_m --out q.gguf && ./tidepool bench engine --model q.gguf
set -euo pipefail
cd "$(dirname "$0")/.."

cap=90
out=dist/cuda
prepare_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --compute-cap) cap="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --prepare-only) prepare_only=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

cache="${TIDEPOOL_CUDA_CACHE:-$HOME/.cache/tidepool/cuda-13.0}"
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-cccl==13.0.85
)

root="$cache/root"
toolkit="$root/nvidia/cu13"
if [ ! -x "$toolkit/bin/nvcc" ]; then
  echo "==> downloading the CUDA 13.0 toolkit wheels into $cache"
  mkdir -p "$cache/wheels" "$root"
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --python-version 3.11 -d "$cache/wheels" "${wheels[@]}"
  for w in "$cache"/wheels/*.whl; do
    python3 -m zipfile -e "$w" "$root"
  done
  chmod +x "$toolkit"/bin/* "$toolkit"/nvvm/bin/* 2>/dev/null || true
fi
[ -x "$toolkit/bin/nvcc" ] || { echo "error: nvcc not found under $toolkit after unpacking" >&2; exit 1; }

# The wheels ship only versioned libraries (libcublas.so.13); the linker wants libcublas.so.
for f in "$toolkit"/lib/lib*.so.*; do
  base="${f##*/}"
  link="$toolkit/lib/${base%%.so.*}.so"
  [ -e "$link" ] || ln -s "$base" "$link"
done

# Link-time stub of the driver library: every cu* function that cudarc declares.
stub="$cache/stub"
if [ ! -e "$stub/libcuda.so" ]; then
  echo "==> writing the libcuda link stub"
  cargo fetch -q
  mkdir -p "$stub"
  # Every cudarc version in the lock file (more than one can be in the tree).
  for src in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys; do
    grep -rhoE '\bfn cu[A-Za-z0-9_]+\(' "$src"
  done | tr -d '(' | sed 's/^fn //' | sort -u | sed 's/.*/void &(void) {}/' > "$stub/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/libcuda_stub.c"
  ln -sf libcuda.so "$stub/libcuda.so.1"
fi

if [ "$prepare_only" = 1 ]; then
  echo "toolkit ready in $toolkit, driver stub in $stub"
  exit 0
fi

export CUDA_ROOT="$toolkit" CUDA_PATH="$toolkit" CUDA_TOOLKIT_ROOT_DIR="$toolkit"
export PATH="$toolkit/bin:$PATH"
export CUDA_COMPUTE_CAP="$cap"
export LIBRARY_PATH="$toolkit/lib:$stub${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$toolkit/lib:$stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CPATH="$toolkit/include${CPATH:+:$CPATH}"
export RUSTFLAGS="-C target-cpu=x86-64-v3"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda}"

echo "==> building tidepool with CUDA for compute capability $cap (target dir $CARGO_TARGET_DIR)"
started=$(date +%s)
cargo build --release -p tidepool-cli --features cuda
echo "built in $(( $(date +%s) - started )) s"

mkdir -p "$out"
cp "$CARGO_TARGET_DIR/release/tidepool" "$out/tidepool"
strip "$out/tidepool"
xz -6 -T0 -kf "$out/tidepool"
ls -l "$out/tidepool" "$out/tidepool.xz"
echo "send $out/tidepool.xz (under 64 MiB) to the GPU machine; see the top of this script"
