"""The serving predictor, shared: backends, sliding windows, post-processing, the whole-volume pipeline.

The inference service serves with it and evaluation (``voxelflow evaluate``, the held-out test Dice at
registration) scores with it, so what is measured is what is served. Only the Triton backend, which needs
a server, stays in ``services.inference``; it implements :class:`InferenceBackend` too.
"""

from shared.inference.backends import (
    INPUT_NAME,
    OUTPUT_NAME,
    BackendError,
    InferenceBackend,
    OnnxRuntimeBackend,
    OpenVinoBackend,
    TorchModuleBackend,
    check_batch,
)
from shared.inference.postprocess import (
    argmax_labels,
    invert_to_source,
    keep_largest_components,
    label_findings,
    voxel_volume_ml,
)
from shared.inference.predictor import SlidingWindowPredictor
from shared.inference.segmentation import (
    SegmentedVolume,
    VolumeError,
    predict_labels,
    preprocess,
    read_nifti,
    segment_array,
)

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "BackendError",
    "InferenceBackend",
    "OnnxRuntimeBackend",
    "OpenVinoBackend",
    "SegmentedVolume",
    "SlidingWindowPredictor",
    "TorchModuleBackend",
    "VolumeError",
    "argmax_labels",
    "check_batch",
    "invert_to_source",
    "keep_largest_components",
    "label_findings",
    "predict_labels",
    "preprocess",
    "read_nifti",
    "segment_array",
    "voxel_volume_ml",
]
