"""A vLLM-compatible HTTP route, for trainers that take their teacher as the URL of a vLLM server.

TRL's distillation trainers, prime-rl and SkyRL call a teacher's OpenAI-compatible completions API with
``prompt_logprobs`` (TRL: ``VLLMClient.get_sequence_logprobs``). `--http-port` answers them from the same
engine as gRPC (the same validation, fair scheduler and cache rules, the same authentication: a bearer token
in ``Authorization``, a tenant's job in ``x-job-id``; TLS where the gRPC port has it), on the server's own
event loop (aiohttp):

- ``GET /health``: 200 once a model is served, 503 before and while draining;
- ``GET /v1/models``: the served models, the default first (TRL takes the first);
- ``POST /v1/completions`` with ``prompt`` (token ids: one list, or a list of lists), ``prompt_logprobs`` = k
  (0 to 256) and ``max_tokens`` 0 or 1: nothing is generated (``text`` is empty); each choice's
  ``prompt_logprobs`` is vLLM's: ``null`` for the first token, then per position the k most likely tokens and
  the prompt's own token, ``{"<id>": {"logprob", "rank", "decoded_token"}}``, every log-prob over the whole
  vocabulary at the request's ``temperature`` (vLLM's own ignores it). A prompt token outside the top k gets
  rank k + 1 (vLLM gives its exact rank; clients sort by it); ``decoded_token`` is null.

Errors are vLLM's JSON (``{"object": "error", "message", "type", "code"}``) with the HTTP status of the gRPC code
the same failure gets (`HTTP_STATUS`; a request too large to answer is 413), and ``Retry-After`` when the queue is
full.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from typing import TYPE_CHECKING

import grpc
import numpy as np

from klservice.backends.base import MAX_TOP_K
from klservice.config import bare_host
from klservice.errors import InvalidInput, Overloaded, TooLarge, logged_status
from klservice.validation import parse_score_request
from klservice_client.wire import JOB_METADATA_KEY, pb, to_tensor

if TYPE_CHECKING:
    from klservice.config import ServerConfig
    from klservice.service import ReferenceService

log = logging.getLogger(__name__)

HTTP_STATUS = {  # a request too large to answer is 413 (splitting helps), not 429 (which clients wait out)
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
}
"""The HTTP status of each gRPC status code the service answers with."""


class HttpRoute:
    """The HTTP listener of `--http-port` (`start` on the server's event loop, `stop` when it stops)."""

    def __init__(self, service: "ReferenceService", config: "ServerConfig"):
        self._service, self._config = service, config
        self._runner = None
        self.port: int | None = None

    async def start(self) -> int:
        from aiohttp import web

        app = web.Application(client_max_size=self._config.max_message_bytes)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, bare_host(self._config.host), self._config.http_port, ssl_context=self._ssl())
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # aiohttp exposes the bound port only here
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _ssl(self) -> ssl.SSLContext | None:
        config = self._config
        if not config.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca:
            context.load_verify_locations(config.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    # -- routes ------------------------------------------------------------------------------

    async def _health(self, request):
        from aiohttp import web

        ready = self._service.ready  # 503 while loading and while draining
        return web.json_response({"status": "ok" if ready else "unavailable"}, status=200 if ready else 503)

    async def _models(self, request):
        from aiohttp import web

        try:
            served = self._service.list_models(self._job(request))
        except Exception as error:  # noqa: BLE001 - answered in vLLM's error shape
            return _error(error)
        return web.json_response({"object": "list", "data": [
            {"id": info.name, "object": "model", "created": 0, "owned_by": "klservice", "root": info.name,
             "max_model_len": info.max_length} for info in served]})

    async def _completions(self, request):
        from aiohttp import web

        started = time.perf_counter()
        try:
            job = self._job(request)
            try:
                body = await request.json()
            except ValueError:
                raise InvalidInput("body: not JSON") from None
            except web.HTTPRequestEntityTooLarge:
                raise TooLarge(f"body: over this server's message limit of {self._config.max_message_bytes} bytes "
                               "(--max-message-mb); send fewer prompts per request") from None
            sequences, top_k, temperature, model = _completion_request(body)
            with self._service.lease(model) as served:
                message = pb.ScoreRequest(
                    model=model, temperature=temperature, top_k=top_k, batch=pb.SequenceBatch(
                        token_ids=to_tensor(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])),
                        lengths=to_tensor(np.array([len(s) for s in sequences], dtype=np.int64)),
                        prompt_lengths=to_tensor(np.ones(len(sequences), dtype=np.int64)),
                    ))
                parsed = parse_score_request(message, served.limits)
                result = await self._service.score(parsed, job, None, served)
        except Exception as error:  # noqa: BLE001 - answered in vLLM's error shape, with the gRPC code's status
            return _error(error)
        finally:
            self._service.metrics.latency.labels("HTTPCompletions").observe(time.perf_counter() - started)
        choices = _choices(sequences, result, top_k)
        tokens = parsed.batch.num_tokens
        return web.json_response({
            "id": f"cmpl-klservice-{int(time.time() * 1000)}", "object": "text_completion", "created": int(time.time()),
            "model": result.model.name, "choices": choices,
            "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens},
        })

    def _job(self, request):
        """The caller's job, authenticated as on gRPC (bearer token; with mTLS, the client certificate)."""
        certificate_name = None
        peer_certificate = request.transport.get_extra_info("peercert") if request.transport else None
        if peer_certificate:
            for entry in peer_certificate.get("subject", ()):
                for key, value in entry:
                    if key == "commonName":
                        certificate_name = value
        peer = request.remote
        return self._service.job(request.headers.get(JOB_METADATA_KEY), f"http:{peer}",
                                 request.headers.get("Authorization"), certificate_name)


