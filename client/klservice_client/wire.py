"""The wire format of klservice, shared by the client and the server.

- `pb` / `pb_grpc`: the generated messages and stubs of ``proto/klservice/v1/klservice.proto``
  (package ``klservice.v1``);
- `to_tensor` / `from_tensor` (`klservice_client.tensors`): per-token arrays as packed
  little-endian bytes with a dtype and shape;
- `spec_to_proto` / `spec_from_proto` and `diagnostics_to_proto` / `diagnostics_from_proto`:
  the KL library's `KLSpec` and `KLDiagnostics` as messages;
- `ModelInfo` with `model_info_to_proto` / `model_info_from_proto`: the served model, as
  GetModelInfo describes it (a backend fills the model's fields, the server the limits);
- `JOB_METADATA_KEY` and `RETRY_AFTER_METADATA_KEY`: the metadata both sides read.

A program speaking to klservice with its own stubs, or a server of the same contract, builds
on these; `KLClient` and the klservice server do.
"""

from __future__ import annotations

import dataclasses
import re

from klservice_client import kl
from klservice_client._proto import klservice_pb2 as pb
from klservice_client._proto import klservice_pb2_grpc as pb_grpc
from klservice_client.tensors import TensorError, from_tensor, to_tensor

__all__ = [
    "JOB_METADATA_KEY",
    "MODEL_NAME_PATTERN",
    "MODEL_NAME_RULE",
    "ModelInfo",
    "RETRY_AFTER_METADATA_KEY",
    "TensorError",
    "diagnostics_from_proto",
    "diagnostics_to_proto",
    "from_tensor",
    "model_info_from_proto",
    "model_info_to_proto",
    "request_bytes",
    "response_bytes",
    "pb",
    "pb_grpc",
    "spec_from_proto",
    "spec_to_proto",
    "to_tensor",
]

JOB_METADATA_KEY = "x-job-id"
"""Request metadata naming the caller's job: the server's unit of fairness and its per-job metric label."""
RETRY_AFTER_METADATA_KEY = "retry-after-ms"
"""Trailing metadata of a RESOURCE_EXHAUSTED answer: milliseconds the server expects its backlog to take."""

MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
"""What a model name given to a server (``--model NAME=PATH``, LoadModel) may look like: a bounded metric label,
not a path (``.``, ``..`` and hidden names are not names)."""
MODEL_NAME_RULE = "use 1-64 letters, digits, '_', '.' or '-', the first a letter, a digit or '_'"
"""How `MODEL_NAME_PATTERN` is said to whoever gave a name that does not match it."""

MESSAGE_OVERHEAD_BYTES = 4096
"""Bound on what a request or response holds besides its arrays: ids, model name and revision, spec, diagnostics."""


def request_bytes(num_sequences: int, num_tokens: int, num_scored: int, *, logprob_arrays: int = 0,
                  candidates: int = 0) -> int:
    """Upper bound on a Score or ComputeKL request's size: int64 token ids, lengths and prompt lengths,
    `logprob_arrays` float64 arrays over the scored tokens (1 with logprobs, 2 with old_logprobs too), and
    `candidates` int64 candidate ids per scored token."""
    return MESSAGE_OVERHEAD_BYTES + 8 * num_tokens + 16 * num_sequences + 8 * (logprob_arrays + candidates) * num_scored


def response_bytes(num_sequences: int, num_scored: int, *, kl: bool, itemsize: int = 8, top_k: int = 0,
                   candidates: int = 0) -> int:
    """Upper bound on a response's size: Score sends float32 reference log-probs (and, asked, int32 top ids with
    float32 log-probs, float32 candidate log-probs and the float32 rest of the mass); ComputeKL adds k1, k2, k3,
    coef and coef_principled in the dtype of the request's log-probs (`itemsize` bytes each: 4 for float32,
    8 for float64); both send int64 scored lengths."""
    per_token = 4 + (5 * itemsize if kl else 0) + 8 * top_k + 4 * candidates + (4 if top_k or candidates else 0)
    return MESSAGE_OVERHEAD_BYTES + per_token * num_scored + 8 * num_sequences


_ESTIMATORS = {pb.ESTIMATOR_K1: kl.Estimator.K1, pb.ESTIMATOR_K2: kl.Estimator.K2, pb.ESTIMATOR_K3: kl.Estimator.K3}
_MODES = {pb.KL_MODE_IN_REWARD: kl.Mode.IN_REWARD, pb.KL_MODE_AS_LOSS: kl.Mode.AS_LOSS}
_AGGREGATIONS = {
    pb.AGGREGATION_TOKEN: kl.Aggregation.TOKEN,
    pb.AGGREGATION_SEQUENCE: kl.Aggregation.SEQUENCE,
    pb.AGGREGATION_REWARD_TO_GO: kl.Aggregation.REWARD_TO_GO,
}
_SAMPLING = {
    pb.IMPORTANCE_SAMPLING_NONE: kl.ImportanceSampling.NONE,
    pb.IMPORTANCE_SAMPLING_TOKEN: kl.ImportanceSampling.TOKEN,
    pb.IMPORTANCE_SAMPLING_SEQUENCE: kl.ImportanceSampling.SEQUENCE,
}


