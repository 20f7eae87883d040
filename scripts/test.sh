#!/usr/bin/env bash
# Set everything up and run the whole test suite: unit tests, real-model tests and every notebook
# executed headlessly by papermill in quick mode. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bootstrap.sh
export LABKIT_QUICK=1
# the second real target's tests (tests/test_second_target.py) need it converted once (about 80 s): done
# when this run includes them (no test path given, or that file or its folder named), skipped otherwise
gemma=1
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then
    case "$(realpath "${arg%%::*}")" in
      "$PWD/tests"|"$PWD/tests/"|"$PWD"|"$PWD/tests/test_second_target.py") gemma=1; break ;;
      *) gemma=0 ;;
    esac
  fi
done
if [ "$gemma" = 1 ]; then python -m labkit setup --target gemma3-270m; fi
# headless Chromium opens the offline HTML copies in tests/test_notebooks.py (Debian's package; as root
# it is installed here, otherwise those tests skip with the command that installs it)
if ! command -v chromium >/dev/null && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "labkit setup: installing Debian's chromium for the HTML rendering tests"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
fi
# no path given: pytest runs pyproject's testpaths (tests/); paths given (as .ci/run does): only those
python -m pytest "$@"
