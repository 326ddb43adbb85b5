from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]

class Estimator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ESTIMATOR_UNSPECIFIED: _ClassVar[Estimator]
    ESTIMATOR_K1: _ClassVar[Estimator]
    ESTIMATOR_K2: _ClassVar[Estimator]
    ESTIMATOR_K3: _ClassVar[Estimator]

class KLMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KL_MODE_UNSPECIFIED: _ClassVar[KLMode]
    KL_MODE_IN_REWARD: _ClassVar[KLMode]
    KL_MODE_AS_LOSS: _ClassVar[KLMode]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_UNSPECIFIED: _ClassVar[Aggregation]
    AGGREGATION_TOKEN: _ClassVar[Aggregation]
    AGGREGATION_SEQUENCE: _ClassVar[Aggregation]
    AGGREGATION_REWARD_TO_GO: _ClassVar[Aggregation]

class ImportanceSampling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMPORTANCE_SAMPLING_UNSPECIFIED: _ClassVar[ImportanceSampling]
    IMPORTANCE_SAMPLING_NONE: _ClassVar[ImportanceSampling]
    IMPORTANCE_SAMPLING_TOKEN: _ClassVar[ImportanceSampling]
    IMPORTANCE_SAMPLING_SEQUENCE: _ClassVar[ImportanceSampling]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
