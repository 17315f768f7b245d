"""Which model version answers a request, and how versions change without failing a request.

* The service serves the registry alias ``champion`` (configurable). A watcher thread polls the registry;
  when an alias moves, the new version is loaded and warmed up *beside* the serving one, then swapped in
  under a lock in one assignment. Requests hold a reference to the version they started on, so in-flight
  requests finish on the old version, which is closed only when its last request returns.
* A failed load keeps the old version serving (and is counted): a bad registration must not take the
  service down.
* Canary / A-B: a configured share of *patients* goes to ``candidate``. The decision is a pure function
  of sha256(the patient's keyed pseudonym), so one patient always sees the same model and the share needs no state.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from services.inference import metrics
from services.inference.model_server import ModelSource, ServedModel

log = logging.getLogger("voxelflow.inference.models")

CHAMPION = "champion"
CANDIDATE = "candidate"


def canary_bucket(patient_id: str) -> float:
    """A patient's position in [0, 1): the first 64 bits of sha256(patient reference), uniformly spread."""
    return int(hashlib.sha256(patient_id.encode()).hexdigest()[:16], 16) / 2.0**64


def routes_to_candidate(patient_id: str | None, share: float) -> bool:
    """True when this patient belongs to the canary share. Unknown patients stay on the champion."""
    return bool(patient_id) and share > 0 and canary_bucket(patient_id) < share  # type: ignore[arg-type]


@dataclass
class _Slot:
    model: ServedModel
    in_flight: int = 0
    retired: bool = False


class ModelUnavailableError(RuntimeError):
    """No version is loaded for the requested route (not ready yet, or the alias is unset)."""


class ModelManager:
    """Holds the served version of each route (champion, candidate) and swaps them atomically."""

    def __init__(
        self,
        source: ModelSource,
        aliases: dict[str, str],
        canary_share: float = 0.0,
        poll_seconds: float = 30.0,
    ):
        self.source = source
        self.aliases = aliases  # route → registry alias, e.g. {"champion": "champion", "candidate": "candidate"}
        self.canary_share = canary_share
        self.poll_seconds = poll_seconds
        self._slots: dict[str, _Slot] = {}
        #: route → why the last load of the version its alias points at failed (cleared by a good load)
        self.load_errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def ready(self) -> bool:
        return CHAMPION in self._slots

    def version(self, route: str) -> str | None:
        slot = self._slots.get(route)
        return slot.model.version if slot else None

    def routes(self) -> list[str]:
        return [r for r in self.aliases if r == CHAMPION or self.canary_share > 0 or r in self._slots]

    def poll_once(self) -> dict[str, str | None]:
        """Ask the registry where each alias points; load, warm up and swap in what moved."""
        with self._poll_lock:  # one load at a time, whoever calls
            seen: dict[str, str | None] = {}
            for route, alias in self.aliases.items():
                if route != CHAMPION and self.canary_share <= 0:
                    continue
                try:
                    version = self.source.resolve(alias)
                except Exception:
                    log.exception("registry unreachable while resolving alias %s", alias)
                    continue
                seen[route] = version
                current = self._slots.get(route)
                if version is None or (current is not None and current.model.version == version):
                    continue
                self._load_and_swap(route, alias, version)
            return seen

    def _load_and_swap(self, route: str, alias: str, version: str) -> None:
        model: ServedModel | None = None
        try:
            model = self.source.load(version)
            model.warm_up()
        except Exception as exc:
            if model is not None:  # loaded but failed its warm-up: release what it holds
                model.close()
            metrics.model_load_failures_total.labels(alias).inc()
            self.load_errors[route] = f"version {version}: {exc}"
            log.exception("loading %s version %s failed; the previous version keeps serving", alias, version)
            return
        self.load_errors.pop(route, None)
        close_now = False
        with self._lock:
            old = self._slots.get(route)
            self._slots[route] = _Slot(model)
            if old is not None:
                old.retired = True
                close_now = old.in_flight == 0
        if old is not None:
            metrics.model_info.remove(route, old.model.name, old.model.version)
            if close_now:
                old.model.close()
        metrics.model_info.labels(route, model.name, model.version).set(1)
        metrics.model_swaps_total.labels(route).inc()
        log.info("now serving %s version %s as %s", model.name, version, route)

    def start(self) -> None:
        """Load what the aliases point at now, then keep watching in a daemon thread."""
        self.poll_once()
        if self._thread is None:  # a second start (a worker retrying while not ready) adds no second watcher
            self._thread = threading.Thread(target=self._watch, name="alias-watcher", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            slot.model.close()

    # ---------------------------------------------------------------- serving
    def route_for(self, patient_id: str | None, requested_alias: str | None = None) -> str:
        """The route a request takes: an explicit alias wins, else the canary decision on the patient."""
        if requested_alias:
            for route, alias in self.aliases.items():
                if alias == requested_alias:
                    return route
            raise ValueError(f"alias {requested_alias!r} is not served here; served: {sorted(self.aliases.values())}")
        if CANDIDATE in self._slots and routes_to_candidate(patient_id, self.canary_share):
            return CANDIDATE
        return CHAMPION  # also when no candidate is loaded: canary traffic falls back, it never fails

    @contextmanager
    def acquire(self, route: str) -> Iterator[ServedModel]:
        """The version serving ``route`` now, held for the duration of one request."""
        with self._lock:
            slot = self._slots.get(route)
            if slot is None:
                raise ModelUnavailableError(f"no model loaded for {route!r} yet")
            slot.in_flight += 1
        try:
            yield slot.model
        finally:
            with self._lock:
                slot.in_flight -= 1
                close_now = slot.retired and slot.in_flight == 0
            if close_now:
                slot.model.close()
