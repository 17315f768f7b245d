"""The inference service's Triton backend; the in-process backends and the protocol are shared.

``shared.inference.backends`` holds :class:`InferenceBackend` (what the predictor needs), the embedded
ONNX Runtime backend (the default for a single machine where no Triton runs) and the PyTorch backend
evaluation uses. Triton is what a cluster uses (dynamic batching across requests, GPU instance groups,
TensorRT plans); it is the service's own because only the service talks to a Triton server, and it
implements the same protocol, so the shared predictor runs over it unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from services.inference.triton_repository import (
    TritonModelConfig,
    local_model_config,
    model_prefix,
    sync_repository,
)
from shared.inference.backends import (
    INPUT_NAME,
    OUTPUT_NAME,
    BackendError,
    InferenceBackend,
    OnnxRuntimeBackend,
    check_batch,
)
from shared.storage import ObjectNotFoundError

if TYPE_CHECKING:
    import numpy as np

    from shared.storage import ObjectStore

__all__ = ["BackendError", "InferenceBackend", "ModelControl", "OnnxRuntimeBackend", "TritonBackend", "check_batch"]

#: how the Triton server is told which versions to serve (its ``--model-control-mode``)
ModelControl = Literal["explicit", "poll"]


class TritonBackend:
    """A Triton Inference Server over gRPC, serving the versions a registry alias points at.

    ``model_control`` follows the server's ``--model-control-mode``:

    - ``explicit`` (one server per inference process, as in the local stack): ``load`` asks for exactly
      the versions this process serves (a config override with a ``specific`` version policy), so moving
      a registry alias is a load of the new version beside the old one, and ``release`` drops a version.
    - ``poll`` (a cluster's Triton Deployment, scaled by its HPA and shared by every inference replica):
      the server loads every version the repository holds (``write_model_version`` stores an ``all``
      policy), so a new Triton pod serves the same models as the others and no replica can unload a
      version another replica still routes to. ``load`` only waits until the version is ready on the
      server (then ``poll_settle_s`` more, one repository poll, so that every Triton pod has it) and
      ``release`` and ``unload`` touch nothing on it (versions leave with ``prune_model_versions``).

    With ``store`` and ``repository_dir``, ``load`` first copies ``triton/<model>/`` from object storage
    into the directory the server reads (a cluster's Triton reads the bucket itself and needs neither).
    """

    def __init__(
        self,
        url: str,
        *,
        repository_dir: str | Path | None = None,
        store: ObjectStore | None = None,
        timeout_s: float = 120.0,
        model_control: ModelControl = "explicit",
        poll_settle_s: float = 0.0,
    ) -> None:
        import tritonclient.grpc as grpcclient

        if model_control not in ("explicit", "poll"):
            raise ValueError(f"model_control must be 'explicit' or 'poll', got {model_control!r}")
        self.model_control = model_control
        self.poll_settle_s = poll_settle_s

        self.url = url.removeprefix("grpc://")
        self.repository_dir = Path(repository_dir) if repository_dir else None
        self.store = store
        self.timeout_s = timeout_s
        self.client = grpcclient.InferenceServerClient(self.url)
        self.model_name: str | None = None
        self.version: str | None = None
        #: the loaded model's config (window size, channels), as the server was given it
        self.config: TritonModelConfig | None = None

    @property
    def ready(self) -> bool:
        if self.model_name is None:
            return False
        try:
            return bool(self.client.is_model_ready(self.model_name, self.version or ""))
        except Exception:  # server gone: not ready, never an exception from a probe
            return False

    def load(
        self, model_name: str, version: int | str, path: str | Path | None = None, keep: Sequence[int] = ()
    ) -> None:
        """Load ``version`` and keep ``keep`` (versions other backends of this process still serve) loaded.

        Without ``keep`` the server ends up with exactly ``version``. The config override names every kept
        version, so Triton's reload swaps in the new one without unloading those that are still in use.
        """
        version = str(version)
        if self.model_control == "poll":
            config = self._model_config(model_name, path)  # the server loads it on its next repository poll
        else:
            config = self._apply_versions(model_name, sorted({int(version), *(int(v) for v in keep)}), path)
        deadline = time.monotonic() + self.timeout_s
        while not self.client.is_model_ready(model_name, version):
            if time.monotonic() > deadline:
                hint = (
                    " (poll mode: the server loads what its repository holds; is the version exported to "
                    f"triton/{model_name}/ and does the server poll that repository?)"
                    if self.model_control == "poll"
                    else ""
                )
                raise BackendError(f"{model_name} v{version} did not become ready in {self.timeout_s:.0f} s{hint}")
            time.sleep(0.1)
        if self.model_control == "poll" and self.poll_settle_s > 0:
            # the pod that answered has the version; the others find it within one repository poll (and are
            # out of the Service while they load it, with --strict-readiness): wait that long before traffic
            time.sleep(self.poll_settle_s)
        self.model_name, self.version, self.config = model_name, version, config

    def _model_config(self, model_name: str, path: str | Path | None) -> TritonModelConfig:
        """The model's config.pbtxt: synced into the server's directory, or read from the bucket it serves."""
        repository = Path(path) if path is not None else self.repository_dir
        if self.store is not None and repository is not None:
            sync_repository(self.store, repository, model_name)
        if repository is not None:
            return local_model_config(repository, model_name)
        if self.store is not None:  # a cluster Triton reads the bucket itself: nothing to sync
            try:
                text = self.store.get_bytes(f"{model_prefix(model_name)}/config.pbtxt").decode()
            except ObjectNotFoundError:
                raise FileNotFoundError(f"no Triton model {model_name!r} in {self.store.url}") from None
            return TritonModelConfig.from_pbtxt(text)
        raise BackendError("TritonBackend.load needs the model repository: repository_dir or store")

    def _apply_versions(
        self, model_name: str, versions: Sequence[int], path: str | Path | None = None
    ) -> TritonModelConfig:
        from tritonclient.utils import InferenceServerException

        config = self._model_config(model_name, path)
        try:
            self.client.load_model(model_name, config=json.dumps(config.with_versions(versions).to_json()))
        except InferenceServerException as exc:
            wanted = ", ".join(f"v{v}" for v in versions)
            raise BackendError(f"Triton refused to load {model_name} {wanted}: {exc.message()}") from exc
        return config

    def release(self, keep: Sequence[int] = ()) -> None:
        """Stop serving this backend's version; versions in ``keep`` stay loaded (others still use them)."""
        if self.model_name is None:
            return
        name, self.model_name, self.version = self.model_name, None, None
        if self.model_control == "poll":
            return  # a shared server: other replicas may still route to this version
        if keep:
            self._apply_versions(name, sorted({int(v) for v in keep}))
        else:
            self.client.unload_model(name)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        if self.model_name is None:
            raise BackendError("no model loaded")
        data = check_batch(batch)
        inputs = [grpcclient.InferInput(INPUT_NAME, list(data.shape), "FP32")]
        inputs[0].set_data_from_numpy(data)
        outputs = [grpcclient.InferRequestedOutput(OUTPUT_NAME)]
        try:
            result = self.client.infer(self.model_name, inputs, model_version=self.version or "", outputs=outputs)
        except InferenceServerException as exc:
            raise BackendError(
                f"Triton inference failed for {self.model_name} v{self.version}: {exc.message()}"
            ) from exc
        logits = result.as_numpy(OUTPUT_NAME)
        if logits is None:
            raise BackendError(f"Triton returned no {OUTPUT_NAME!r} output")
        return logits

    def unload(self) -> None:
        if self.model_name is not None:
            try:
                if self.model_control == "explicit":
                    self.client.unload_model(self.model_name)
            finally:
                self.model_name, self.version = None, None

    def close(self) -> None:
        """Close the gRPC channel (do it before the server stops, or its shutdown waits for it)."""
        self.client.close()
