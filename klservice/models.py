"""The served models: names, each an alias for one immutable loaded revision that a load moves atomically.

A `ServedModel` is one loaded revision: its backend, its own `TokenBudgetScheduler` (so
fairness between tenants holds within each model and no model's backlog waits behind
another's) with its own reference-cache partition, its limits and what GetModelInfo says of
it. `ModelRegistry` maps names to their current revision and runs the lifecycle:

- **Start.** Every ``--model`` is estimated first (`klservice.checkpoints.weight_bytes`); a set
  that does not fit its device fails before anything loads, naming the models and the sizes.
- **Lease.** A request takes a lease on the revision its model name points to when it is
  admitted (`lease`) and keeps it until answered, so it finishes on that revision whatever
  happens to the name meanwhile.
- **Load (swap).** `load` reads the new checkpoint beside the old one (optionally mixed with it:
  (1 - alpha) * old + alpha * new), checks it (a probe forward whose log-probs must be finite,
  the tokenizer fingerprint unless forced), and only then points the name at it. The generation
  of the name goes up by one. Requests admitted before the move finish on the old revision; the
  old backend is released when its last lease is returned. A failed load changes nothing. Two
  loads of one name never run at once: the second is refused (FailedPrecondition).
- **Unload.** The name goes at once; its revision is released like a replaced one.
- **Bounded loads.** A load reads only regular files, each for the size seen when it began
  (`klservice.backends._files.check_folder`, `hash_files`), and its blocking work runs in daemon
  threads (`klservice.threads`) that the coroutine waits on until ``--load-timeout-seconds``:
  past it, or when the server stops, the load is given up (its `LoadGuard` stops it reading at the
  next block), the name is free at once, and whatever the thread still produces is released when
  it ends. A load whose caller has gone runs on to its end (`ReferenceService.load_model`), so
  within its deadline too. A stopping process never waits for a load: a thread blocked in the
  kernel is left behind. Its memory stays counted by the memory checks until its thread ends. A
  mixing load writes under ``<cache>/mixed/<process>+<name>-*`` (`process_tag`: host, pid, start
  time); one given up removes its folder when its thread ends, and a server starting removes
  those of this host's processes no longer running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from klservice import __version__
from klservice.backends.base import LOGPROB_SLACK, ModelInfo, ReferenceBackend, probe_tokens
from klservice.cache import ReferenceCache
from klservice.checkpoints import MIB, CheckpointError, mix_checkpoints, weight_bytes
from klservice.config import ModelSpec, ServerConfig
from klservice.backends._files import LoadAbandoned, LoadGuard, ModelFileError
from klservice_client.wire import MODEL_NAME_PATTERN, MODEL_NAME_RULE
from klservice.errors import DeadlineExpired, FailedPrecondition, InvalidInput, ModelNotFound, NotReady, ServiceError
from klservice.metrics import Metrics
from klservice.scheduler import TokenBudgetScheduler
from klservice.threads import in_daemon_thread
from klservice.validation import Limits

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class ServedModel:
    """One loaded revision of a model name (immutable once serving; see the module docstring)."""

    spec: ModelSpec
    folder: Path
    backend: ReferenceBackend
    scheduler: TokenBudgetScheduler
    info: ModelInfo
    """What GetModelInfo answers: the backend's info with the name, generation and serving limits."""
    limits: Limits
    memory_bytes: int
    device: str
    """The device its memory is counted on ("cpu", "cuda:0", ...)."""
    owned_folder: Path | None = None
    """A folder written for this revision (mixed weights), removed when it is released."""
    owns_backend: bool = True
    """False for a backend handed in loaded (`ModelRegistry.start(preloaded)`): whoever loaded it closes it."""
    load_seconds: float = 0.0
    """How long reading the weights took (for a mixed revision, mixing included)."""
    check_seconds: float = 0.0
    """How long the probe forward took."""
    leases: int = 0
    retired: bool = False
    released: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclasses.dataclass(frozen=True)
class LoadRequest:
    """What LoadModel asks for; empty fields default to the name's current revision, else the server's flags."""

    name: str
    path: str
    backend: str = ""
    dtype: str = ""
    device: str = ""
    max_length: int = 0
    force: bool = False
    mixup_alpha: float | None = None