def _inverse(table):
    return {value: key for key, value in table.items()}


def spec_to_proto(spec: kl.KLSpec | str | None) -> pb.KLSpec:
    """A preset name travels as its name; a KLSpec field by field; None as an empty spec (principled)."""
    if spec is None:
        return pb.KLSpec()
    if isinstance(spec, str):
        kl.resolve_spec(spec)  # fail early, on the client, for an unknown preset
        return pb.KLSpec(preset=spec)
    message = pb.KLSpec(
        estimator=_inverse(_ESTIMATORS)[spec.estimator],
        mode=_inverse(_MODES)[spec.mode],
        aggregation=_inverse(_AGGREGATIONS)[spec.aggregation],
        importance_sampling=_inverse(_SAMPLING)[spec.importance_sampling],
        differentiable_weight=spec.differentiable_weight,
    )
    if spec.truncation is not None:
        message.truncation = spec.truncation
    return message


def _enum(table, value, field, enum_type):
    if value == 0:
        return None
    try:
        return table[value]
    except KeyError:
        raise kl.KLInputError(f"spec.{field}: unknown value {value} for {enum_type}") from None


def spec_from_proto(message: pb.KLSpec) -> kl.KLSpec:
    """The KLSpec a message asks for. Raises kl.KLInputError naming the field for anything invalid."""
    fields = {
        "estimator": _enum(_ESTIMATORS, message.estimator, "estimator", "Estimator"),
        "mode": _enum(_MODES, message.mode, "mode", "KLMode"),
        "aggregation": _enum(_AGGREGATIONS, message.aggregation, "aggregation", "Aggregation"),
        "importance_sampling": _enum(_SAMPLING, message.importance_sampling, "importance_sampling", "ImportanceSampling"),
        "truncation": message.truncation if message.HasField("truncation") else None,
        "differentiable_weight": message.differentiable_weight or None,
    }
    explicit = {name: value for name, value in fields.items() if value is not None}
    if message.preset:
        if explicit:
            raise kl.KLInputError(f"spec: preset {message.preset!r} given together with {', '.join(sorted(explicit))}; use one or the other")
        return kl.resolve_spec(message.preset)
    return kl.KLSpec(**explicit)


def diagnostics_to_proto(diagnostics: kl.KLDiagnostics) -> pb.KLDiagnostics:
    return pb.KLDiagnostics(**dataclasses.asdict(diagnostics))


def diagnostics_from_proto(message: pb.KLDiagnostics) -> kl.KLDiagnostics:
    return kl.KLDiagnostics(**{f.name: getattr(message, f.name) for f in dataclasses.fields(kl.KLDiagnostics)})


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The served model, as GetModelInfo describes it; every response quotes `name` and `revision`.

    Example::

        ModelInfo(name="SmolLM2-135M-Instruct (embedded)", revision="3f0c…", tokenizer_fingerprint="9a1e…",
                  backend="hf", dtype="float32", device="cpu", vocab_size=49152, max_length=8192,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, max_request_tokens=1048576,
                  max_message_bytes=268435456, server_version="0.1.0")
    """

    name: str
    """What the operator asked for: a folder, a hub id, or "SmolLM2-135M-Instruct (embedded)"."""
    revision: str
    """sha256 hex over the weights, config and tokenizer files: equal revisions give equal log-probs."""
    tokenizer_fingerprint: str
    """sha256 hex of the tokenizer's vocabulary and special tokens (`klservice_client.tokenizer_fingerprint`),
    so a trainer can check that its token ids mean the same to the reference model."""
    backend: str
    """Backend name, e.g. "hf"."""
    dtype: str
    """Compute dtype: "float32", "bfloat16" or "float16"."""
    device: str
    """Where the model runs: "cpu", "cuda:0", ..."""
    vocab_size: int
    """Rows of the LM head: valid token ids are 0 .. vocab_size - 1 (may exceed the tokenizer's size)."""
    max_length: int
    """Longest sequence accepted, in tokens."""
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    max_request_tokens: int | None = None
    """Most tokens (all sequences together) in one request. None in a backend's info: the server sets it."""
    max_message_bytes: int | None = None
    """Largest message the server sends or receives. None in a backend's info: the server sets it."""
    server_version: str | None = None
    """The klservice version serving it. None in a backend's info: the server sets it."""
    generation: int | None = None
    """How many times a checkpoint was loaded under `name` (1 for the one loaded at start); with `revision`,
    which reference answered. None in a backend's info: the server sets it."""
    path: str | None = None
    """The folder this revision was loaded from (for a mixed revision, the one mixed in)."""
    mixup_alpha: float | None = None
    """For a revision loaded with LoadModel's mixup_alpha: (1 - alpha) * previous + alpha * new weights."""
    is_default: bool | None = None
    """Whether an empty model name means this model. None in a backend's info: the server sets it."""


_OPTIONAL_INFO_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "mixup_alpha")


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(ModelInfo)}
    return pb.ModelInfo(**{name: value for name, value in fields.items() if value is not None})


def model_info_from_proto(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(**{
        f.name: getattr(message, f.name) if f.name not in _OPTIONAL_INFO_FIELDS or message.HasField(f.name) else None
        for f in dataclasses.fields(ModelInfo)
    })
