"""Score over a real server equals an independent plain transformers forward."""

from __future__ import annotations

import numpy as np
import pytest


def reference_logprobs(model_dir, sequences, prompt_lengths, temperature):
    """Full logits -> / temperature -> log_softmax -> gather, one sequence at a time, float64 softmax."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for tokens, start in zip(sequences, prompt_lengths):
            ids = torch.as_tensor(tokens)[None]
            logits = model(ids).logits[0].double() / temperature
            logp = torch.log_softmax(logits, dim=-1)
            positions = torch.arange(start, len(tokens))
            out.append(logp[positions - 1, ids[0, positions]].numpy())
    return out


@pytest.fixture(scope="module")
def ragged_batch():
    rng = np.random.default_rng(1)
    lengths = [2, 9, 37, 120, 64, 255]
    prompts = [1, 3, 36, 40, 64, 100]  # includes a sequence with no scored token (64 == 64)
    sequences = [rng.integers(0, 49152, size=n).tolist() for n in lengths]
    return sequences, prompts


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_matches_plain_transformers(client, tiny_model_dir, ragged_batch, temperature):
    sequences, prompts = ragged_batch
    out = client.score(sequences, prompts, temperature=temperature)
    expected = reference_logprobs(tiny_model_dir, sequences, prompts, temperature)
    assert [len(x) for x in out.ragged("ref_logprobs")] == [len(e) for e in expected]
    for got, want in zip(out.ragged("ref_logprobs"), expected):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert out.ref_logprobs.dtype == np.float32


def test_temperature_changes_values(client, ragged_batch):
    sequences, prompts = ragged_batch
    hot = client.score(sequences, prompts, temperature=2.0).ref_logprobs
    cold = client.score(sequences, prompts, temperature=1.0).ref_logprobs
    assert np.abs(hot - cold).max() > 1e-3


def test_model_info_describes_the_model(client, tiny_model_dir):
    from transformers import AutoTokenizer

    from klservice_client import tokenizer_fingerprint

    info = client.model_info()
    assert info.vocab_size == 49152
    assert info.max_length == 512
    assert info.backend == "hf" and info.dtype == "float32" and info.device == "cpu"
    assert len(info.revision) == 64
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    client.check_tokenizer(tokenizer)


def test_check_tokenizer_detects_a_different_vocabulary(client):
    from klservice_client import TokenizerMismatch

    class OtherTokenizer:
        def get_vocab(self):
            return {"a": 0, "b": 1}

    with pytest.raises(TokenizerMismatch):
        client.check_tokenizer(OtherTokenizer())


def test_padded_and_ragged_views_agree(client, ragged_batch):
    sequences, prompts = ragged_batch
    out = client.score(sequences, prompts)
    padded, mask = out.padded("ref_logprobs", pad_value=np.nan)
    assert padded.shape == (len(sequences), max(len(s) - p for s, p in zip(sequences, prompts)))
    for row, m, part in zip(padded, mask, out.ragged("ref_logprobs")):
        np.testing.assert_array_equal(row[m], part)
        assert np.isnan(row[~m]).all()