class ModelRegistry:
    """Model names → their serving revision; loads, swaps and releases (see the module docstring)."""

    def __init__(self, config: ServerConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self._models: dict[str, ServedModel] = {}  # name -> serving revision; the default first
        self._default: str | None = None
        self._retiring: set[ServedModel] = set()
        self._loading: set[str] = set()
        self._reserved: dict[str, tuple[str, int]] = {}  # name -> (device, bytes) of a load in flight
        self._generations: dict[str, int] = {}
        self._releases: set[asyncio.Task] = set()
        self._guards: set[LoadGuard] = set()  # of the loads in flight: given up when the server stops
        self._orphans: dict[int, tuple[str, str, int]] = {}  # (label, device, bytes) of given-up loads still running
        self._closing = False

    # --- start and stop -----------------------------------------------------------------

    async def start(self, preloaded: ReferenceBackend | None = None) -> list[ServedModel]:
        """Load every --model (the first may come `preloaded`), after checking that they fit their devices."""
        specs = self.config.model_specs()
        if preloaded is not None and not self.config.model:  # served under the name its loader gave it
            name = (await asyncio.to_thread(preloaded.info)).name
            specs[0] = dataclasses.replace(specs[0], name=name, path=name)
        await asyncio.to_thread(_remove_stale_mixed, self._mixed_root())
        guards = []  # each model's checks, then its load, have a deadline of their own from when they begin
        try:
            folders, estimates = [], []
            for index, spec in enumerate(specs):
                guard = self._guard()
                guards.append(guard)
                given = index == 0 and preloaded is not None
                folders.append(None if given else await self._blocking(guard, f"model {spec.name!r}", _folder,
                                                                        self.config, spec, guard))
                estimates.append(await self._blocking(guard, f"model {spec.name!r}", _estimate, spec, folders[-1],
                                                      self.config))
            self._check_fits(list(zip(specs, estimates)), existing=[], when="at start")
            for index, (spec, folder, (device, size)) in enumerate(zip(specs, folders, estimates)):
                guard = self._guard()
                guards.append(guard)
                backend = preloaded if index == 0 and preloaded is not None else None
                served = await self._open(spec, folder, device, size, backend=backend, guard=guard)
                self._models[spec.name] = served
                self._publish(served)
        finally:
            self._guards.difference_update(guards)
        self._default = specs[0].name
        self._refresh_default_flags()
        return list(self._models.values())

    @property
    def ready(self) -> bool:
        return self._default is not None and not self._closing

    def drain(self) -> None:
        self._closing = True

    async def stop(self, grace: float) -> bool:
        """Give queued and running work `grace` seconds, then stop every scheduler and close every backend.
        True if everything finished in time."""
        self._closing = True
        for guard in list(self._guards):  # loads in flight stop reading; their threads are left behind
            guard.abandon("the server is stopping")
        if self._releases:  # revisions already on their way out: their last requests are done
            await asyncio.gather(*self._releases, return_exceptions=True)
        everything = list(self._models.values()) + list(self._retiring)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        finished = True
        for served in everything:
            finished &= await served.scheduler.drain(max(0.0, deadline - loop.time()))
        for served in everything:
            await served.scheduler.stop()
        for served in everything:
            await asyncio.to_thread(_close, served)
            served.released.set()
        self._models.clear()
        self._retiring.clear()
        return finished

    # --- lookups ------------------------------------------------------------------------

    @property
    def default_name(self) -> str:
        if self._default is None:
            raise NotReady("models are still loading; retry shortly")
        return self._default

    def get(self, name: str = "") -> ServedModel:
        """The serving revision of `name` (empty: the default model); ModelNotFound naming the served ones."""
        if self._default is None:
            raise NotReady("models are still loading; retry shortly")
        served = self._models.get(name or self._default)
        if served is None:
            raise ModelNotFound(
                f"model: {name[:80]!r} is not served here; this server serves "
                + ", ".join(repr(other) for other in self._models)
            )
        return served

    def list(self) -> list[ServedModel]:
        """The serving revisions, the default first."""
        return list(self._models.values())

    @contextlib.contextmanager
    def lease(self, name: str = ""):
        """The serving revision of `name`, held for the block: a swap meanwhile does not release it."""
        served = self.get(name)
        served.leases += 1
        try:
            yield served
        finally:
            served.leases -= 1
            if served.retired and served.leases == 0:
                self._release_soon(served)

    # --- load, swap, unload ---------------------------------------------------------------

    async def load(self, request: LoadRequest) -> ServedModel:
        """Load a checkpoint under a name (new, or moved from its current revision once the new one is checked)."""
        name = request.name
        check_model_name(name)
        if self._closing:
            raise NotReady("server is shutting down")
        if name in self._loading:
            raise FailedPrecondition(f"model {name!r}: a load is already running; wait for it to finish")
        current = self._models.get(name)
        adding = {other for other in self._loading if other not in self._models}
        if current is None and len(self._models) + len(adding) >= self.config.max_models:
            raise FailedPrecondition(
                f"model {name!r}: this server serves {len(self._models)} models, its --max-models; unload one first"
            )
        spec = self._spec(request, current)
        alpha = request.mixup_alpha
        if alpha is not None and not (isinstance(alpha, float) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise InvalidInput(f"mixup_alpha: {alpha} is not in [0, 1]")
        what = f"model {name!r}: loading {request.path}"
        self._loading.add(name)
        guard = self._guard()
        started = time.perf_counter()
        owned: Path | None = None
        try:
            folder = await self._blocking(guard, what, _resolve, request.path, guard)
            if request.mixup_alpha is not None:
                if current is None or current.folder is None:
                    raise FailedPrecondition(
                        f"mixup_alpha: model {name!r} is not served from a checkpoint folder, so there is nothing to "
                        "mix the new weights with"
                    )
                owned = await self._blocking(guard, what, self._mix, current, folder, request.mixup_alpha, guard,
                                             cleanup=_remove_mixed)
                folder = owned
            mixed = time.perf_counter()
            device, size = await self._blocking(guard, what, _estimate, spec, folder, self.config)
            self._check_fits([(spec, (device, size))], existing=self._holding(), when="now")
            self._reserved[name] = (device, size)  # counted by other loads' checks while this one runs
            served = await self._open(spec, folder, device, size, owned_folder=owned, mixup_alpha=request.mixup_alpha,
                                      path=request.path, guard=guard)
            owned = None  # the revision owns it now
            if current is not None and not request.force and served.info.tokenizer_fingerprint != current.info.tokenizer_fingerprint:
                await self._discard(served)
                raise FailedPrecondition(
                    f"model {name!r}: {request.path} has another tokenizer (fingerprint "
                    f"{served.info.tokenizer_fingerprint[:12]}, serving {current.info.tokenizer_fingerprint[:12]}): token "
                    "ids would change meaning for the trainers using it; pass force to load it anyway"
                )
            if self._closing:
                await self._discard(served)
                raise NotReady("server is shutting down")
            switching = time.perf_counter()
            self._models[name] = served  # the switch: later leases get the new revision
            self._publish(served)
            self._refresh_default_flags()
            if current is not None:
                self._retire(current)
            switched = time.perf_counter()
            self.metrics.model_loads.labels(name, "ok").inc()
            log.info(
                "model %r now serves revision %s (generation %d) from %s: %s%.2f s to load, %.3f s to check "
                "(probe forward), %.1f µs to switch; %.2f s in all",
                name, served.info.revision[:12], served.info.generation, request.path,
                f"{mixed - started:.2f} s to mix, " if request.mixup_alpha is not None else "",
                served.load_seconds, served.check_seconds, (switched - switching) * 1e6, switched - started,
            )
            return served
        except ServiceError:
            self.metrics.model_loads.labels(name, "failed").inc()
            raise
        except asyncio.CancelledError:  # given up (`_blocking`): only an embedding program cancels a load
            self.metrics.model_loads.labels(name, "failed").inc()
            log.warning("%s: cancelled", what)
            raise
        except Exception as error:  # noqa: BLE001 - whatever else fails a load is the load's answer, with its reason
            self.metrics.model_loads.labels(name, "failed").inc()
            raise FailedPrecondition(f"{what} failed: {_describe(error)}") from None
        finally:
            self._guards.discard(guard)
            self._loading.discard(name)
            self._reserved.pop(name, None)
            if owned is not None:
                _remove_mixed(owned)

    async def unload(self, name: str) -> list[str]:
        """Stop serving `name` (not the default model); its requests in flight finish first. The names left."""
        check_model_name(name)
        if name == self._default:
            raise FailedPrecondition(
                f"model {name!r} is the default model and cannot be unloaded; load another checkpoint into it instead"
            )
        if name in self._loading:
            raise FailedPrecondition(f"model {name!r}: a load is running; unload it once the load has finished")
        served = self.get(name)
        del self._models[name]
        self.metrics.forget_model(name)
        self._retire(served)
        log.info("model %r unloaded (revision %s)", name, served.info.revision[:12])
        return list(self._models)

    # --- internals --------------------------------------------------------------------------

    def _spec(self, request: LoadRequest, current: ServedModel | None) -> ModelSpec:
        base = current.spec if current is not None else ModelSpec.parse(None, self.config)
        try:
            return ModelSpec.of(
                request.name, request.path,
                backend=request.backend or base.backend,
                dtype=request.dtype or base.dtype,
                device=request.device or base.device,
                max_length=request.max_length or (base.max_length if current is not None else self.config.max_length),
            )
        except ValueError as error:
            raise InvalidInput(str(error)) from None

    def _mixed_root(self) -> Path:
        """Where mixing loads write their folders (``<cache>/mixed``)."""
        from klservice.default_model import default_cache_dir

        root = Path(self.config.cache_dir).expanduser() if self.config.cache_dir else default_cache_dir()
        return root / "mixed"

    def _mix(self, current: ServedModel, folder: Path, alpha: float, guard: LoadGuard) -> Path:
        from klservice.backends._files import model_revision

        try:  # the served weights are read again from their folder: it must still hold exactly them
            unchanged = model_revision(current.folder, guard) == current.info.revision
        except (OSError, FileNotFoundError, ModelFileError):
            unchanged = False
        if not unchanged:
            raise FailedPrecondition(
                f"mixup_alpha: {current.folder}, the folder model {current.name!r} was loaded from, no longer holds "
                f"its revision {current.info.revision[:12]}; mixing reads the served weights from there (keep it until "
                "the next mixing load), so load a checkpoint without mixup_alpha instead"
            )
        root = self._mixed_root()
        root.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix=f"{process_tag() or os.getpid()}+{current.name}-", dir=root)) / "model"
        guard.reading = str(folder)
        try:
            return mix_checkpoints(current.folder, folder, alpha, out)
        except CheckpointError as error:
            _remove_mixed(out)
            raise FailedPrecondition(str(error)) from None
        except Exception as error:  # noqa: BLE001 - unreadable weights, a full disk
            _remove_mixed(out)
            raise FailedPrecondition(f"mixup_alpha: mixing {folder} into {current.name!r} failed: {_describe(error)}") from None

    async def _open(self, spec: ModelSpec, folder: Path | None, device: str, size: int, *, guard: LoadGuard,
                    backend: ReferenceBackend | None = None, owned_folder: Path | None = None,
                    mixup_alpha: float | None = None, path: str | None = None) -> ServedModel:
        """Load (unless given), probe, and put a revision into service: its scheduler and cache, its limits."""
        handed_in = backend is not None
        started = time.perf_counter()
        what = f"model {spec.name!r}: loading {path or folder}"
        if backend is None:
            from klservice.backends import load_backend

            located = dataclasses.replace(spec, path=str(folder))
            backend = await self._blocking(guard, what, lambda: load_backend(self.config, located, progress=False,
                                                                             guard=guard),
                                           cleanup=lambda loaded: loaded.close(),
                                           hold=(f"{spec.name} (given up, still loading)", device, size))
        loaded = time.perf_counter()
        generation = self._generations.get(spec.name, 0) + 1
        config = self.config
        try:
            info = await asyncio.to_thread(backend.info)
            if not handed_in:  # a backend handed in loaded is its loader's to check
                await self._blocking(guard, what, _probe, backend, info)
            model_metrics = self.metrics.for_model(spec.name)
            cache = None
            if config.cache_mb > 0:
                cache = ReferenceCache(config.cache_mb * MIB, info.revision, metrics=model_metrics)
            scheduler = TokenBudgetScheduler(
                backend,
                max_batch_tokens=config.max_batch_tokens,
                max_queue=config.max_queue,
                max_wait_s=config.max_wait_ms / 1000.0,
                max_step_s=config.max_step_seconds,
                call_padding=config.call_padding,
                cache=cache,
                metrics=model_metrics,
            )
            await scheduler.start()
        except BaseException:
            if not handed_in:  # in its own thread: a probe still running stops at its next layer
                in_daemon_thread(backend.close, name="klservice-close")
            raise
        limits = Limits(
            model_name=spec.name,
            vocab_size=info.vocab_size,
            max_length=info.max_length,
            max_request_tokens=config.max_request_tokens,
            max_message_bytes=config.max_message_bytes,
            revision=info.revision,
            generation=generation,
        )
        served_info = dataclasses.replace(
            info,
            name=spec.name,
            max_request_tokens=limits.max_request_tokens,
            max_message_bytes=config.max_message_bytes,
            server_version=__version__,
            generation=generation,
            path=path if path is not None else (spec.path or str(folder or "")),
            mixup_alpha=mixup_alpha,
            is_default=False,
        )
        checked = time.perf_counter()
        return ServedModel(spec=spec, folder=folder, backend=backend, scheduler=scheduler, info=served_info,
                           limits=limits, memory_bytes=size, device=device, owned_folder=owned_folder,
                           owns_backend=not handed_in, load_seconds=loaded - started, check_seconds=checked - loaded)

    def _publish(self, served: ServedModel) -> None:
        """`served` now serves its name: its generation is the name's, and the metrics say so."""
        info = served.info
        self._generations[served.name] = info.generation
        self.metrics.model_info.labels(served.name).info({
            "revision": info.revision, "generation": str(info.generation), "backend": info.backend,
            "dtype": info.dtype, "device": info.device,
        })

    def _refresh_default_flags(self) -> None:
        for name, served in self._models.items():
            served.info = dataclasses.replace(served.info, is_default=name == self._default)

    def _guard(self) -> LoadGuard:
        """A new load's guard, with the --load-timeout-seconds deadline, given up if the server stops."""
        timeout = self.config.load_timeout_seconds
        guard = LoadGuard(time.monotonic() + timeout if timeout > 0 else None)
        self._guards.add(guard)
        return guard

    async def _blocking(self, guard: LoadGuard, what: str, fn, *args, cleanup=None, hold=None):
        """``fn(*args)``, a blocking step of a load, in a daemon thread, waited on until the load's deadline. Past
        it, or when the wait is cancelled, the load is given up: `guard` stops its reading at the next block,
        `cleanup` is applied to what the thread still produces when it ends, `hold` ((label, device, bytes)) stays
        counted by the memory checks until then, and DeadlineExpired (naming the file it was reading) or the
        cancellation is raised. Its own failures come back as the load's answer:
        a file it refused, FailedPrecondition naming it; a load given up by the server stopping, NotReady."""
        future = in_daemon_thread(fn, *args, name="klservice-load")
        timeout = None if guard.deadline is None else max(0.0, guard.deadline - time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as error:
            guard.abandon("its deadline passed" if isinstance(error, asyncio.TimeoutError) else "it was cancelled")
            if hold is not None:  # what it loads still takes memory until its thread ends
                key, loop = id(future), asyncio.get_running_loop()
                self._orphans[key] = hold
                future.add_done_callback(lambda done: loop.call_soon_threadsafe(self._orphans.pop, key, None))
            if cleanup is not None:
                future.add_done_callback(lambda done: _clean_up(done, cleanup))
            if isinstance(error, asyncio.TimeoutError):
                raise self._overdue(guard, what) from None
            raise
        except LoadAbandoned:
            if self._closing:
                raise NotReady("server is shutting down") from None
            raise self._overdue(guard, what) from None
        except ModelFileError as error:
            raise FailedPrecondition(f"{what} failed: {error}") from None

    def _overdue(self, guard: LoadGuard, what: str) -> DeadlineExpired:
        reading = f"; it was reading {guard.reading}" if guard.reading else ""
        return DeadlineExpired(
            f"{what} took longer than --load-timeout-seconds ({self.config.load_timeout_seconds:g} s){reading}: "
            "given up, the name is free"
        )

    def _holding(self) -> list[tuple[str, str, int]]:
        """(name, device, bytes) of every revision holding memory: serving, and replaced but not yet released."""
        held = [(served.name, served.device, served.memory_bytes)
                for served in list(self._models.values()) + list(self._retiring)]
        return (held + [(f"{name} (loading)", device, size) for name, (device, size) in self._reserved.items()]
                + list(self._orphans.values()))

    def _check_fits(self, new: list[tuple[ModelSpec, tuple[str, int]]], existing: list[tuple[str, str, int]],
                    when: str) -> None:
        """Refuse models that do not fit their device next to what it holds, naming the models and the sizes."""
        devices = sorted({device for _, (device, _) in new})
        for device in devices:
            adding = [(spec.name, size) for spec, (dev, size) in new if dev == device]
            held = [(name, size) for name, dev, size in existing if dev == device]
            need = sum(size for _, size in adding)
            if self.config.memory_budget_mb > 0:
                budget = self.config.memory_budget_mb * MIB - sum(size for _, size in held)
                source = f"--memory-budget-mb {self.config.memory_budget_mb}"
            else:
                budget = _free_memory(device)
                source = "free memory"
            if budget is None or need <= budget:
                continue
            listed = ", ".join(f"{name} {_mib(size)}" for name, size in adding)
            holding = f" beside {', '.join(f'{name} {_mib(size)}' for name, size in held)}" if held else ""
            raise FailedPrecondition(
                f"models do not fit {device} {when}: {listed} need {_mib(need)}{holding}, but {_mib(max(budget, 0))} "
                f"is available ({source}); serve fewer or smaller models, a 16-bit --dtype, or another device"
            )

    def _retire(self, served: ServedModel) -> None:
        served.scheduler.stop_publishing()  # the name's gauges are its new revision's (or gone) from now on
        served.retired = True
        self._retiring.add(served)
        if served.leases == 0:
            self._release_soon(served)

    def _release_soon(self, served: ServedModel) -> None:
        if served in self._retiring and not self._closing:  # while stopping, stop() releases everything itself
            self._retiring.discard(served)
            task = asyncio.get_running_loop().create_task(self._release(served), name=f"klservice-release-{served.name}")
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release(self, served: ServedModel) -> None:
        """Release a revision with no lease left: its scheduler (idle by now), its backend, its own folder."""
        try:
            await served.scheduler.drain(60.0)
            await served.scheduler.stop()
            await asyncio.to_thread(_close, served)
            served.released.set()
            log.info("released model %r revision %s (generation %d)", served.name, served.info.revision[:12],
                     served.info.generation)
        except Exception:  # noqa: BLE001 - a failed release must not take the server down
            log.exception("releasing model %r revision %s failed", served.name, served.info.revision[:12])

    async def _discard(self, served: ServedModel) -> None:
        """Drop a revision that was loaded but is not put into service."""
        served.scheduler.stop_publishing()
        await served.scheduler.stop()
        await asyncio.to_thread(_close, served)
        served.released.set()


def check_model_name(name: str) -> None:
    """InvalidInput naming the field unless `name` is a model name a server takes (`MODEL_NAME_PATTERN`)."""
    if not name:
        raise InvalidInput("name: empty; name the model")
    if not MODEL_NAME_PATTERN.fullmatch(name):
        raise InvalidInput(f"name: {name[:80]!r}: {MODEL_NAME_RULE}")


def _folder(config: ServerConfig, spec: ModelSpec, guard: LoadGuard) -> Path:
    """The checked local folder of a --model (the embedded model converted first, where it is the one)."""
    from klservice.backends import model_folder
    from klservice.backends._files import check_folder

    folder = model_folder(config, spec, progress=True)
    try:
        check_folder(folder, guard)
    except ModelFileError as error:
        raise FailedPrecondition(f"model {spec.name!r}: {folder}: {error}") from None
    return folder


def _resolve(path: str, guard: LoadGuard) -> Path:
    """The checked folder of a LoadModel path (`check_folder`: regular files only, safetensors of their declared
    sizes)."""
    from klservice.backends._files import check_folder, resolve_model_dir

    if not path:
        raise InvalidInput("path: empty; give the folder of the checkpoint to load")
    try:
        folder = resolve_model_dir(path)
    except FileNotFoundError as error:
        raise FailedPrecondition(f"path: {error}") from None
    if not (folder / "config.json").is_file():
        raise FailedPrecondition(f"path: {folder} has no config.json; it is not a Hugging Face model folder")
    try:
        check_folder(folder, guard)
    except ModelFileError as error:
        raise FailedPrecondition(f"path: {folder}: {error}") from None
    return folder


def _clean_up(future, cleanup) -> None:
    """Apply `cleanup` to what a given-up load step produced, when it produced something."""
    if future.cancelled() or future.exception() is not None:
        return
    try:
        cleanup(future.result())
    except Exception:  # noqa: BLE001 - nobody waits for this any more
        log.exception("releasing what a given-up load produced failed")


def _remove_mixed(folder: Path) -> None:
    """Remove a mixing load's folder (``<cache>/mixed/<process>+<name>-*/model``)."""
    shutil.rmtree(folder.parent, ignore_errors=True)


def process_tag(pid: int | None = None) -> str | None:
    """A process among those that may share a cache directory: "host.pid.start" (its start time in clock ticks since
    boot, from /proc: a pid reused by another process, a restarted container's pid 1, gets another tag); None where
    the process is not running (or /proc cannot say)."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat") as handle:
            start = handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{socket.gethostname()}.{pid}.{start}"


def _remove_stale_mixed(root: Path) -> None:
    """Remove the mixing folders this host's processes left (a load given up at a stop leaves its own; a killed
    server all of its own): those whose tag (``<tag>+<name>-*``) is of this host and no longer of a running process.
    Other hosts' folders (a shared cache directory) are theirs to clean."""
    if not root.is_dir():
        return
    host = socket.gethostname()
    for entry in root.iterdir():
        tag = entry.name.split("+", 1)[0]
        owner, _, pid = tag.rpartition(".")[0].rpartition(".")
        if "+" not in entry.name or owner != host or not pid.isdigit():
            continue
        if process_tag(int(pid)) != tag:
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by a process no longer running", entry)


