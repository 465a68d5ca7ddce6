#!/usr/bin/env bash
# Renders a results folder into bench/report/ with bench/report.py, in a venv that has matplotlib
# ($TIDEPOOL_PEERS/report-venv, made from PyPI on first use; nothing is installed system-wide).
# Without network or matplotlib the report still gets its tables, without the plots.
#
#   bench/report.sh bench/results/<timestamp> [--report-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,6p' "$0" >&2; exit 2; }
venv="${TIDEPOOL_PEERS:-$HOME/.cache/tidepool-bench}/report-venv"
if ! "$venv/bin/python" -c 'import matplotlib' 2> /dev/null; then
  echo "==> installing matplotlib into $venv" >&2
  { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet matplotlib; } \
    || echo "!!! matplotlib could not be installed: the report will have no plots" >&2
fi
py="$venv/bin/python"
[ -x "$py" ] || py=python3
exec "$py" bench/report.py "$@"
