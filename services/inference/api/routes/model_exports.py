"""``/v1/model-exports``: export a registry version for serving (ONNX + TorchScript through the parity gate,
attached to the version, written into the Triton repository), as a job the inference worker runs.

This is what ``voxelflow models export`` and the demo call; a user's own pipeline can call it the same way.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from services.inference.api.deps import ContextDep, OperatorCaller, SessionDep
from services.inference.models import ModelExport
from shared.contracts.tasks import EXPORT_MODEL, INFERENCE_QUEUE
from shared.http import add_audit_uids

router = APIRouter(prefix="/v1/model-exports", tags=["model exports"])

MODEL_URI_PATTERN = r"^models:/[A-Za-z0-9][A-Za-z0-9._-]{0,199}(/[0-9]{1,9}|@[A-Za-z0-9_-]{1,64})$"
CASES_PATTERN = r"^(ds-[0-9a-f]{4,64}|/[^\x00-\x1f]{1,1023})$"
RoiEdge = Annotated[int, Field(ge=8, le=512)]


class ModelExportIn(BaseModel):
    model_uri: str = Field(
        pattern=MODEL_URI_PATTERN, examples=["models:/hippocampus/3", "models:/hippocampus@champion"]
    )
    cases: str | None = Field(
        default=None,
        pattern=CASES_PATTERN,
        description="Parity cases: a dataset version id (ds-…), or an MSD folder the worker can read; "
        "default: the dataset version the model was trained on.",
    )
    case_limit: int = Field(default=3, ge=1, le=50, description="How many parity cases.")
    tolerance: float = Field(default=1e-3, gt=0, le=1, description="Largest allowed |logit difference|.")
    min_dice: float = Field(default=0.99, ge=0, le=1, description="Smallest allowed Dice between the label maps.")
    roi_size: tuple[RoiEdge, RoiEdge, RoiEdge] | None = Field(
        default=None, description="Exported window in voxels, 8…512 each (default: the validation window)."
    )
    triton_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
    retain_versions: int = Field(default=3, ge=1, le=100, description="Triton versions kept besides aliased ones.")
    quantize: Literal["int8"] | None = Field(
        default=None,
        description="int8: also quantise (ONNX Runtime static QDQ, calibrated on training cases) and serve "
        "the INT8 model if its label Dice against the fp32 model stays within max_dice_loss on every case.",
    )
    max_dice_loss: float = Field(default=0.01, ge=0, le=1, description="The INT8 gate's allowed Dice loss.")


class ModelExportOut(BaseModel):
    id: str
    model_uri: str
    status: str
    options: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    created_by: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None


def export_options(body: ModelExportIn) -> dict[str, Any]:
    """The keyword arguments of ``export_registered_model`` the request sets."""
    options: dict[str, Any] = {
        "case_limit": body.case_limit,
        "tolerance": body.tolerance,
        "min_dice": body.min_dice,
        "retain_versions": body.retain_versions,
    }
    if body.cases:
        options["cases"] = body.cases
    if body.roi_size:
        options["roi_size"] = list(body.roi_size)
    if body.triton_name:
        options["model_name"] = body.triton_name
    if body.quantize:
        options["quantize"] = body.quantize
        options["max_dice_loss"] = body.max_dice_loss
    return options


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ModelExportOut,
    summary="Export a registry version for serving (a job; follow it at Location)",
    responses={
        202: {"description": "queued; follow it at Location"},
        422: {"description": "a malformed model URI or option"},
    },
)
def create_export(
    body: ModelExportIn,
    request: Request,
    response: Response,
    ctx: ContextDep,
    session: SessionDep,
    caller: OperatorCaller,
) -> ModelExportOut:
    row = ModelExport(
        id=str(uuid.uuid4()),
        model_uri=body.model_uri,
        options=export_options(body),
        status="queued",
        created_by=caller.name,
    )
    session.add(row)
    session.commit()
    ctx.celery.send_task(EXPORT_MODEL.name, args=[row.id], queue=INFERENCE_QUEUE, task_id=f"export-{row.id}")
    add_audit_uids(request, body.model_uri, row.id)
    response.headers["Location"] = f"/v1/model-exports/{row.id}"
    return ModelExportOut.model_validate(row, from_attributes=True)


ExportId = Annotated[str, PathParam(pattern=r"^[0-9a-f-]{36}$")]


@router.get("/{id}", response_model=ModelExportOut, summary="State and result of a model export")
def get_export(id: ExportId, session: SessionDep, caller: OperatorCaller) -> ModelExportOut:
    row = session.get(ModelExport, id)
    if row is None:
        raise HTTPException(404, f"no model export {id}")
    return ModelExportOut.model_validate(row, from_attributes=True)
