"""Two TRL training processes with different job ids share one klservice server."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.server.test_metrics_and_health import job_labels, scrape

JOB = pathlib.Path(__file__).with_name("train_job.py")


def start_job(target, model_dir, job_id, out, seed, *extra):
    command = [sys.executable, str(JOB), target, str(model_dir), job_id, str(out), "--seed", str(seed), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]


@pytest.mark.slow
def test_two_trainers_at_once_get_their_solo_reference_logprobs(start_server, tiny_model_dir, tmp_path):
    server = start_server()
    jobs = {"trainer-a": 1, "trainer-b": 2}
    for job_id, seed in jobs.items():  # each alone first
        finish(start_job(server.target, tiny_model_dir, job_id, tmp_path / f"{job_id}-solo.json", seed))
    together = ("--barrier", str(tmp_path / "barrier"), "--parties", str(len(jobs)))
    running = [
        start_job(server.target, tiny_model_dir, j, tmp_path / f"{j}-shared.json", s, *together)
        for j, s in jobs.items()
    ]
    for process in running:
        finish(process)

    shared = {}
    for job_id in jobs:
        solo = json.loads((tmp_path / f"{job_id}-solo.json").read_text())
        shared[job_id] = json.loads((tmp_path / f"{job_id}-shared.json").read_text())
        assert len(solo) == len(shared[job_id]) == 2  # one reference fetch per generation batch
        for alone, together in zip(solo, shared[job_id]):
            assert together["completion_ids"] == alone["completion_ids"]
            np.testing.assert_allclose(together["ref"], alone["ref"], atol=1e-5, rtol=0)
    a, b = ([r["time"] for r in shared[j]] for j in jobs)
    assert a[0] < b[-1] and b[0] < a[-1], "the two jobs' reference fetches should overlap in time"

    samples = scrape(server.metrics_url)
    for job_id in jobs:
        tokens = sum(len(r["ref"]) for r in shared[job_id]) * 2  # solo + shared run, same job id
        assert samples["klservice_tokens_scored_total", job_labels(job_id, model=server.model)] == tokens
