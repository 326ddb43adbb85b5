"""Fixtures for the TRL integration: real GRPOTrainers on the tiny Llama, a real klservice server."""

from __future__ import annotations

import os

import pytest

from tests.trl.trl_helpers import BETA, PROMPTS, TEMPERATURE

if os.environ.get("CI") == "true":
    import trl  # noqa: F401  (CI must run these tests: a missing TRL is an error, not a skip)
else:
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'klservice-client[trl]')")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS * 4})


@pytest.fixture(scope="module")
def grpo_config(tmp_path_factory, tokenizer):
    """GRPOConfig factory: float32 on CPU, 4 prompts x 4 generations of up to 8 tokens.

    The sampling bias on EOS makes completions end at different lengths (right padding); the
    prompts' different lengths give left padding.
    """
    from trl import GRPOConfig

    def make(**overrides):
        settings = dict(
            output_dir=str(tmp_path_factory.mktemp("grpo")),
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=8,
            beta=BETA,
            temperature=TEMPERATURE,
            bf16=False,
            use_cpu=True,
            report_to=[],
            logging_steps=1,
            max_steps=1,
            seed=0,
            generation_kwargs={"sequence_bias": [[[tokenizer.eos_token_id], 6.0]]},
        )
        settings.update(overrides)
        return GRPOConfig(**settings)

    return make


@pytest.fixture(scope="module")
def trl_server(start_server):
    """A real klservice server on the tiny model (hf backend)."""
    return start_server()
