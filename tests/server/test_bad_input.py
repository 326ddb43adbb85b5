"""Every bad input gets a precise error and the right status code; the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from klservice_client._proto import klservice_pb2 as pb
from klservice_client._proto import klservice_pb2_grpc as pb_grpc
from klservice_client.tensors import to_tensor

VOCAB = 49152
GOOD_TOKENS = [[5, 6, 7, 8], [9, 10, 11]]
GOOD_PROMPTS = [2, 1]


def batch(tokens=GOOD_TOKENS, prompts=GOOD_PROMPTS, lengths=None, token_dtype=np.int64):
    lengths = [len(t) for t in tokens] if lengths is None else lengths
    flat = np.concatenate([np.asarray(t) for t in tokens]) if tokens else np.zeros(0, np.int64)
    return pb.SequenceBatch(
        token_ids=to_tensor(flat.astype(token_dtype)),
        lengths=to_tensor(np.asarray(lengths, dtype=np.int64)),
        prompt_lengths=to_tensor(np.asarray(prompts, dtype=np.int64)),
    )


def kl_request(**overrides):
    fields = dict(batch=batch(), logprobs=to_tensor(np.full(4, -1.0, np.float32)))
    fields.update(overrides)
    return pb.KLRequest(**fields)


def score_request(**overrides):
    fields = dict(batch=batch())
    fields.update(overrides)
    return pb.ScoreRequest(**fields)


def nan_at(index, size=4):
    values = np.full(size, -1.0, np.float32)
    values[index] = np.nan
    return to_tensor(values)


BAD_REQUESTS = {
    "token id >= vocab": (
        "Score", score_request(batch=batch(tokens=[[5, 6, 7, 8], [9, VOCAB, 11]])),
        grpc.StatusCode.INVALID_ARGUMENT, r"batch.token_ids: token id 49152 at sequence 1, position 1 .*\[0, 49152\)"),
    "negative token id": (
        "Score", score_request(batch=batch(tokens=[[5, -3, 7, 8], [9, 10, 11]])),
        grpc.StatusCode.INVALID_ARGUMENT, r"token id -3 at sequence 0, position 1"),
    "lengths do not sum to the token count": (
        "Score", score_request(batch=batch(lengths=[4, 4])),
        grpc.StatusCode.INVALID_ARGUMENT, r"batch.lengths: sum to 8 tokens but batch.token_ids has 7"),
    "zero length": (
        "Score", score_request(batch=batch(tokens=[[1, 2, 3, 4], [5, 6, 7]], lengths=[7, 0], prompts=[1, 1])),
        grpc.StatusCode.INVALID_ARGUMENT, r"batch.lengths: sequence 1: length 0 must be >= 1"),
    "prompt longer than sequence": (
        "Score", score_request(batch=batch(prompts=[2, 4])),
        grpc.StatusCode.INVALID_ARGUMENT, r"batch.prompt_lengths: sequence 1: prompt length 4 must be between 1 and the sequence length 3"),
    "prompt length zero": (
        "Score", score_request(batch=batch(prompts=[0, 1])),
        grpc.StatusCode.INVALID_ARGUMENT, r"batch.prompt_lengths: sequence 0: prompt length 0"),
    "prompt lengths count": (
        "Score", score_request(batch=batch(prompts=[1])),
        grpc.StatusCode.INVALID_ARGUMENT, r"batch.prompt_lengths: has 1 entries but lengths has 2 sequences"),
    "empty batch": (
        "Score", score_request(batch=batch(tokens=[], prompts=[], lengths=[])),
        grpc.StatusCode.INVALID_ARGUMENT, r"batch: empty batch"),
    "missing batch": (
        "Score", pb.ScoreRequest(),
        grpc.StatusCode.INVALID_ARGUMENT, r"batch.token_ids: missing"),
    "token ids as floats": (
        "Score", score_request(batch=batch(token_dtype=np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT, r"batch.token_ids: dtype DTYPE_FLOAT32 is not allowed here; expected int32/int64"),
    "tensor shape does not match its bytes": (
        "Score", score_request(batch=pb.SequenceBatch(
            token_ids=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[7], data=b"\x00" * 40),
            lengths=to_tensor(np.array([4, 3])), prompt_lengths=to_tensor(np.array([2, 1])))),
        grpc.StatusCode.INVALID_ARGUMENT, r"batch.token_ids: shape \[7\] of DTYPE_INT64 needs 56 bytes, data has 40"),
    "tensor dtype unspecified": (
        "Score", score_request(batch=pb.SequenceBatch(
            token_ids=pb.Tensor(shape=[7], data=b"\x00" * 56),
            lengths=to_tensor(np.array([4, 3])), prompt_lengths=to_tensor(np.array([2, 1])))),
        grpc.StatusCode.INVALID_ARGUMENT, r"batch.token_ids: dtype DTYPE_UNSPECIFIED is not supported"),
    "2-D tensor": (
        "Score", score_request(batch=pb.SequenceBatch(
            token_ids=to_tensor(np.ones((7, 1), np.int64)),
            lengths=to_tensor(np.array([4, 3])), prompt_lengths=to_tensor(np.array([2, 1])))),
        grpc.StatusCode.INVALID_ARGUMENT, r"batch.token_ids: expected 1 dimension\(s\), got shape \[7, 1\]"),
    "sequence longer than the model": (
        "Score", score_request(batch=batch(tokens=[[1] * 4, [2] * 513], prompts=[1, 1])),
        grpc.StatusCode.OUT_OF_RANGE, r"batch.lengths: sequence 1: length 513 exceeds the model's maximum of 512"),
    "unknown model": (
        "Score", score_request(model="gpt-17"),
        grpc.StatusCode.NOT_FOUND, r"model: 'gpt-17' is not served here"),
    "bad temperature": (
        "Score", score_request(temperature=-1.0),
        grpc.StatusCode.INVALID_ARGUMENT, r"temperature: must be a finite number > 0"),
    "temperature that underflows the softmax": (
        "Score", score_request(temperature=1e-40),
        grpc.StatusCode.INVALID_ARGUMENT, r"temperature: must be a finite number > 0 within \[0.01, 100\]"),
    "tiny temperature on ComputeKL names temperature": (
        "ComputeKL", kl_request(temperature=1e-37),
        grpc.StatusCode.INVALID_ARGUMENT, r"^temperature: .*got 1e-37"),
    "huge temperature": (
        "Score", score_request(temperature=1e4),
        grpc.StatusCode.INVALID_ARGUMENT, r"temperature: .*within \[0.01, 100\]"),
    "positive policy log-prob": (
        "ComputeKL", kl_request(logprobs=to_tensor(np.array([-1, -1, 0.5, -1], np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT, r"logprobs: value 0.5 at sequence 1, scored token 0 is not a log-prob"),
    "policy log-prob of -3e38": (
        "ComputeKL", kl_request(logprobs=to_tensor(np.array([-1, -3e38, -1, -1], np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT, r"logprobs: value -3e\+38 at sequence 0, scored token 1 is not a log-prob"),
    "behaviour log-prob of +3e38": (
        "ComputeKL", kl_request(old_logprobs=to_tensor(np.array([-1, -1, -1, 3e38], np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT, r"old_logprobs: value 3e\+38 at sequence 1, scored token 1 is not a log-prob"),
    "request id too long": (
        "Score", score_request(request_id="r" * 300),
        grpc.StatusCode.INVALID_ARGUMENT, r"request_id: 300 characters, at most 256"),
    "policy log-prob count": (
        "ComputeKL", kl_request(logprobs=to_tensor(np.full(5, -1.0, np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT, r"logprobs: has 5 values but the batch has 4 scored tokens"),
    "missing policy log-probs": (
        "ComputeKL", pb.KLRequest(batch=batch()),
        grpc.StatusCode.INVALID_ARGUMENT, r"logprobs: missing"),
    "old log-prob count": (
        "ComputeKL", kl_request(old_logprobs=to_tensor(np.full(3, -1.0, np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT, r"old_logprobs: has 3 values but the batch has 4 scored tokens"),
    "NaN policy log-prob": (
        "ComputeKL", kl_request(logprobs=nan_at(3)),
        grpc.StatusCode.INVALID_ARGUMENT, r"logprobs: non-finite value nan at sequence 1, scored token 1"),
    "inf old log-prob": (
        "ComputeKL", kl_request(old_logprobs=to_tensor(np.array([-1, -np.inf, -1, -1], np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT, r"old_logprobs: non-finite value -inf at sequence 0, scored token 1"),
    "unknown preset": (
        "ComputeKL", kl_request(spec=pb.KLSpec(preset="kl_magic")),
        grpc.StatusCode.INVALID_ARGUMENT, r"spec: unknown preset 'kl_magic'; known presets: principled"),
    "preset and fields": (
        "ComputeKL", kl_request(spec=pb.KLSpec(preset="principled", estimator=pb.ESTIMATOR_K3)),
        grpc.StatusCode.INVALID_ARGUMENT, r"spec: preset 'principled' given together with estimator"),
    "invalid combination": (
        "ComputeKL", kl_request(spec=pb.KLSpec(mode=pb.KL_MODE_AS_LOSS, aggregation=pb.AGGREGATION_REWARD_TO_GO)),
        grpc.StatusCode.INVALID_ARGUMENT, r"reward_to_go is only valid with mode=in_reward"),
    "importance sampling without old log-probs": (
        "ComputeKL", kl_request(spec=pb.KLSpec(preset="openrlhf_unbiased_k2")),
        grpc.StatusCode.INVALID_ARGUMENT, r"old_logprobs: missing; importance_sampling=token"),
    "unknown enum value": (
        "ComputeKL", kl_request(spec=pb.KLSpec(estimator=7)),
        grpc.StatusCode.INVALID_ARGUMENT, r"spec.estimator: unknown value 7"),
    "revision that is not hex": (
        "Score", score_request(revision="zzzzzzzzzzzz"),
        grpc.StatusCode.INVALID_ARGUMENT, r"revision: 'zzzzzzzzzzzz': expected 12 to 64 lower-case hex digits"),
    "revision in upper case": (
        "Score", score_request(revision="ABCDEF012345"),
        grpc.StatusCode.INVALID_ARGUMENT, r"revision: 'ABCDEF012345': expected 12 to 64 lower-case hex digits"),
    "revision too short": (
        "ComputeKL", kl_request(revision="abc"),
        grpc.StatusCode.INVALID_ARGUMENT, r"revision: 'abc': expected 12 to 64 lower-case hex digits"),
    "old log-probs of another dtype": (
        "ComputeKL", kl_request(old_logprobs=to_tensor(np.full(4, -1.0, np.float64))),
        grpc.StatusCode.INVALID_ARGUMENT, r"old_logprobs: dtype float64 differs from logprobs' float32"),
}


@pytest.fixture(scope="module")
def stub(tiny_server):
    with grpc.insecure_channel(tiny_server.target) as channel:
        yield pb_grpc.ReferenceServiceStub(channel)


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_refused_precisely_and_server_keeps_serving(stub, case):
    method, request, code, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stub, method)(request, timeout=30)
    assert raised.value.code() == code, raised.value.details()
    assert raised.value.details() is not None
    import re

    assert re.search(message, raised.value.details()), raised.value.details()
    # The next good request is answered.
    good = stub.Score(score_request(), timeout=30)
    assert good.scored_lengths.shape == [2]


def test_request_over_the_token_limit(start_server):
    server = start_server(max_request_tokens=16)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ReferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Score(score_request(batch=batch(tokens=[[1] * 10, [2] * 10], prompts=[1, 1])), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "20 tokens exceeds this server's limit of 16 per request" in raised.value.details()
        assert stub.Score(score_request(), timeout=30).ref_logprobs.shape == [4]


def test_message_over_the_size_limit_is_refused_by_grpc(start_server):
    server = start_server(max_message_mb=1)
    big = score_request(batch=batch(tokens=[[1] * 200_000], prompts=[1]))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ReferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Score(big, timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Score(score_request(), timeout=30).ref_logprobs.shape == [4]


def test_client_raises_typed_errors(client):
    from klservice_client import InvalidArgument, ModelNotFound

    with pytest.raises(InvalidArgument, match="token id 49152 at sequence 0"):
        client.score([[1, 49152, 3]], 1)
    with pytest.raises(ModelNotFound):
        client.score([[1, 2, 3]], 1, model="other")
    with pytest.raises(InvalidArgument, match="prompt_lengths: sequence 0"):
        client.score([[1, 2, 3]], 4)


def test_a_value_error_inside_the_backend_is_internal_not_the_clients_fault(start_server, tiny_model_dir):
    """Only the project's own input exceptions become INVALID_ARGUMENT: a ValueError from inside a
    forward (torch, numpy, a backend bug) is INTERNAL with the generic message, and the server goes on."""
    from klservice.backends.hf import HFBackend
    from klservice.errors import INTERNAL_MESSAGE

    class FailingOnce(HFBackend):
        failures = 1

        def score(self, sequences, starts, temperature=1.0, prompt_groups=None):
            if self.failures:
                self.failures -= 1
                raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")
            return super().score(sequences, starts, temperature, prompt_groups)

    server = start_server(backend=FailingOnce(tiny_model_dir, device="cpu", progress=False), cache_mb=0)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ReferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            stub.Score(pb.ScoreRequest(batch=batch()), timeout=60)
        assert failure.value.code() == grpc.StatusCode.INTERNAL
        assert failure.value.details() == INTERNAL_MESSAGE
        assert "broadcast" not in failure.value.details()
        reply = stub.Score(pb.ScoreRequest(batch=batch()), timeout=60)  # the server keeps serving
        assert len(reply.ref_logprobs.data) == 4 * 4  # 4 scored tokens, float32


def test_the_temperature_range_is_inclusive_at_both_ends(stub):
    """0.01 and 100 travel as float32 (0.0099999998, 100.0): both are accepted."""
    for temperature in (0.01, 100.0):
        reply = stub.Score(score_request(temperature=temperature), timeout=30)
        assert reply.scored_lengths.shape == [2]


class MisbehavingOnce:
    """Wraps a backend; its first forward goes wrong in the way `fault` says, later ones are the backend's own."""

    def __init__(self, backend, fault: str):
        self._backend, self.fault, self.remaining = backend, fault, 1

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def score(self, sequences, starts, temperature=1.0, prompt_groups=None):
        scored = self._backend.score(sequences, starts, temperature, prompt_groups)
        if not self.remaining:
            return scored
        self.remaining -= 1
        from klservice.backends.base import Scored
        from klservice_client.kl import KLInputError

        if self.fault == "kl_input_error":
            raise KLInputError("ref_logprobs: has 7 tokens but lengths sum to 8")
        if self.fault == "one_too_few":
            return Scored([values[:-1] for values in scored.values])
        if self.fault == "integers":
            return Scored([np.zeros(len(values), np.int64) for values in scored.values])
        raise AssertionError(self.fault)


@pytest.mark.parametrize("rpc", ["Score", "ComputeKL"])
@pytest.mark.parametrize("fault", ["kl_input_error", "one_too_few", "integers"])
def test_a_backend_that_fails_or_answers_wrongly_is_internal_never_the_callers(start_server, tiny_model_dir, fault, rpc):
    """Only validation of the request may answer INVALID_ARGUMENT: a KLInputError raised inside a backend, or values
    that are not what was asked (one log-prob too few, not floats), are INTERNAL with the generic message."""
    from klservice.backends.hf import HFBackend
    from klservice.errors import INTERNAL_MESSAGE

    backend = MisbehavingOnce(HFBackend(tiny_model_dir, device="cpu", progress=False), fault)
    server = start_server(backend=backend, cache_mb=0)
    message = pb.ScoreRequest(batch=batch()) if rpc == "Score" else pb.KLRequest(
        batch=batch(), logprobs=to_tensor(np.full(4, -2.0, np.float32)))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ReferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            getattr(stub, rpc)(message, timeout=60)
        assert (failure.value.code(), failure.value.details()) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        reply = getattr(stub, rpc)(message, timeout=60)  # the server keeps serving
        assert len(reply.ref_logprobs.data) == 4 * 4
