"""Fixtures for the backend tests: tiny random models and the textbook log-prob computation.

Tests that need speed use tiny random models built from a config with a fixed seed and the
real SmolLM2 tokenizer (from the session's converted embedded model, `default_model_dir` in
tests/conftest.py); a few use SmolLM2 itself for real values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY_VOCAB = 49152  # SmolLM2's tokenizer, so ids from it are valid for the tiny models


def _save_tiny_model(folder: Path, config, tokenizer_from: Path, *, seed: int = 0, perturb: str | None = None) -> Path:
    """Build a random causal LM from `config` with a fixed seed and save it with the SmolLM2 tokenizer.

    `perturb` names one parameter to change by a small amount (to test that revisions follow content).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if perturb is not None:
        with torch.no_grad():
            model.get_parameter(perturb).view(-1)[0] += 1e-3
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder


def _tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=512,
        initializer_range=0.2,  # logits spread over several nats, so an off-by-one shows
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaConfig(**{**settings, **overrides})


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_dir) -> Path:
    return _save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), _tiny_llama_config(), default_model_dir)


@pytest.fixture(scope="session")
def tiny_backend(tiny_llama_dir):
    from klservice.backends.hf import HFBackend

    backend = HFBackend(tiny_llama_dir, progress=False)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def plain_model(tiny_llama_dir):
    """The tiny model loaded independently of the backend, for reference values."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _reference_log_probs(model, sequence: np.ndarray, start: int, temperature: float = 1.0) -> np.ndarray:
    """The textbook computation: full logits of one unpadded sequence → / T → log_softmax → gather."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.as_tensor(sequence)[None]).logits[0].float()
        log_probs = torch.log_softmax(logits / temperature, dim=-1)
        targets = torch.as_tensor(sequence[start:])
        return log_probs[torch.arange(start - 1, len(sequence) - 1), targets].numpy()


@pytest.fixture
def reference():
    """`reference(model, sequence, start, temperature)`: log-probs by a plain full-logits forward."""
    return _reference_log_probs


@pytest.fixture
def llama_config():
    """`llama_config(**overrides)`: the tiny Llama's config."""
    return _tiny_llama_config


@pytest.fixture
def make_tiny_model(tmp_path, default_model_dir):
    """`make_tiny_model(name, config, perturb=None)`: save a seeded random model + SmolLM2 tokenizer under tmp_path."""

    def make(name: str, config, perturb: str | None = None) -> Path:
        return _save_tiny_model(tmp_path / name, config, default_model_dir, perturb=perturb)

    return make
