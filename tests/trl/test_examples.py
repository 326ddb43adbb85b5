"""The trainer examples run end to end on the embedded model against real servers."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.server.test_metrics_and_health import job_labels, scrape

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def example_env(model_cache_dir, default_model_dir):
    return dict(os.environ, KLSERVICE_CACHE_DIR=str(model_cache_dir), HF_HUB_OFFLINE="1")


@pytest.mark.parametrize("script", ["kl_study.py", "grpo_loop.py", "trl_reference_cost.py", "distill.py"])
def test_help(script):
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--steps" in result.stdout


@pytest.mark.slow
def test_quick_study_runs_every_setting_through_a_server(tmp_path, example_env):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "kl_study.py"), str(tmp_path), "--quick"],
        capture_output=True, text=True, timeout=1200, env=example_env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads((tmp_path / "study.json").read_text())
    runs = payload["runs"]
    assert set(runs) == {
        "no_kl", "k1_as_loss", "k1_in_reward", "k2_as_loss", "k3_as_loss", "trl_default", "off_policy_no_is", "off_policy_is",
    }
    for name, records in runs.items():
        assert [r["step"] for r in records] == [1, 2], name
        for record in records:
            assert math.isfinite(record["heldout_kl"]) and record["heldout_kl"] >= 0, name
            assert 0.0 <= (record["reward"] or 0.0) <= 1.0, name  # None: no generation at that step
    # Same seed, same data: the first step is the same everywhere (the policy starts at the reference).
    first = {name: records[0]["reward"] for name, records in runs.items()}
    assert len(set(first.values())) == 1, first
    # k2 as loss and k1 in reward have the same coefficient on-policy: the same trajectory.
    for a, b in zip(runs["k2_as_loss"], runs["k1_in_reward"]):
        assert a["param_distance"] == pytest.approx(b["param_distance"], rel=1e-4)
    # The KL term acts: k2 as loss has a KL gradient, no KL has none.
    assert runs["k2_as_loss"][1]["kl_grad_norm"] > 0 and runs["no_kl"][1]["kl_grad_norm"] == 0
    # Off-policy without importance weights is away from the principled coefficient; with them it is not.
    assert runs["off_policy_no_is"][1]["coef_bias_abs_mean"] > 1e-4
    assert runs["off_policy_is"][1]["coef_bias_abs_mean"] < 1e-6
    assert (tmp_path / "study.png").read_bytes().startswith(PNG_SIGNATURE)
    table = (tmp_path / "table.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 6  # header + 5 claims


@pytest.mark.slow
def test_hand_written_loop_trains_through_the_service(start_server, default_model_dir, example_env):
    server = start_server(model=str(default_model_dir))
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "grpo_loop.py"), "--target", server.target, "--steps", "2"],
        capture_output=True, text=True, timeout=600, env=example_env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = re.findall(r"^step (\d+): reward ([\d.]+)  k3 ([\d.e+-]+)", result.stdout, re.M)
    assert [s[0] for s in steps] == ["1", "2"], result.stdout
    assert float(steps[0][2]) == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert float(steps[1][2]) > 0  # after one update it is not
    assert scrape(server.metrics_url)["klservice_tokens_scored_total", job_labels("grpo-loop", model=server.model)] > 0


@pytest.mark.slow
def test_distillation_lowers_the_reverse_kl_to_a_served_teacher(
    start_server, tiny_model_dir, default_model_dir, example_env, tmp_path
):
    """examples/distill.py --quick: a noisy copy of the embedded model distilled towards it, served as "teacher".

    The server's default model is the tiny random Llama (same tokenizer), so only a request
    that names the teacher (``--model teacher``) scores against the embedded model.
    """
    server = start_server(model=(str(tiny_model_dir), f"teacher={default_model_dir}"))
    curve = tmp_path / "distill.json"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "distill.py"), "--target", server.target, "--model", "teacher", "--quick",
         "--out", str(curve)],
        capture_output=True, text=True, timeout=900, env=example_env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads(curve.read_text())
    assert payload["teacher"] == "teacher"
    assert payload["spec"] == "k1 in_reward token"  # the on_policy_distillation preset, as the server applied it
    steps = payload["steps"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for record in steps:
        assert math.isfinite(record["reverse_kl"]) and math.isfinite(record["k3"]) and record["k3"] >= 0, record
        assert record["tokens"] > 0, record
    # The printed progress lines carry the same curve.
    printed = re.findall(r"^step (\d+)/6: reverse KL ([\d.e+-]+)", result.stdout, re.M)
    assert [int(s) for s, _ in printed] == [1, 2, 3, 4, 5, 6], result.stdout
    assert [float(v) for _, v in printed] == pytest.approx([r["reverse_kl"] for r in steps], abs=1e-4)
    # The student starts away from the teacher, and distillation brings it closer.
    first, last = steps[0]["reverse_kl"], steps[-1]["reverse_kl"]
    assert first > 0.5, steps
    assert last < first, steps
    batches = [
        value for (name, labels), value in scrape(server.metrics_url).items()
        if name == "klservice_kl_batches_total" and ("trainer_job", "distill") in labels
        and ("spec", "on_policy_distillation") in labels
    ]
    assert sum(batches) >= 6


@pytest.mark.slow
def test_reference_cost_prints_memory_and_time(example_env):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "trl_reference_cost.py"), "--steps", "1", "--group-size", "2",
         "--completion-tokens", "4", "--passage-repeats", "1"],
        capture_output=True, text=True, timeout=900, env=example_env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    memory = re.search(r"peak resident memory, MiB\s+(\d+)\s+(\d+)", result.stdout)
    seconds = re.search(r"reference step per TRL step, s\s+([\d.]+)\s+([\d.]+)", result.stdout)
    assert memory and seconds, result.stdout
    local, served = int(memory.group(1)), int(memory.group(2))
    assert served < local  # the trainer without its reference model holds less
