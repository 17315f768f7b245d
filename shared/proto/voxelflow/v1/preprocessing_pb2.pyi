from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PreprocessingJob(_message.Message):
    __slots__ = ("job_id", "dataset_version_id", "pipeline_hash", "case_ids")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_HASH_FIELD_NUMBER: _ClassVar[int]
    CASE_IDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    dataset_version_id: str
    pipeline_hash: str
    case_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., dataset_version_id: _Optional[str] = ..., pipeline_hash: _Optional[str] = ..., case_ids: _Optional[_Iterable[str]] = ...) -> None: ...
