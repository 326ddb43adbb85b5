"""klservice-client: the light client of klservice and the KL math it shares with the server.

- `KLClient` / `AsyncKLClient`: reference log-probs (`score`), KL values and gradient
  coefficients (`compute_kl`, or `stream_kl` for a stream of `KLItem`s) and the served
  model (`model_info`) from a klservice server.
- `klservice_client.kl`: KL estimator values and exact gradient coefficients of any KL
  implementation, on numpy arrays or torch tensors.

Only grpcio, protobuf and numpy are imported; torch is imported when a torch input is
seen or torch outputs are asked for.
"""

from klservice_client import kl
from klservice_client.client import (
    AsyncKLClient, KLClient, KLItem, KLOutput, KLStreamResult, ModelInfo, ScoreOutput, tokenizer_fingerprint,
)
from klservice_client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KLServiceError,
    ModelNotFound,
    PermissionDenied,
    RevisionMismatch,
    ServerError,
    ServiceOverloaded,
    ServiceUnavailable,
    TokenizerMismatch,
    TooLarge,
    Unauthenticated,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncKLClient",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "KLClient",
    "KLItem",
    "KLOutput",
    "KLServiceError",
    "KLStreamResult",
    "ModelInfo",
    "ModelNotFound",
    "PermissionDenied",
    "RevisionMismatch",
    "ScoreOutput",
    "ServerError",
    "ServiceOverloaded",
    "ServiceUnavailable",
    "TokenizerMismatch",
    "TooLarge",
    "Unauthenticated",
    "kl",
    "tokenizer_fingerprint",
]
