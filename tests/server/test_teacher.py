"""Teacher-grade answers through a real server: top-k and candidate log-probs over the whole vocabulary, and the rest
of the mass, each checked against an independent full-vocabulary forward of the served model; what bad input to
them gets; the response-size check and the client's splitting counting them; a backend without them refusing."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
import torch

from klservice_client import FailedPrecondition, InvalidArgument, KLClient
from klservice_client.wire import pb, pb_grpc, to_tensor

TEMPERATURE = 0.8


def batch(seed: int = 0):
    """Two groups sharing prompts (computed once, in one packed row) and a sequence alone."""
    rng = np.random.default_rng(seed)
    sequences, starts = [], []
    for prompt_length, responses in ((12, (5, 9, 1)), (7, (6,))):
        prompt = rng.integers(0, 49152, prompt_length).tolist()
        for n in responses:
            sequences.append(prompt + rng.integers(0, 49152, n).tolist())
            starts.append(prompt_length)
    sequences.append(rng.integers(0, 49152, 20).tolist())
    starts.append(3)
    return sequences, starts


def full_log_probs(model_dir, sequences, starts, temperature):
    """Every scored position's full log-softmax in float64, from the model's own logits, sequence by sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    with torch.inference_mode():
        for sequence, start in zip(sequences, starts):
            logits = model(input_ids=torch.tensor(sequence)[None]).logits[0].double() / temperature
            rows.append(torch.log_softmax(logits, -1)[start - 1 : len(sequence) - 1])
    return torch.cat(rows)


@pytest.mark.parametrize("packed", [True, False])
def test_top_k_candidates_and_the_rest_equal_a_full_vocabulary_forward(start_server, tiny_model_dir, packed):
    from klservice.backends.hf import HFBackend

    backend = HFBackend(tiny_model_dir, progress=False, device="cpu", kernel=None if packed else "none")
    server = start_server(backend=backend, cache_mb=0)
    sequences, starts = batch()
    scored = sum(len(s) - t for s, t in zip(sequences, starts))
    rng = np.random.default_rng(1)
    candidates = rng.integers(0, 49152, (scored, 4))
    candidates[:, 3] = candidates[:, 0]  # an id given twice counts once in the rest
    full = full_log_probs(tiny_model_dir, sequences, starts, TEMPERATURE)
    top = full.topk(6, -1)
    candidates[:, 1] = top.indices[:, 0].numpy()  # and one of the top ids
    with KLClient(server.target, timeout=60) as client:
        out = client.score(sequences, starts, temperature=TEMPERATURE, top_k=6, candidate_ids=candidates)
        plain = client.score(sequences, starts, temperature=TEMPERATURE)
    assert out.top_ids.dtype == np.int32 and out.top_ids.shape == out.top_logprobs.shape == (scored, 6)
    assert out.candidate_logprobs.shape == (scored, 4) and out.rest_logmass.shape == (scored,)
    np.testing.assert_array_equal(out.top_ids, top.indices.numpy())
    np.testing.assert_allclose(out.top_logprobs, top.values.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.candidate_logprobs, full.gather(1, torch.as_tensor(candidates)).numpy(),
                               atol=1e-5, rtol=0)
    targets = torch.as_tensor(np.concatenate([s[t:] for s, t in zip(sequences, starts)]))
    np.testing.assert_allclose(out.ref_logprobs, full.gather(1, targets[:, None])[:, 0].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.ref_logprobs, plain.ref_logprobs, atol=1e-5, rtol=0)
    rest = []
    for row in range(scored):
        held = sorted(set(top.indices[row].tolist()) | set(candidates[row].tolist()))
        rest.append(np.log1p(-full[row, held].exp().sum().item()))
    np.testing.assert_allclose(out.rest_logmass, rest, atol=1e-5, rtol=1e-5)
    assert plain.top_ids is None and plain.rest_logmass is None


def request(**fields) -> pb.ScoreRequest:
    """Two sequences with 2 + 2 scored tokens, and `fields`."""
    sequences, starts = [[1, 2, 3, 4], [5, 6, 7]], [2, 1]
    return pb.ScoreRequest(batch=pb.SequenceBatch(
        token_ids=to_tensor(np.concatenate(sequences)), lengths=to_tensor(np.array([4, 3])),
        prompt_lengths=to_tensor(np.array(starts))), **fields)


