from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SeriesIngested(_message.Message):
    __slots__ = ("study_instance_uid", "series_instance_uid", "patient_pseudonym", "modality", "site", "instance_count", "volume_uri", "shape", "spacing_mm", "non_volumetric_reason", "received_at", "series_description", "body_part_examined", "sop_class_uid", "calling_ae_title")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    PATIENT_PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    VOLUME_URI_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SPACING_MM_FIELD_NUMBER: _ClassVar[int]
    NON_VOLUMETRIC_REASON_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    SERIES_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    BODY_PART_EXAMINED_FIELD_NUMBER: _ClassVar[int]
    SOP_CLASS_UID_FIELD_NUMBER: _ClassVar[int]
    CALLING_AE_TITLE_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    series_instance_uid: str
    patient_pseudonym: str
    modality: str
    site: str
    instance_count: int
    volume_uri: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    spacing_mm: _containers.RepeatedScalarFieldContainer[float]
    non_volumetric_reason: str
    received_at: str
    series_description: str
    body_part_examined: str
    sop_class_uid: str
    calling_ae_title: str
    def __init__(self, study_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., patient_pseudonym: _Optional[str] = ..., modality: _Optional[str] = ..., site: _Optional[str] = ..., instance_count: _Optional[int] = ..., volume_uri: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., spacing_mm: _Optional[_Iterable[float]] = ..., non_volumetric_reason: _Optional[str] = ..., received_at: _Optional[str] = ..., series_description: _Optional[str] = ..., body_part_examined: _Optional[str] = ..., sop_class_uid: _Optional[str] = ..., calling_ae_title: _Optional[str] = ...) -> None: ...