def _completion_request(body) -> tuple[list[list[int]], int, float, str]:
    """(prompts as token-id lists, k, temperature, model name) of a completions request; InvalidInput naming the
    field otherwise."""
    if not isinstance(body, dict):
        raise InvalidInput("body: expected a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    if not (isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) and -(1 << 62) < x < 1 << 62
                                              for x in p) for p in prompt)):
        raise InvalidInput("prompt: expected token ids (a list of ints, or a list of such lists); this route does not "
                           "tokenize text")
    top_k = body.get("prompt_logprobs")
    if top_k is None or not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= MAX_TOP_K:
        raise InvalidInput(f"prompt_logprobs: expected a whole number from 0 to {MAX_TOP_K} (this route scores prompts "
                           "only)")
    max_tokens = body.get("max_tokens", 1)
    if max_tokens not in (0, 1, None):
        raise InvalidInput(f"max_tokens: {max_tokens}; this route scores prompts and generates nothing (0 or 1)")
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not abs(temperature) < 1e300:
        raise InvalidInput("temperature: expected a number")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise InvalidInput("model: expected a string")
    return prompt, top_k, float(temperature), model


def _choices(sequences: list[list[int]], result, top_k: int) -> list[dict]:
    """vLLM's choices: per prompt, null for its first token, then the top k and the prompt's own token."""
    actual = result.ref_logprobs.astype(np.float64).tolist()  # one row per scored token, the sequences in order
    ids = result.teacher.top_ids.tolist() if top_k else None
    values = result.teacher.top_logprobs.astype(np.float64).tolist() if top_k else None
    choices, row = [], 0
    for index, sequence in enumerate(sequences):
        positions: list = [None]
        for token in sequence[1:]:
            entry = {}
            if top_k:
                for rank, (top, logprob) in enumerate(zip(ids[row], values[row]), start=1):
                    entry[str(top)] = {"logprob": logprob, "rank": rank, "decoded_token": None}
            own = str(token)
            if own not in entry:
                entry[own] = {"logprob": actual[row], "rank": top_k + 1, "decoded_token": None}
            positions.append(entry)
            row += 1
        choices.append({"index": index, "text": "", "logprobs": None, "finish_reason": "length",
                        "stop_reason": None, "prompt_logprobs": positions})
    return choices


def _error(error: BaseException):
    from aiohttp import web

    code, message = logged_status(error)
    status = 413 if isinstance(error, TooLarge) else HTTP_STATUS.get(code, 500)
    headers = {}
    if isinstance(error, Overloaded) and error.retry_after:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return web.json_response({"object": "error", "message": message, "type": code.name, "param": None,
                              "code": status}, status=status, headers=headers)