BAD = {
    "top_k over the limit": (dict(top_k=257), r"top_k: 257 is over the limit of 256"),
    "candidates of the wrong rank": (dict(candidate_ids=to_tensor(np.arange(4))), r"candidate_ids: expected 2 dimension"),
    "candidates for other tokens": (dict(candidate_ids=to_tensor(np.zeros((3, 2), np.int64))),
                                    r"candidate_ids: has 3 rows but the batch has 4 scored tokens"),
    "too many candidates": (dict(candidate_ids=to_tensor(np.zeros((4, 257), np.int64))),
                            r"candidate_ids: 257 ids per position; expected 1 to 256"),
    "candidate outside the vocabulary": (
        dict(candidate_ids=to_tensor(np.array([[1], [2], [3], [49152]]))),
        r"candidate_ids: id 49152 at sequence 1, scored token 1 is outside the vocabulary \[0, 49152\)"),
    "negative candidate": (dict(candidate_ids=to_tensor(np.array([[1], [-1], [3], [4]]))),
                           r"candidate_ids: id -1 at sequence 0, scored token 1"),
    "float candidates": (dict(candidate_ids=to_tensor(np.zeros((4, 2), np.float32))),
                         r"candidate_ids: dtype DTYPE_FLOAT32 is not allowed here"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_teacher_input_is_invalid_argument_naming_the_field(start_server, case):
    server = start_server(cache_mb=0)
    fields, message = BAD[case]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ReferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Score(request(**fields), timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(message, refused.value.details()), refused.value.details()
        assert stub.Score(request(), timeout=60).ref_logprobs.data  # the server serves on


def test_the_size_check_and_the_clients_splitting_count_teacher_outputs(start_server):
    """With 1 MiB messages, 4,000 scored tokens of top-100 (800 bytes each) take three times the limit: one request
    of them is refused before any forward, naming how many scored tokens fit; the client splits the same batch
    into requests that fit and reassembles the answer."""
    server = start_server(cache_mb=0, max_message_mb=1, max_request_tokens=100_000)
    rng = np.random.default_rng(3)
    sequences = [rng.integers(0, 49152, 401).tolist() for _ in range(10)]
    with grpc.insecure_channel(server.target) as channel:
        request = pb.ScoreRequest(top_k=100, batch=pb.SequenceBatch(
            token_ids=to_tensor(np.concatenate(sequences)), lengths=to_tensor(np.full(10, 401)),
            prompt_lengths=to_tensor(np.ones(10, np.int64))))
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ReferenceServiceStub(channel).Score(request, timeout=60)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "send at most" in refused.value.details()
    with KLClient(server.target, timeout=120) as client:
        whole = client.score(sequences, 1, top_k=100)
        alone = client.score(sequences[:1], 1, top_k=100)
    assert whole.top_logprobs.shape == (4000, 100)
    np.testing.assert_allclose(whole.top_logprobs[:400], alone.top_logprobs, atol=1e-5, rtol=0)


def test_compute_kl_and_stream_kl_carry_the_same_teacher_outputs(start_server):
    """ComputeKL and StreamKL ask for teacher outputs as Score does (a KL penalty and a distillation term from one
    forward): the same top ids, log-probs, candidates and rest as Score, the KL values those of a ComputeKL without
    them; split across requests (1 MiB messages) and reassembled; bad teacher fields are INVALID_ARGUMENT naming
    the field, on the stream too, and the stream goes on."""
    from klservice_client import KLItem

    server = start_server(cache_mb=0, max_message_mb=1, max_request_tokens=100_000)
    rng = np.random.default_rng(4)
    sequences = [rng.integers(0, 49152, 301).tolist() for _ in range(8)]  # 2,400 scored tokens: top-100 is 2 MiB
    candidates = rng.integers(0, 49152, (2400, 3))
    policy = -rng.exponential(2.0, 2400)
    with KLClient(server.target, timeout=120) as client:
        score = client.score(sequences, 1, temperature=TEMPERATURE, top_k=100, candidate_ids=candidates)
        plain = client.compute_kl(sequences, 1, logprobs=policy, temperature=TEMPERATURE, spec="grpo_k3_as_loss")
        taught = client.compute_kl(sequences, 1, logprobs=policy, temperature=TEMPERATURE, spec="grpo_k3_as_loss",
                                   top_k=100, candidate_ids=candidates)
        streamed = list(client.stream_kl([
            KLItem(sequences, 1, policy, temperature=TEMPERATURE, spec="grpo_k3_as_loss", top_k=100,
                   candidate_ids=candidates, key="taught"),
            KLItem(sequences[:1], 1, policy[:300], top_k=1000, key="bad"),
            KLItem(sequences[:1], 1, policy[:300], top_k=2, key="after")]))
    assert taught.top_ids.shape == (2400, 100) and plain.top_ids is None and plain.rest_logmass is None
    results = {result.key: result for result in streamed}
    for output in (taught, results["taught"].result()):
        np.testing.assert_array_equal(output.top_ids, score.top_ids)
        for name in ("top_logprobs", "candidate_logprobs", "rest_logmass"):
            np.testing.assert_allclose(getattr(output, name), getattr(score, name), atol=1e-5, rtol=0)
        for name in ("ref_logprobs", "k3", "coef"):
            np.testing.assert_allclose(getattr(output, name), getattr(plain, name), atol=1e-5, rtol=1e-5)
    assert isinstance(results["bad"].error, InvalidArgument) and "top_k: 1000 is over the limit of 256" in str(
        results["bad"].error)
    assert results["after"].result().top_ids.shape == (300, 2)
    with grpc.insecure_channel(server.target) as channel:
        kl_request = pb.KLRequest(batch=request().batch, logprobs=to_tensor(np.full(4, -1.0)),
                                  candidate_ids=to_tensor(np.array([[1], [2], [3], [49152]])))
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ReferenceServiceStub(channel).ComputeKL(kl_request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "candidate_ids: id 49152 at sequence 1, scored token 1 is outside the vocabulary" in refused.value.details()


def test_a_backend_without_teacher_outputs_refuses_them_clearly(start_server, hf_backend_without_teacher):
    server = start_server(backend=hf_backend_without_teacher, cache_mb=0)
    with KLClient(server.target, timeout=60) as client:
        with pytest.raises(FailedPrecondition, match="top_k and candidate_ids: .* does not compute teacher outputs"):
            client.score([[1, 2, 3]], 1, top_k=3)
        assert client.score([[1, 2, 3]], 1).ref_logprobs.shape == (2,)
    with pytest.raises(InvalidArgument, match="top_k: -1 must be a whole number >= 0"):
        KLClient(server.target).score([[1, 2, 3]], 1, top_k=-1)


@pytest.fixture
def hf_backend_without_teacher(tiny_model_dir):
    """The real backend behind the base class's `check_teacher` (what a backend that computes no teacher outputs
    answers)."""
    from klservice.backends.base import ReferenceBackend
    from klservice.backends.hf import HFBackend

    class NoTeacher(HFBackend):
        check_teacher = ReferenceBackend.check_teacher

    backend = NoTeacher(tiny_model_dir, progress=False, device="cpu")
    yield backend
    backend.close()
