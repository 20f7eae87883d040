#!/usr/bin/env bash
# Set everything up and run the whole test suite: unit tests, real-model tests and every notebook
# executed headlessly by papermill in quick mode. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bootstrap.sh
export LABKIT_QUICK=1
python -m pytest tests "$@"
