"""What every notebook of the lab does first, in one place.

`import lab_setup` (the notebooks run in this folder) puts this checkout's labkit on the path when it
is not installed (a checkout without `pip install -e .`), and `quick()` reads quick mode from
LABKIT_QUICK, which CI and `bash scripts/lab.sh --headless --quick` set; papermill's
`-p QUICK True` overrides it after the parameters cell.
"""

import importlib.util
import os
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("labkit") is None:
    sys.path.insert(0, str(CHECKOUT))


def quick() -> bool:
    """Quick mode: LABKIT_QUICK set to 1 or true."""
    return os.environ.get("LABKIT_QUICK", "0") in ("1", "true", "True")
