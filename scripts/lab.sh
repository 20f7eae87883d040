#!/usr/bin/env bash
# Set everything up and open JupyterLab on notebooks/.
#   bash scripts/lab.sh                     opens the lab in a browser
#   bash scripts/lab.sh --headless          executes every notebook into build/notebooks/ (+ offline HTML copies)
#   bash scripts/lab.sh --headless --quick  the same in quick mode (what the test suite runs)
# Extra arguments after --headless [--quick] name notebooks by prefix (e.g. 00 02).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bootstrap.sh
if [ "${1:-}" = "--headless" ]; then
  shift
  # the same function the test suite runs (labkit.lab.notebooks.run_notebooks): each notebook in its folder
  exec python -m labkit notebooks --out build/notebooks "$@"
fi
# JupyterLab refuses to start as root unless told; containers often run as root
root_flag=(); [ "$(id -u)" = "0" ] && root_flag=(--allow-root)
exec jupyter lab "${root_flag[@]}" notebooks/ "$@"
