"""CI mode (tests/conftest.py): in CI a skip for a missing component is a failure, except the ones named."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import skip_allowed


def test_outside_ci_every_skip_stands():
    assert skip_allowed("the default target is not installed", env={})


def test_in_ci_a_missing_component_fails_and_a_gpu_skip_stands():
    ci = {"LABKIT_CI": "1"}
    assert not skip_allowed("the default target is not installed (no GGUF)", env=ci)
    assert not skip_allowed("/x/shared/benchmarks is absent: the external benchmark prompts live beside it", env=ci)
    assert skip_allowed("needs a CUDA GPU", env=ci)
    allow = {**ci, "LABKIT_CI_ALLOW": "no-public-benchmarks"}
    assert skip_allowed("/x/shared/benchmarks is absent: the external benchmark prompts live beside it", env=allow)
    assert not skip_allowed("Chromium is not installed", env=allow)


def test_an_unknown_allowed_skip_is_refused():
    with pytest.raises(pytest.UsageError, match="unknown skips"):
        skip_allowed("x", env={"LABKIT_CI": "1", "LABKIT_CI_ALLOW": "everything"})


def test_a_skipping_test_fails_a_ci_run(tmp_path):
    """A whole pytest run with this conftest: the same skipping test passes outside CI and fails inside."""
    from pathlib import Path
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_skip.py").write_text(textwrap.dedent('''
        import pytest
        def test_needs_a_model():
            pytest.skip("the default target is not installed")
    '''))
    run = lambda env: subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                                     capture_output=True, text=True, env=env, cwd=tmp_path)  # noqa: E731
    import os
    base = {k: v for k, v in os.environ.items() if not k.startswith("LABKIT_CI")}
    assert run(base).returncode == 0
    failed = run({**base, "LABKIT_CI": "1"})
    assert failed.returncode == 1 and "CI mode (LABKIT_CI=1) allows no skip" in failed.stdout
