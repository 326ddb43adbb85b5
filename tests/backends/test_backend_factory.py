"""load_backend picks a backend by name, resolves the model, and stays light to import."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from klservice.backends import KNOWN_BACKENDS, load_backend
from klservice.config import ServerConfig


def test_importing_the_package_does_not_import_torch():
    code = (
        "import sys, json, klservice.backends, klservice.default_model; "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="known backends: hf"):
        load_backend(ServerConfig(backend="tensorrt"))
    assert "hf" in KNOWN_BACKENDS


def test_missing_folder_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_backend(ServerConfig(model=str(tmp_path / "nope")))


def test_uncached_hub_id_is_not_downloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_backend(ServerConfig(model="klservice-tests/not-a-cached-model"))


def test_loads_a_local_folder(tiny_llama_dir, tiny_backend):
    backend = load_backend(ServerConfig(model=str(tiny_llama_dir), device="auto", max_length=64), progress=False)
    info = backend.info()
    assert (info.name, info.backend, info.device, info.max_length) == (tiny_llama_dir.name, "hf", "cpu", 64)
    sequence = np.arange(10, 40, dtype=np.int64)
    (got,), (want,) = backend.score([sequence], [5]).values, tiny_backend.score([sequence], [5]).values
    np.testing.assert_array_equal(got, want)


def test_no_model_means_the_embedded_one(default_model_dir):
    backend = load_backend(ServerConfig(cache_dir=str(default_model_dir.parent)), progress=False)
    info = backend.info()
    assert info.name == "SmolLM2-135M-Instruct (embedded)"
    assert (info.vocab_size, info.max_length, info.eos_token_id) == (49152, 8192, 2)


def test_no_share_prompts_reaches_the_backend(tiny_llama_dir):
    """`klservice serve --no-share-prompts`: every sequence is forwarded whole (no tokens saved), same values."""
    from klservice.cli import build_parser

    parser = build_parser()
    assert ServerConfig.from_cli_args(parser.parse_args(["serve"])).share_prompts
    config = ServerConfig.from_cli_args(parser.parse_args(["serve", "--no-share-prompts", "--model", str(tiny_llama_dir)]))
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, 49152, size=20)
    sequences = [np.concatenate([prompt, rng.integers(0, 49152, size=n)]) for n in (4, 9)]
    scored = {}
    for share, server_config in ((True, ServerConfig(model=str(tiny_llama_dir))), (False, config)):
        scored[share] = load_backend(server_config, progress=False).score(sequences, [20, 20])
    assert scored[True].tokens_saved == 20 and scored[False].tokens_saved == 0
    for shared, whole in zip(scored[True].values, scored[False].values):
        np.testing.assert_allclose(shared, whole, atol=1e-5, rtol=0)


def test_attention_kernel_reaches_the_backend(tiny_llama_dir):
    """`klservice serve --attention-kernel none`: calls run padded, prompts not shared; by default the load-time
    check picks a kernel (on a CPU, sdpa) and calls run packed."""
    from klservice.cli import build_parser

    parser = build_parser()
    assert ServerConfig.from_cli_args(parser.parse_args(["serve"])).attention_kernel == "auto"
    config = ServerConfig.from_cli_args(
        parser.parse_args(["serve", "--attention-kernel", "none", "--model", str(tiny_llama_dir)]))
    padded = load_backend(config, progress=False)
    assert padded.kernel is None and not padded.packs
    packed = load_backend(ServerConfig(model=str(tiny_llama_dir)), progress=False)
    assert packed.kernel == "sdpa" and packed.packs