ESTIMATOR_UNSPECIFIED: Estimator
ESTIMATOR_K1: Estimator
ESTIMATOR_K2: Estimator
ESTIMATOR_K3: Estimator
KL_MODE_UNSPECIFIED: KLMode
KL_MODE_IN_REWARD: KLMode
KL_MODE_AS_LOSS: KLMode
AGGREGATION_UNSPECIFIED: Aggregation
AGGREGATION_TOKEN: Aggregation
AGGREGATION_SEQUENCE: Aggregation
AGGREGATION_REWARD_TO_GO: Aggregation
IMPORTANCE_SAMPLING_UNSPECIFIED: ImportanceSampling
IMPORTANCE_SAMPLING_NONE: ImportanceSampling
IMPORTANCE_SAMPLING_TOKEN: ImportanceSampling
IMPORTANCE_SAMPLING_SEQUENCE: ImportanceSampling

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "path", "backend", "dtype", "device", "max_length", "force", "mixup_alpha")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    MIXUP_ALPHA_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    backend: str
    dtype: str
    device: str
    max_length: int
    force: bool
    mixup_alpha: float
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., backend: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_length: _Optional[int] = ..., force: _Optional[bool] = ..., mixup_alpha: _Optional[float] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ReloadAuthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadAuthResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SequenceBatch(_message.Message):
    __slots__ = ("token_ids", "lengths", "prompt_lengths")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    token_ids: Tensor
    lengths: Tensor
    prompt_lengths: Tensor
    def __init__(self, token_ids: _Optional[_Union[Tensor, _Mapping]] = ..., lengths: _Optional[_Union[Tensor, _Mapping]] = ..., prompt_lengths: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "revision", "generation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    revision: str
    generation: int
    def __init__(self, name: _Optional[str] = ..., revision: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "model", "batch", "temperature", "revision", "top_k", "candidate_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    batch: SequenceBatch
    temperature: float
    revision: str
    top_k: int
    candidate_ids: Tensor
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., batch: _Optional[_Union[SequenceBatch, _Mapping]] = ..., temperature: _Optional[float] = ..., revision: _Optional[str] = ..., top_k: _Optional[int] = ..., candidate_ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "model", "ref_logprobs", "scored_lengths", "top_ids", "top_logprobs", "candidate_logprobs", "rest_logmass")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REF_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SCORED_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REST_LOGMASS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: ModelRef
    ref_logprobs: Tensor
    scored_lengths: Tensor
    top_ids: Tensor
    top_logprobs: Tensor
    candidate_logprobs: Tensor
    rest_logmass: Tensor
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., ref_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., scored_lengths: _Optional[_Union[Tensor, _Mapping]] = ..., top_ids: _Optional[_Union[Tensor, _Mapping]] = ..., top_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., candidate_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., rest_logmass: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class KLSpec(_message.Message):
    __slots__ = ("preset", "estimator", "mode", "aggregation", "importance_sampling", "truncation", "differentiable_weight")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIABLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    preset: str
    estimator: Estimator
    mode: KLMode
    aggregation: Aggregation
    importance_sampling: ImportanceSampling
    truncation: float
    differentiable_weight: bool
    def __init__(self, preset: _Optional[str] = ..., estimator: _Optional[_Union[Estimator, str]] = ..., mode: _Optional[_Union[KLMode, str]] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ..., importance_sampling: _Optional[_Union[ImportanceSampling, str]] = ..., truncation: _Optional[float] = ..., differentiable_weight: _Optional[bool] = ...) -> None: ...

class KLRequest(_message.Message):
    __slots__ = ("request_id", "model", "batch", "temperature", "logprobs", "old_logprobs", "spec", "revision", "top_k", "candidate_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    OLD_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    batch: SequenceBatch
    temperature: float
    logprobs: Tensor
    old_logprobs: Tensor
    spec: KLSpec
    revision: str
    top_k: int
    candidate_ids: Tensor
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., batch: _Optional[_Union[SequenceBatch, _Mapping]] = ..., temperature: _Optional[float] = ..., logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., old_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., spec: _Optional[_Union[KLSpec, _Mapping]] = ..., revision: _Optional[str] = ..., top_k: _Optional[int] = ..., candidate_ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class KLDiagnostics(_message.Message):
    __slots__ = ("num_sequences", "num_tokens", "k1_mean_per_token", "k2_mean_per_token", "k3_mean_per_token", "k1_mean_per_sequence", "k2_mean_per_sequence", "k3_mean_per_sequence", "is_weight_mean", "is_weight_max", "is_truncated_fraction", "coef_bias_mean", "coef_bias_abs_mean", "num_clamped")
    NUM_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    K1_MEAN_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    K2_MEAN_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    K3_MEAN_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    K1_MEAN_PER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    K2_MEAN_PER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    K3_MEAN_PER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    IS_WEIGHT_MEAN_FIELD_NUMBER: _ClassVar[int]
    IS_WEIGHT_MAX_FIELD_NUMBER: _ClassVar[int]
    IS_TRUNCATED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    COEF_BIAS_MEAN_FIELD_NUMBER: _ClassVar[int]
    COEF_BIAS_ABS_MEAN_FIELD_NUMBER: _ClassVar[int]
    NUM_CLAMPED_FIELD_NUMBER: _ClassVar[int]
    num_sequences: int
    num_tokens: int
    k1_mean_per_token: float
    k2_mean_per_token: float
    k3_mean_per_token: float
    k1_mean_per_sequence: float
    k2_mean_per_sequence: float
    k3_mean_per_sequence: float
    is_weight_mean: float
    is_weight_max: float
    is_truncated_fraction: float
    coef_bias_mean: float
    coef_bias_abs_mean: float
    num_clamped: int
    def __init__(self, num_sequences: _Optional[int] = ..., num_tokens: _Optional[int] = ..., k1_mean_per_token: _Optional[float] = ..., k2_mean_per_token: _Optional[float] = ..., k3_mean_per_token: _Optional[float] = ..., k1_mean_per_sequence: _Optional[float] = ..., k2_mean_per_sequence: _Optional[float] = ..., k3_mean_per_sequence: _Optional[float] = ..., is_weight_mean: _Optional[float] = ..., is_weight_max: _Optional[float] = ..., is_truncated_fraction: _Optional[float] = ..., coef_bias_mean: _Optional[float] = ..., coef_bias_abs_mean: _Optional[float] = ..., num_clamped: _Optional[int] = ...) -> None: ...

class KLResponse(_message.Message):
    __slots__ = ("request_id", "model", "ref_logprobs", "k1", "k2", "k3", "coef", "coef_principled", "scored_lengths", "diagnostics", "spec", "top_ids", "top_logprobs", "candidate_logprobs", "rest_logmass")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REF_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    K1_FIELD_NUMBER: _ClassVar[int]
    K2_FIELD_NUMBER: _ClassVar[int]
    K3_FIELD_NUMBER: _ClassVar[int]
    COEF_FIELD_NUMBER: _ClassVar[int]
    COEF_PRINCIPLED_FIELD_NUMBER: _ClassVar[int]
    SCORED_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REST_LOGMASS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: ModelRef
    ref_logprobs: Tensor
    k1: Tensor
    k2: Tensor
    k3: Tensor
    coef: Tensor
    coef_principled: Tensor
    scored_lengths: Tensor
    diagnostics: KLDiagnostics
    spec: str
    top_ids: Tensor
    top_logprobs: Tensor
    candidate_logprobs: Tensor
    rest_logmass: Tensor
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., ref_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., k1: _Optional[_Union[Tensor, _Mapping]] = ..., k2: _Optional[_Union[Tensor, _Mapping]] = ..., k3: _Optional[_Union[Tensor, _Mapping]] = ..., coef: _Optional[_Union[Tensor, _Mapping]] = ..., coef_principled: _Optional[_Union[Tensor, _Mapping]] = ..., scored_lengths: _Optional[_Union[Tensor, _Mapping]] = ..., diagnostics: _Optional[_Union[KLDiagnostics, _Mapping]] = ..., spec: _Optional[str] = ..., top_ids: _Optional[_Union[Tensor, _Mapping]] = ..., top_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., candidate_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., rest_logmass: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class StreamKLResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: KLResponse
    error: RequestError
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[KLResponse, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "revision", "tokenizer_fingerprint", "backend", "dtype", "device", "vocab_size", "max_length", "bos_token_id", "eos_token_id", "pad_token_id", "max_request_tokens", "max_message_bytes", "server_version", "generation", "path", "mixup_alpha", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MIXUP_ALPHA_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    revision: str
    tokenizer_fingerprint: str
    backend: str
    dtype: str
    device: str
    vocab_size: int
    max_length: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    max_request_tokens: int
    max_message_bytes: int
    server_version: str
    generation: int
    path: str
    mixup_alpha: float
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., revision: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., backend: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_length: _Optional[int] = ..., bos_token_id: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., pad_token_id: _Optional[int] = ..., max_request_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., server_version: _Optional[str] = ..., generation: _Optional[int] = ..., path: _Optional[str] = ..., mixup_alpha: _Optional[float] = ..., is_default: _Optional[bool] = ...) -> None: ...
