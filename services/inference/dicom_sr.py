"""The volumes of a segmentation as a DICOM SR measurement report (TID 1500), beside the DICOM SEG.

One measurement group (TID 1411, volumetric ROI) per segment of the SEG: it references that segment
(and through it the source series), carries the algorithm's identification and one measurement, the
structure's volume in millilitres (UCUM ``ml``), computed from the mask on the source grid: voxel count
x voxel volume (|det| of the affine's 3 x 3 part, mm³) / 1000. highdicom writes the TID 1500 tree; the
provenance (model, registry URI, dataset and code version, request ID) is the SEG's, see
:class:`services.inference.dicom_seg.AlgorithmInfo`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from services.inference.dicom_seg import AlgorithmInfo, uid_for

MILLILITRE = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
SR_SERIES_NUMBER = 9002


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel of a grid with this (RAS or LPS) affine, in mm³."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])))


def structure_volumes_ml(mask: np.ndarray, affine: np.ndarray, label_values: Sequence[int]) -> dict[int, float]:
    """Label value → volume in mL (voxel count x voxel volume / 1000); 0 for a label the mask lacks."""
    per_voxel_ml = voxel_volume_mm3(affine) / 1000.0
    return {int(value): int(np.count_nonzero(mask == value)) * per_voxel_ml for value in label_values}


def segment_numbers(seg: Dataset) -> dict[str, int]:
    """Segment label → number of the SEG's structures (a LABELMAP SEG's background segment 0 left out)."""
    return {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence if item.SegmentNumber}


def build_measurement_report(
    seg: Dataset,
    source_datasets: Sequence[Dataset],
    volumes_ml: Mapping[str, float],
    algorithm: AlgorithmInfo,
    manufacturer: str = "voxelflow",
) -> hd.sr.Comprehensive3DSR:
    """``volumes_ml``: segment label → volume; one group per SEG segment, in segment-number order."""
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.model_name[:64],
        version=algorithm.model_version[:64],
        parameters=[f"{key}={value}" for key, value in algorithm.parameters().items()],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid_for(algorithm.request_id, "device"),
            name=algorithm.model_name[:64],
            manufacturer_name=manufacturer,
            model_name=algorithm.model_name[:64],
            serial_number=algorithm.model_version[:64],
        ),
    )
    groups = []
    for label, number in sorted(segment_numbers(seg).items(), key=lambda item: item[1]):
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uid_for(algorithm.request_id, f"sr-group-{number}"),
                    identifier=f"{algorithm.model_name}:{label}"[:64],
                ),
                # the whole segment of the SEG (no frame list: a LABELMAP frame holds every segment), and the
                # series it was derived from
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(str(source_datasets[0].SeriesInstanceUID)),
                ),
                finding_type=codes.SCT.AnatomicalStructure,
                algorithm_id=algorithm_id,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Volume,
                        value=round(float(volumes_ml[label]), 6),
                        unit=MILLILITRE,
                        algorithm_id=algorithm_id,
                    )
                ],
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion
        if str(source_datasets[0].Modality) == "CT"
        else hd.sr.CodedConcept(value="25056-2", scheme_designator="LN", meaning="MRI unspecified body region"),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*source_datasets, seg],
        content=report,
        series_instance_uid=uid_for(algorithm.request_id, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uid_for(algorithm.request_id, "sr-instance"),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        series_description=algorithm.series_description("volumes"),
        software_versions=algorithm.software_versions(),
        manufacturer_model_name=algorithm.model_name[:64],
        device_serial_number=algorithm.model_version[:64],
    )
