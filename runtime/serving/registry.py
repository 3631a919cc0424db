"""The models one server serves, by id: each loaded on first use into its own engine and request
scheduler (serving.scheduler), at most `max_resident` at once; loading one more unloads the
least recently used model that has no request admitted. Requests enter through `submit`, under
the same lock as eviction, so no request reaches a model being unloaded.

    registry = Registry({"tiny.en": "tiny.en.maxpkg", "base": "base.maxpkg"}, load, max_resident=1)
    job, scheduler = registry.submit("base", samples, options)   # loads base, unloads tiny.en if idle
    job.future.result()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from ..options import TranscribeOptions
from .scheduler import Job, Scheduler


class UnknownModel(KeyError):
    """A model id the registry does not serve."""


class AllBusy(Exception):
    """Every resident model has requests in flight, and one more may not be loaded."""

    def __init__(self, resident: list[str]):
        super().__init__(f"{len(resident)} models resident and busy: {', '.join(resident)}")
        self.resident = resident


@dataclass(eq=False)
class Resident:
    """A loaded model, its scheduler (started), and when a request last used it."""

    id: str
    model: object
    scheduler: Scheduler
    used: float


class Registry:
    """Models by id (`sources`: id -> what `load` takes, e.g. a package path; the first id is the
    default, which OpenAI's alias whisper-1 names). `load(source)` returns a loaded model
    (runtime.load); `max_resident` (None: all) caps the models loaded at once; `max_active`,
    `queue_size` and `max_live` (live streams) are each model's scheduler's."""

    def __init__(
        self,
        sources: Mapping[str, object],
        load: Callable[[object], object],
        *,
        max_resident: int | None = None,
        max_active: int = 8,
        queue_size: int = 32,
        max_live: int = 8,
        aliases: tuple[str, ...] = ("whisper-1",),
    ):
        if not sources:
            raise ValueError("a registry needs at least one model")
        if max_resident is not None and max_resident < 1:
            raise ValueError(f"max_resident {max_resident}: expected at least 1")
        self._sources = dict(sources)
        self._load = load
        self.max_resident = max_resident or len(self._sources)
        self.max_active, self.queue_size, self.max_live = max_active, queue_size, max_live
        self.aliases = aliases
        self._lock = threading.Lock()
        self._resident: dict[str, Resident] = {}
        self._loading: dict[str, Future] = {}
        self._stopped = False
        self.draining = False  # drain(): new requests and sessions are refused, those in flight finish
        self.loads = 0  # models loaded so far (the first use of each, and again after an eviction)
        self.evictions = 0

    @classmethod
    def of(cls, model, model_id: str, **kwargs) -> Registry:
        """A registry of one model already loaded."""
        registry = cls({model_id: model}, lambda m: m, **kwargs)
        registry.preload()
        return registry

    @property
    def ids(self) -> list[str]:
        return list(self._sources)

    def resolve(self, name: str | None) -> str:
        """The id a request's `model` field names (an id, or an alias for the first); UnknownModel else."""
        if name in self._sources:
            return name
        if name in self.aliases:
            return self.ids[0]
        raise UnknownModel(name)

    def preload(self, ids: list[str] | None = None) -> None:
        """Load `ids` now (default: as many as may be resident, in order), so errors show at start."""
        for model_id in ids if ids is not None else self.ids[: self.max_resident]:
            self.model(model_id)

    def model(self, model_id: str):
        """The loaded model `model_id` (loading it now if it is not resident)."""
        return self._resident_for(model_id).model

    def submit(
        self, model_id: str, samples: np.ndarray, options: TranscribeOptions, on_event=None
    ) -> tuple[Job, Scheduler]:
        """Admit a request on `model_id`'s scheduler (loading the model if needed): its Job and
        the scheduler that runs it. Busy (serving.scheduler) when that model's queue is full,
        AllBusy when it must be loaded and nothing may be unloaded. `on_event` gets the
        request's stream events (runtime.stream), in the scheduler's thread."""
        return self._on_scheduler(model_id, lambda s: s.submit(samples, options, on_event))

    def open_live(self, model_id: str, options, on_event):
        """A live stream (runtime.live) on `model_id`'s engine (loading the model if needed), and
        that model's scheduler. Busy when it has its `max_live` streams, AllBusy as submit."""
        return self._on_scheduler(model_id, lambda s: s.open_live(options, on_event))

    def _on_scheduler(self, model_id: str, call):
        """(call(scheduler), scheduler) for `model_id`'s scheduler, under the lock so the model
        cannot be unloaded between its loading and the call; it counts as used now."""
        while True:
            resident = self._resident_for(model_id)
            with self._lock:
                if self._resident.get(model_id) is not resident:
                    continue  # unloaded between the two: load it again
                resident.used = time.monotonic()
                return call(resident.scheduler), resident.scheduler

    def scheduler(self, model_id: str) -> Scheduler | None:
        """The scheduler of `model_id` if it is resident."""
        with self._lock:
            resident = self._resident.get(model_id)
        return None if resident is None else resident.scheduler

    def stats(self) -> dict:
        """Per model: resident or not, and its scheduler's counts; the counts summed over models."""
        with self._lock:
            residents = dict(self._resident)
        models = {}
        for model_id in self._sources:
            r = residents.get(model_id)
            models[model_id] = {"loaded": False} if r is None else {"loaded": True, **r.scheduler.stats()}
        totals: dict[str, int] = {}
        for counts in models.values():
            for key, value in counts.items():
                if key != "loaded":
                    totals[key] = totals.get(key, 0) + value
        return {**totals, "loads": self.loads, "evictions": self.evictions, "models": models}

    def drain(self) -> None:
        """From now on the app refuses new requests and live sessions (503); those admitted go on."""
        self.draining = True

    @property
    def idle(self) -> bool:
        """No request admitted and no live stream open on any resident model."""
        with self._lock:
            residents = list(self._resident.values())
        return all(_idle(r.scheduler.stats()) for r in residents)

    def stop(self) -> None:
        """Stop every resident model's scheduler (requests still admitted fail); no more loads."""
        with self._lock:
            self._stopped = True
            residents, self._resident = list(self._resident.values()), {}
        for r in residents:
            r.scheduler.stop()

    # --- loading and unloading ---

    def _resident_for(self, model_id: str) -> Resident:
        if model_id not in self._sources:
            raise UnknownModel(model_id)
        with self._lock:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            resident = self._resident.get(model_id)
            if resident is not None:
                return resident
            pending = self._loading.get(model_id)
            owner = pending is None
            if owner:
                evicted = self._make_room()  # AllBusy: nothing loads
                pending = self._loading[model_id] = Future()
        if not owner:
            return pending.result()  # another request is loading it (or its error)
        for r in evicted:
            r.scheduler.stop()  # idle: nothing admitted, nothing fails
        try:
            model = self._load(self._sources[model_id])
            scheduler = Scheduler(model, self.max_active, self.queue_size, max_live=self.max_live)
            scheduler.start()
        except BaseException as e:
            with self._lock:
                del self._loading[model_id]
            pending.set_exception(e)
            raise
        resident = Resident(model_id, model, scheduler, time.monotonic())
        with self._lock:
            del self._loading[model_id]
            self._resident[model_id] = resident
            self.loads += 1
        pending.set_result(resident)
        return resident

    def _make_room(self) -> list[Resident]:
        """Under the lock: unload least recently used idle models until one more fits; the ones
        taken out (to stop outside the lock). AllBusy if too few are idle."""
        over = len(self._resident) + len(self._loading) + 1 - self.max_resident
        if over <= 0:
            return []
        idle = sorted((r for r in self._resident.values() if _idle(r.scheduler.stats())), key=lambda r: r.used)
        if len(idle) < over:
            raise AllBusy(sorted(self._resident))
        for r in idle[:over]:
            del self._resident[r.id]
            self.evictions += 1
        return idle[:over]


def _idle(stats: dict) -> bool:
    """No request admitted and no live stream open on a model's scheduler: it may be unloaded."""
    return stats["admitted"] == 0 and stats["live_streams"] == 0
