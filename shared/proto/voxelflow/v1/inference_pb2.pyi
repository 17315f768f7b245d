from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InferenceRequest(_message.Message):
    __slots__ = ("request_id", "series_instance_uid", "dicomweb_series_url", "nifti_uri", "model_alias", "send_to_pacs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    DICOMWEB_SERIES_URL_FIELD_NUMBER: _ClassVar[int]
    NIFTI_URI_FIELD_NUMBER: _ClassVar[int]
    MODEL_ALIAS_FIELD_NUMBER: _ClassVar[int]
    SEND_TO_PACS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    series_instance_uid: str
    dicomweb_series_url: str
    nifti_uri: str
    model_alias: str
    send_to_pacs: bool
    def __init__(self, request_id: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., dicomweb_series_url: _Optional[str] = ..., nifti_uri: _Optional[str] = ..., model_alias: _Optional[str] = ..., send_to_pacs: _Optional[bool] = ...) -> None: ...

class LabelFinding(_message.Message):
    __slots__ = ("label", "name", "volume_ml")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    label: int
    name: str
    volume_ml: float
    def __init__(self, label: _Optional[int] = ..., name: _Optional[str] = ..., volume_ml: _Optional[float] = ...) -> None: ...

class InferenceResult(_message.Message):
    __slots__ = ("request_id", "model_name", "model_version", "registry_uri", "mask_nifti_uri", "dicom_seg_uri", "findings", "latency_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_URI_FIELD_NUMBER: _ClassVar[int]
    MASK_NIFTI_URI_FIELD_NUMBER: _ClassVar[int]
    DICOM_SEG_URI_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_name: str
    model_version: str
    registry_uri: str
    mask_nifti_uri: str
    dicom_seg_uri: str
    findings: _containers.RepeatedCompositeFieldContainer[LabelFinding]
    latency_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., registry_uri: _Optional[str] = ..., mask_nifti_uri: _Optional[str] = ..., dicom_seg_uri: _Optional[str] = ..., findings: _Optional[_Iterable[_Union[LabelFinding, _Mapping]]] = ..., latency_seconds: _Optional[float] = ...) -> None: ...
