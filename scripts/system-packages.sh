#!/usr/bin/env bash
# The Debian packages the build and tests need beyond Rust, Python and Node: cmake, a C++ compiler
# and libclang (bindgen) to build llama.cpp for the llama.cpp engine (llama-cpp-sys-2); iproute2 (ip netns) for the LAN
# sharing test; the webkit/appindicator/rsvg dev packages to build the tray app; Xvfb, D-Bus,
# xdotool and ImageMagick to run it and take its screenshot; Chromium for the dashboard's browser
# tests; python3-venv for the end-to-end tests. Installs the missing ones when run as root with
# apt-get (a fresh CI machine); otherwise says which are missing and how to get them.
#
#   scripts/system-packages.sh           # everything the tests need
#   scripts/system-packages.sh --build   # only what building Tidepool needs (scripts/serve.sh)
set -euo pipefail

build_packages="cmake g++ clang libclang-dev"
packages="$build_packages iproute2 curl python3-venv libwebkit2gtk-4.1-dev libayatana-appindicator3-dev librsvg2-dev xvfb xauth dbus xdotool imagemagick chromium fonts-dejavu-core"
[ "${1:-}" = --build ] && packages="$build_packages"
missing=""
for p in $packages; do
  dpkg -s "$p" > /dev/null 2>&1 || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
  echo "==> installing Debian packages:$missing"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
else
  echo "missing Debian packages:$missing" >&2
  echo "install them with: sudo apt-get install$missing" >&2
  exit 1
fi
