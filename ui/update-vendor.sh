#!/usr/bin/env bash
# Refreshes ui/vendor/ from the version of uPlot pinned in ui/package.json (and package-lock.json).
# ui/vendor/ is committed: the dashboard works offline and the Rust build never runs npm. Run this
# only to change uPlot's version, then commit ui/vendor/ with the new lock file.
set -euo pipefail
cd "$(dirname "$0")"
if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi
mkdir -p vendor
cp node_modules/uplot/dist/uPlot.iife.min.js vendor/
cp node_modules/uplot/dist/uPlot.min.css vendor/
cp node_modules/uplot/LICENSE vendor/uPlot.LICENSE
echo "uplot $(node -p "require('./node_modules/uplot/package.json').version")" > vendor/VERSION
ls -l vendor
