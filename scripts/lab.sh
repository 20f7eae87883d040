#!/usr/bin/env bash
# Set everything up and open JupyterLab on notebooks/.
#   bash scripts/lab.sh             opens the lab in a browser
#   bash scripts/lab.sh --headless  executes every notebook into build/notebooks/ (+ HTML copies)
#   bash scripts/lab.sh --headless --quick   the same in quick mode (what CI runs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bootstrap.sh
if [ "${1:-}" = "--headless" ]; then
  quick=False; [ "${2:-}" = "--quick" ] && quick=True
  mkdir -p build/notebooks
  for nb in notebooks/*.ipynb; do
    out=build/notebooks/$(basename "$nb")
    echo "labkit: executing $nb (QUICK=$quick) -> $out"
    papermill --kernel python3 -p QUICK "$quick" "$nb" "$out"
    jupyter nbconvert --to html --log-level WARN "$out"
  done
  echo "labkit: executed notebooks and HTML copies are in build/notebooks/"
else
  exec jupyter lab notebooks/
fi
