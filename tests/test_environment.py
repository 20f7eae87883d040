"""environment.yml offers conda users exactly the pins of pyproject.toml."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    return {m.group(1).lower(): m.group(2) for line in lines
            if (m := re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s;]+)", line))}


def test_environment_yml_pins_equal_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _pins(project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds])
    yml = [line.strip().lstrip("- ") for line in (ROOT / "environment.yml").read_text().splitlines()]
    assert _pins(yml) == wanted


def test_torch_is_pinned_to_the_cpu_wheel_everywhere():
    for name in ("pyproject.toml", "environment.yml", "constraints.txt"):
        assert "torch==2.13.0" in (ROOT / name).read_text(), name