def _estimate(spec: ModelSpec, folder: Path | None, config: ServerConfig) -> tuple[str, int]:
    """(device, bytes) a model will take: its weights at the compute dtype; vLLM on a GPU takes its
    --gpu-memory-utilization share of the device."""
    device = _device_key(spec.device)
    if folder is None:
        return device, 0
    try:
        size = weight_bytes(folder, spec.dtype)
    except CheckpointError as error:
        raise FailedPrecondition(f"model {spec.name!r}: {error}") from None
    if spec.backend == "vllm" and device.startswith("cuda"):
        total = _total_memory(device)
        if total:
            size = max(size, int(config.gpu_memory_utilization * total))
    return device, size


def _device_key(device: str) -> str:
    """The device memory is counted on: "auto" and "cuda" resolved as the backends resolve them."""
    if device == "cpu":
        return "cpu"
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return device


def _free_memory(device: str) -> int | None:
    """Free memory of a device now (CUDA's free memory; the host's MemAvailable for cpu); None if unknown."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _total_memory(device: str) -> int | None:
    import torch

    return int(torch.cuda.mem_get_info(torch.device(device))[1])


def _probe(backend: ReferenceBackend, info: ModelInfo) -> None:
    """A forward on fixed tokens: every log-prob must be a finite number <= 0 (NaN or inf weights fail here)."""
    tokens = probe_tokens(info.vocab_size)
    values = backend.score([tokens], [1]).values
    if len(values) != 1 or len(values[0]) != len(tokens) - 1:
        raise FailedPrecondition("probe forward: the backend returned the wrong number of log-probs")
    values = np.asarray(values[0], dtype=np.float64)
    if not np.isfinite(values).all() or (values > LOGPROB_SLACK).any():
        raise FailedPrecondition(
            f"probe forward: the weights give log-probs that are not finite numbers <= 0 (e.g. {values[~np.isfinite(values) | (values > LOGPROB_SLACK)][0]:g}): "
            "the checkpoint is broken"
        )


def _close(served: ServedModel) -> None:
    if served.owns_backend:
        served.backend.close()
    if served.owned_folder is not None:
        _remove_mixed(served.owned_folder)


def _describe(error: BaseException) -> str:
    """A load failure in a line, for the operator who asked: out of memory said as such."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, MemoryError) or "out of memory" in text.lower():
        return f"out of memory ({text[:200]})"
    return f"{type(error).__name__}: {text[:300]}"


def _mib(size: int) -> str:
    return f"{size / MIB:,.0f} MiB"
