"""Everything a request handler or task of the inference service needs, built once per process."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from functools import cached_property

from celery import Celery

from services.inference import models
from services.inference.admission import AdmissionController
from services.inference.model_lifecycle import CANDIDATE, CHAMPION, ModelManager
from services.inference.model_server import ModelSource, RegistryModelSource
from services.inference.settings import InferenceSettings
from shared.contracts.tasks import INFERENCE_QUEUE
from shared.pseudonyms import patient_ref
from shared.service_context import ServiceContext
from shared.tasks import create_celery_app

SERVICE = "inference"


@dataclass
class InferenceContext(ServiceContext):
    settings: InferenceSettings
    service_models = models
    #: where model versions come from; the registry unless a process embeds another source (tests)
    model_source: ModelSource | None = field(default=None)

    @cached_property
    def celery(self) -> Celery:
        return create_celery_app(SERVICE, self.settings.broker_url, self.settings.database_url)

    @cached_property
    def pseudonym_key(self) -> bytes:
        return self.settings.resolved_deid_key()

    def patient_ref(self, patient_id: str | None) -> str | None:
        """The keyed pseudonym kept instead of a PatientID (:func:`shared.pseudonyms.patient_ref`)."""
        return patient_ref(self.pseudonym_key, self.settings.project, patient_id)

    @cached_property
    def models(self) -> ModelManager:
        s = self.settings
        source = self.model_source or RegistryModelSource(
            s.model_name,
            s.backend,
            store=self.store,
            triton_url=s.triton_url,
            triton_repository=s.triton_model_repository,
            triton_model_control=s.triton_model_control,
            triton_load_timeout_s=s.triton_load_timeout_seconds,
            triton_poll_settle_s=s.triton_poll_settle_seconds,
            sw_batch_size=s.sw_batch_size,
            overlap=s.sw_overlap,
            onnxruntime_threads=s.onnxruntime_threads or None,
            tracking_uri=s.mlflow_tracking_uri,
        )
        return ModelManager(
            source,
            aliases={CHAMPION: s.model_alias, CANDIDATE: s.candidate_alias},
            canary_share=s.canary_share,
            poll_seconds=s.alias_poll_seconds,
        )

    @cached_property
    def admission(self) -> AdmissionController:
        s = self.settings
        return AdmissionController(s.max_concurrent, s.max_queue, s.queue_wait_seconds, s.retry_after_seconds)

    def ingest_headers(self) -> dict[str, str]:
        token = self.settings.ingest_token
        return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}

    def pacs_headers(self) -> dict[str, str]:
        s = self.settings
        if not s.pacs_username:
            return {}
        password = s.pacs_password.get_secret_value() if s.pacs_password else ""
        return {"Authorization": "Basic " + base64.b64encode(f"{s.pacs_username}:{password}".encode()).decode()}

    def dicomweb_roots(self) -> dict[str, dict[str, str]]:
        """DICOMweb roots a request may name as its source, with the credentials to use there."""
        roots: dict[str, dict[str, str]] = {root.rstrip("/"): {} for root in self.settings.allowed_dicomweb_roots}
        roots[f"{self.settings.ingest_url.rstrip('/')}/dicomweb"] = self.ingest_headers()
        if self.settings.pacs_url and self.settings.pacs_url.startswith(("http://", "https://")):
            roots[self.settings.pacs_url.rstrip("/")] = self.pacs_headers()
        return roots

    def check_model(self) -> None:
        if not self.models.ready:
            why = self.models.load_errors.get(CHAMPION)
            raise RuntimeError(
                f"{self.settings.model_name}@{self.settings.model_alias} not loaded and warmed up yet"
                + (f" (last load failed: {why})" if why else "")
            )

    def queued_jobs(self) -> int:
        import redis

        client = redis.Redis.from_url(self.settings.broker_url, socket_timeout=2)
        try:
            return int(client.llen(INFERENCE_QUEUE))
        finally:
            client.close()
