from hilm_vllm.proto.hilm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OpenVerifierSessionRequest(_message.Message):
    __slots__ = ("prompt", "sampling", "max_tokens", "min_tokens", "stop_token_ids")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt: _common_pb2.Prompt
    sampling: _common_pb2.SamplingParams
    max_tokens: int
    min_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class OpenVerifierSessionResponse(_message.Message):
    __slots__ = ("session_id", "position", "eos_token_id", "vocab_size", "max_block", "prompt_token_ids", "eos_token_ids", "max_model_len", "other_sessions")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    OTHER_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    eos_token_id: int
    vocab_size: int
    max_block: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_model_len: int
    other_sessions: int
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_block: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., max_model_len: _Optional[int] = ..., other_sessions: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("session_id", "position", "append_token_ids", "draft_token_ids", "draft_dists", "return_target_probs", "return_emitted", "uncertainty", "rollback_to", "logprobs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    APPEND_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_TARGET_PROBS_FIELD_NUMBER: _ClassVar[int]
    RETURN_EMITTED_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_TO_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    append_token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_dists: _containers.RepeatedCompositeFieldContainer[_common_pb2.SparseDistribution]
    return_target_probs: bool
    return_emitted: bool
    uncertainty: _common_pb2.UncertaintyConfig
    rollback_to: int
    logprobs: int
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., append_token_ids: _Optional[_Iterable[int]] = ..., draft_token_ids: _Optional[_Iterable[int]] = ..., draft_dists: _Optional[_Iterable[_Union[_common_pb2.SparseDistribution, _Mapping]]] = ..., return_target_probs: _Optional[bool] = ..., return_emitted: _Optional[bool] = ..., uncertainty: _Optional[_Union[_common_pb2.UncertaintyConfig, _Mapping]] = ..., rollback_to: _Optional[int] = ..., logprobs: _Optional[int] = ...) -> None: ...

class EmittedToken(_message.Message):
    __slots__ = ("token_id", "uncertainty", "dist")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    DIST_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    uncertainty: float
    dist: _common_pb2.SparseDistribution
    def __init__(self, token_id: _Optional[int] = ..., uncertainty: _Optional[float] = ..., dist: _Optional[_Union[_common_pb2.SparseDistribution, _Mapping]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("num_accepted", "next_token_id", "position", "target_probs", "timings", "emitted", "logprobs")
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROBS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    EMITTED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    num_accepted: int
    next_token_id: int
    position: int
    target_probs: _containers.RepeatedScalarFieldContainer[float]
    timings: _common_pb2.Timings
    emitted: _containers.RepeatedCompositeFieldContainer[EmittedToken]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, num_accepted: _Optional[int] = ..., next_token_id: _Optional[int] = ..., position: _Optional[int] = ..., target_probs: _Optional[_Iterable[float]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., emitted: _Optional[_Iterable[_Union[EmittedToken, _Mapping]]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class CloseVerifierSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseVerifierSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
