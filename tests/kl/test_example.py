"""examples/estimator_bias.py runs end to end and shows the paper's conclusions."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "estimator_bias.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_example(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("estimator_bias")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(outdir), "--samples", "100000", "--seed", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return outdir, result.stdout, json.loads((outdir / "estimator_bias.json").read_text())


def test_help():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--samples", "--seed", "outdir"):
        assert option in result.stdout


def test_files(run_example):
    outdir, stdout, payload = run_example
    png = (outdir / "coefficients.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    # The PNG's IHDR chunk: width and height are big-endian at bytes 16..24.
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 400 and height > 200
    markdown = (outdir / "estimator_bias.md").read_text()
    assert "| sampling | implementation |" in markdown
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table_lines) == len(payload["rows"]) + 2  # header, separator, one line per row
    assert "| sampling | implementation |" in stdout  # the table is printed too
    assert payload["config"] == {"samples": 100000, "seed": 1, "vocab": 32}


def _row(payload, name, sampling):
    (row,) = [r for r in payload["rows"] if r["name"] == name and r["sampling"] == sampling]
    return row


def test_principled_methods_are_unbiased(run_example):
    _, _, payload = run_example
    principled = [r for r in payload["rows"] if r["principled"]]
    names = {(r["name"], r["sampling"]) for r in principled}
    assert {("k2 as loss", "on-policy"), ("k1 in reward", "on-policy"), ("sg(w) * k2 as loss", "off-policy"),
            ("w * k3 as loss (w differentiable)", "off-policy")} <= names
    for row in principled:
        assert row["exact_relative_bias"] < 1e-9, row
        # Monte-Carlo: within a few noise floors (sqrt(variance / N) / ||g||) of zero.
        assert row["relative_bias"] < 5 * row["noise_floor"] + 1e-3, row


def test_biased_methods_are_biased(run_example):
    _, _, payload = run_example
    for name, sampling in [("k3 as loss", "on-policy"), ("k1 as loss", "on-policy"), ("k2 as loss", "off-policy"),
                           ("sg(w) * k3 as loss", "off-policy")]:
        row = _row(payload, name, sampling)
        assert row["exact_relative_bias"] > 0.2, row
        assert row["relative_bias"] > 0.2 and row["relative_bias"] > 10 * row["noise_floor"], row
    assert _row(payload, "k1 as loss", "on-policy")["exact_relative_bias"] == pytest.approx(1.0, abs=1e-9)
