"""Artifact names of a registered model version's MLflow run, and the aliases (docs/registry.md).

Written by aggregation (``model/`` at registration) and the export (``model/onnx``, ``model/torchscript``,
``model/tensorrt``); read by the registry, the promotion gate and inference.
"""

from __future__ import annotations

MODEL_DIR = "model"
WEIGHTS_FILE = "weights.pt"
TRAINING_CONFIG_FILE = "training-config.yaml"
PREPROCESSING_FILE = "preprocessing.json"
LABELS_FILE = "labels.json"
#: the files every registered version has under ``model/``
MODEL_FILES = (WEIGHTS_FILE, TRAINING_CONFIG_FILE, PREPROCESSING_FILE, LABELS_FILE)

WEIGHTS = f"{MODEL_DIR}/{WEIGHTS_FILE}"
TRAINING_CONFIG = f"{MODEL_DIR}/{TRAINING_CONFIG_FILE}"
PREPROCESSING = f"{MODEL_DIR}/{PREPROCESSING_FILE}"
LABELS = f"{MODEL_DIR}/{LABELS_FILE}"

# exports, attached only after the parity gate passed
ONNX_DIR = f"{MODEL_DIR}/onnx"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_DIR = f"{MODEL_DIR}/torchscript"
TORCHSCRIPT_FILE = "model.pt"
#: the INT8 (static QDQ) ONNX model, attached only when it passed its Dice gate against the fp32 one
ONNX_INT8_DIR = f"{MODEL_DIR}/onnx-int8"
TENSORRT_DIR = f"{MODEL_DIR}/tensorrt"
TENSORRT_FILE = "model.plan"
ONNX = f"{ONNX_DIR}/{ONNX_FILE}"
TORCHSCRIPT = f"{TORCHSCRIPT_DIR}/{TORCHSCRIPT_FILE}"

#: per-case held-out Dice, logged at registration; what the promotion gate compares
PER_CASE = "evaluation/per_case.json"
PLOTS_DIR = "plots"
#: written by `voxelflow evaluate --robustness` on the version's run: the report (rows of corruption, level, Dice,
#: drop; the case ids) that the promotion gate's robustness option compares, and the plot beside it
ROBUSTNESS_DIR = "robustness"
ROBUSTNESS_FILE = "robustness.json"
ROBUSTNESS_PLOT_FILE = "robustness.png"
ROBUSTNESS_REPORT = f"{ROBUSTNESS_DIR}/{ROBUSTNESS_FILE}"
#: the report's mean drop as a run metric, for the MLflow UI (the gate reads the report, not this)
ROBUSTNESS_MEAN_DROP = "robustness_mean_drop"

CANDIDATE = "candidate"
CHAMPION = "champion"
ALIASES = (CANDIDATE, CHAMPION)
