from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class TrainingRoundTask(_message.Message):
    __slots__ = ("run_id", "round", "site", "dataset_version_id", "global_weights_uri", "training_config_uri", "local_epochs", "fedprox_mu", "task_attempt_id", "dp_clip_norm", "schedule_offset", "schedule_total", "keep_optimizer_state", "local_norm_layers")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    DATASET_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_WEIGHTS_URI_FIELD_NUMBER: _ClassVar[int]
    TRAINING_CONFIG_URI_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    FEDPROX_MU_FIELD_NUMBER: _ClassVar[int]
    TASK_ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KEEP_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_NORM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    site: str
    dataset_version_id: str
    global_weights_uri: str
    training_config_uri: str
    local_epochs: int
    fedprox_mu: float
    task_attempt_id: str
    dp_clip_norm: float
    schedule_offset: int
    schedule_total: int
    keep_optimizer_state: bool
    local_norm_layers: bool
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., site: _Optional[str] = ..., dataset_version_id: _Optional[str] = ..., global_weights_uri: _Optional[str] = ..., training_config_uri: _Optional[str] = ..., local_epochs: _Optional[int] = ..., fedprox_mu: _Optional[float] = ..., task_attempt_id: _Optional[str] = ..., dp_clip_norm: _Optional[float] = ..., schedule_offset: _Optional[int] = ..., schedule_total: _Optional[int] = ..., keep_optimizer_state: _Optional[bool] = ..., local_norm_layers: _Optional[bool] = ...) -> None: ...

class ModelUpdate(_message.Message):
    __slots__ = ("run_id", "round", "site", "task_attempt_id", "weights_uri", "num_samples", "metrics", "finished_at", "clip_norm")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    TASK_ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_URI_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    site: str
    task_attempt_id: str
    weights_uri: str
    num_samples: int
    metrics: _containers.ScalarMap[str, float]
    finished_at: str
    clip_norm: float
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., site: _Optional[str] = ..., task_attempt_id: _Optional[str] = ..., weights_uri: _Optional[str] = ..., num_samples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., finished_at: _Optional[str] = ..., clip_norm: _Optional[float] = ...) -> None: ...
