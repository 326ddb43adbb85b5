"""Both packages build without a deprecation warning of their own making (setuptools >= 77 semantics)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("project", [".", "client"])
def test_building_the_package_prints_no_setuptools_deprecation(project, tmp_path):
    # The build backend's own output shows only with -v; --no-build-isolation uses this
    # environment's setuptools, so the test needs no download.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(ROOT / project)],
        capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # setuptools' warnings reach pip's log as BuildBackendWarning (e.g. "`project.license` as a
    # TOML table is deprecated", which becomes a build error after 2027-02-18).
    warnings = [line for line in output.splitlines() if "Warning" in line or "deprecated" in line.lower()]
    assert not warnings, "\n".join(warnings)
    assert list(tmp_path.glob("*.whl")), "no wheel was built"
