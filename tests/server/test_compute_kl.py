"""ComputeKL and StreamKL over a real server equal klservice_client.kl on the same inputs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from klservice_client import kl
from klservice_client.wire import spec_to_proto
from klservice_client._proto import klservice_pb2 as pb
from klservice_client.tensors import from_tensor, to_tensor


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(2)
    lengths = [12, 30, 7, 50]
    prompts = [4, 10, 1, 25]
    sequences = [rng.integers(0, 49152, size=n).tolist() for n in lengths]
    scored = sum(n - p for n, p in zip(lengths, prompts))
    logprobs = rng.normal(-11.0, 1.0, size=scored).astype(np.float32)
    old = (logprobs + rng.normal(0, 0.3, size=scored)).astype(np.float32)
    return sequences, prompts, logprobs, old


@pytest.mark.parametrize("preset", sorted(kl.PRESETS))
def test_compute_kl_matches_library_for_every_preset(client, batch, preset):
    sequences, prompts, logprobs, old = batch
    out = client.compute_kl(sequences, prompts, logprobs=logprobs, old_logprobs=old, spec=preset)
    ref = client.score(sequences, prompts).ref_logprobs
    np.testing.assert_array_equal(out.ref_logprobs, ref)
    expected = kl.compute_kl(logprobs, ref, out.scored_lengths, preset, old_logprobs=old)
    for name in ("k1", "k2", "k3", "coef", "coef_principled"):
        np.testing.assert_allclose(getattr(out, name), getattr(expected, name), rtol=1e-6, atol=1e-6, err_msg=name)
    for field, value in vars(expected.diagnostics).items():
        assert getattr(out.diagnostics, field) == pytest.approx(value, rel=1e-6, abs=1e-9), field
    assert out.spec == kl.PRESETS[preset].spec.describe()


def test_custom_spec_float64_logprobs(client, batch):
    sequences, prompts, logprobs, old = batch
    spec = kl.KLSpec("k3", "as_loss", "sequence", "sequence", truncation=5.0, differentiable_weight=True)
    out = client.compute_kl(sequences, prompts, logprobs=logprobs.astype(np.float64), old_logprobs=old.astype(np.float64), spec=spec)
    assert out.coef.dtype == np.float64
    expected = kl.compute_kl(logprobs.astype(np.float64), out.ref_logprobs, out.scored_lengths, spec, old.astype(np.float64))
    np.testing.assert_allclose(out.coef, expected.coef, rtol=1e-12)


def test_torch_inputs_give_torch_outputs(client, batch):
    import torch

    sequences, prompts, logprobs, _ = batch
    out = client.compute_kl(sequences, prompts, logprobs=torch.from_numpy(logprobs))
    assert isinstance(out.coef, torch.Tensor) and isinstance(out.ref_logprobs, torch.Tensor)
    coef, mask = out.padded("coef")
    assert coef.shape == mask.shape == (4, 25)


def test_logprobs_as_padded_and_per_sequence_inputs(client, batch):
    sequences, prompts, logprobs, _ = batch
    flat = client.compute_kl(sequences, prompts, logprobs=logprobs)
    parts = flat.ragged("k1")
    per_sequence = np.split(logprobs, np.cumsum(flat.scored_lengths)[:-1])
    padded = np.zeros((4, 30), np.float32)
    for row, part in zip(padded, per_sequence):
        row[: len(part)] = part
    for variant in (per_sequence, padded):
        again = client.compute_kl(sequences, prompts, logprobs=variant)
        np.testing.assert_array_equal(again.coef, flat.coef)
    assert len(parts) == 4


def _kl_request(request_id, sequences, prompts, logprobs, preset):
    return pb.KLRequest(
        request_id=request_id,
        batch=pb.SequenceBatch(
            token_ids=to_tensor(np.concatenate([np.asarray(s) for s in sequences])),
            lengths=to_tensor(np.array([len(s) for s in sequences])),
            prompt_lengths=to_tensor(np.array(prompts)),
        ),
        logprobs=to_tensor(logprobs),
        spec=spec_to_proto(preset),
    )


def test_stream_kl_answers_every_request_by_id(tiny_server):
    import grpc

    from klservice_client._proto import klservice_pb2_grpc as pb_grpc

    rng = np.random.default_rng(3)
    presets = sorted(p for p in kl.PRESETS if not kl.PRESETS[p].spec.needs_old_logprobs)
    requests, expected = [], {}
    for i in range(40):
        n = int(rng.integers(2, 60))
        sequences = [rng.integers(0, 49152, size=n).tolist()]
        prompt = int(rng.integers(1, n))
        logprobs = rng.normal(-10, 1, size=n - prompt).astype(np.float32)
        preset = random.Random(i).choice(presets)
        requests.append(_kl_request(f"r{i}", sequences, [prompt], logprobs, preset))
        expected[f"r{i}"] = (sequences, prompt, logprobs, preset)
    # One bad request in the middle: it gets an error item, the others still get answers.
    bad = _kl_request("bad", [[1, 2, 3]], [1], np.zeros(5, np.float32), "principled")
    requests.insert(20, bad)

    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = pb_grpc.ReferenceServiceStub(channel)
        answers = list(stub.StreamKL(iter(requests), timeout=120))
        unary = {}
        for request_id, (sequences, prompt, logprobs, preset) in expected.items():
            unary[request_id] = stub.ComputeKL(_kl_request(request_id, sequences, [prompt], logprobs, preset), timeout=60)

    by_id = {a.request_id: a for a in answers}
    assert len(answers) == len(requests) == len(by_id)
    assert by_id["bad"].WhichOneof("result") == "error"
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "logprobs" in by_id["bad"].error.message
    for request_id, (sequences, prompt, logprobs, preset) in expected.items():
        answer = by_id[request_id]
        assert answer.WhichOneof("result") == "response", answer
        got = from_tensor(answer.response.coef, "coef")
        # Equal up to float32 rounding: batch composition (padding, kernel blocking) may differ by an ulp.
        np.testing.assert_allclose(got, from_tensor(unary[request_id].coef, "coef"), rtol=1e-5, atol=1e-6)
        ref = from_tensor(answer.response.ref_logprobs, "ref")
        want = kl.compute_kl(logprobs, ref, [len(logprobs)], preset).coef
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_stream_kl_rejects_missing_and_duplicate_ids(tiny_server):
    import grpc

    from klservice_client._proto import klservice_pb2_grpc as pb_grpc

    good = _kl_request("same", [[1, 2, 3]], [1], np.array([-1.0, -2.0], np.float32), "principled")
    duplicate = _kl_request("same", [[1, 2, 3]], [1], np.array([-1.0, -2.0], np.float32), "principled")
    anonymous = _kl_request("", [[1, 2, 3]], [1], np.array([-1.0, -2.0], np.float32), "principled")
    with grpc.insecure_channel(tiny_server.target) as channel:
        answers = list(pb_grpc.ReferenceServiceStub(channel).StreamKL(iter([good, duplicate, anonymous]), timeout=60))
    kinds = sorted((a.request_id, a.WhichOneof("result")) for a in answers)
    # The duplicate's error carries no id: an answer tagged "same" is always the answer to the first "same".
    assert kinds == [("", "error"), ("", "error"), ("same", "response")]
    errors = sorted(a.error.message for a in answers if a.WhichOneof("result") == "error")
    assert all("request_id" in message for message in errors)
    assert any("'same' was already used" in message for message in errors)
