"""GPU readings from NVML: the only module that imports pynvml.

Every NVML call goes through :class:`GpuMonitor`, which returns readings or an explicit
"unknown" and never raises. NVML can block forever inside the driver (after an Xid error,
while a GPU falls off the bus), so calls run on one dedicated daemon thread with a
deadline: a hung call costs the caller at most ``call_timeout_s`` once, after which every
sample answers ``TIMED_OUT`` at once, without starting another call, until the hung call
returns. The wrapper's loop and its watchdog decisions therefore never stall here.

What the fields mean (the liveness policy relies on these definitions):

* ``own_sm_percent``: SM utilisation of the caller's PIDs, from NVML's per-process samples
  (``nvmlDeviceGetProcessUtilization``). For each selected GPU, each of our PIDs counts
  with its peak ``smUtil`` among the samples since the previous :meth:`GpuMonitor.sample`
  (a window of at least 1 s and at most 30 s); a PID without samples counts 0 (the driver
  only reports processes that used the SMs). Per GPU the PIDs are summed (capped at 100);
  the result is the maximum over the GPUs. ``None`` when unknown: per-process samples
  unsupported, or none of our PIDs is visible to NVML (not in the GPU's compute-process
  list nor in its samples), as in a PID namespace where NVML reports host PIDs, or before
  the trainer has created its CUDA context.
* ``device_busy_percent``: the maximum ``nvmlDeviceGetUtilizationRates().gpu`` over the
  selected GPUs (percent of time a kernel ran, any process's); ``None`` if none answered.
  The fallback when ``own_sm_percent`` is ``None``.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import psutil

try:
    import pynvml as _nvml
except ImportError:  # nvidia-ml-py missing: behave as on a machine without NVML
    _nvml = None  # type: ignore[assignment]

__all__ = [
    "NvmlStatus",
    "GpuReading",
    "GpuSample",
    "Inventory",
    "GpuMonitor",
    "describe",
    "inventory",
    "parse_cuda_visible_devices",
    "process_tree_pids",
]

# A failed init (no driver yet, e.g. modules loading at boot) is retried this often.
_REINIT_INTERVAL_S = 30.0
# Window of per-process samples considered by one sample() (see module docstring).
_MIN_WINDOW_US = 1_000_000
_MAX_WINDOW_US = 30_000_000


class NvmlStatus(Enum):
    OK = "ok"
    NO_LIBRARY = "no-library"  # libnvidia-ml (or pynvml) not found: a machine without NVIDIA
    NO_DRIVER = "no-driver"  # library present, kernel driver not loaded
    GPU_LOST = "gpu-lost"  # NVML_ERROR_GPU_IS_LOST: fell off the bus, needs a reset
    TIMED_OUT = "timed-out"  # an NVML call hung past its deadline and has not returned
    UNSUPPORTED = "unsupported"  # the device does not support the query
    ERROR = "error"  # anything else NVML reported

    @property
    def is_problem(self) -> bool:
        """Worth an error in the journal and in STATUS=: NVML should work here but does not.
        A machine without NVML (NO_LIBRARY, e.g. a CPU box) and a query the device lacks
        (UNSUPPORTED) are facts, not problems."""
        return self in (NvmlStatus.NO_DRIVER, NvmlStatus.GPU_LOST, NvmlStatus.TIMED_OUT, NvmlStatus.ERROR)


# Worst first: the status of a sample is the worst of its parts.
_SEVERITY = (
    NvmlStatus.NO_LIBRARY,
    NvmlStatus.NO_DRIVER,
    NvmlStatus.TIMED_OUT,
    NvmlStatus.GPU_LOST,
    NvmlStatus.ERROR,
    NvmlStatus.UNSUPPORTED,
    NvmlStatus.OK,
)


def _worst(statuses: Collection[NvmlStatus]) -> NvmlStatus:
    return min(statuses, key=_SEVERITY.index, default=NvmlStatus.OK)


@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML last answered. Values are ``None`` when unknown."""

    index: int  # NVML index (PCI bus order); -1 while a UUID selection is unresolved
    uuid: str  # "GPU-..." ("" until resolved)
    name: str  # e.g. "NVIDIA GeForce RTX 4090" ("" until resolved)
    util_percent: int | None  # device utilisation (any process), percent
    mem_used_bytes: int | None
    mem_total_bytes: int | None
    status: NvmlStatus  # worst outcome of this GPU's calls (per-process support excluded)
    detail: str  # one line explaining a non-OK status, "" when OK
    temperature_c: int | None = None  # filled by inventory() only
    power_w: float | None = None  # filled by inventory() only


@dataclass(frozen=True)
class GpuSample:
    """One poll of the selected GPUs on behalf of a set of PIDs (see module docstring)."""

    taken_at_s: float  # time.time() when the sample started
    status: NvmlStatus  # worst of the whole sample; OK only if every reading is OK
    detail: str  # one line for logs, "" when OK
    gpus: tuple[GpuReading, ...]  # the selected GPUs, in selection order
    own_sm_percent: int | None  # SM% of our PIDs, per-process samples; None = unknown
    own_pids_on_gpu: tuple[int, ...]  # our PIDs that NVML lists on our GPUs, sorted
    device_busy_percent: int | None  # max device utilisation of our GPUs; None = unknown
    # True: every selected GPU that answered supports per-process samples; False: at
    # least one answered NOT_SUPPORTED (or the driver lacks the function); None: no answer.
    per_process_supported: bool | None
    # Some PID that is not ours used the SMs of our GPUs in the window; None when
    # own_sm_percent is None (ours and others' cannot be told apart then).
    others_busy: bool | None


@dataclass(frozen=True)
class Inventory:
    """Everything ``fluxgym doctor`` shows about NVML: all GPUs, not only a run's."""

    status: NvmlStatus
    detail: str
    driver_version: str | None
    nvml_version: str | None
    gpus: tuple[GpuReading, ...]


# ---------------------------------------------------------------------------------------
# Selection


def parse_cuda_visible_devices(value: str | None) -> tuple[str, ...] | None:
    """GPU selection from a ``CUDA_VISIBLE_DEVICES`` value, as CUDA reads it.

    ``None`` (unset) selects all GPUs; ``""`` selects none. Entries are indices or UUIDs
    (``GPU-...``/``MIG-...``, unique prefixes allowed); like CUDA, the list ends at the first
    entry that is neither (e.g. ``-1``). Indices are taken as NVML indices, which match
    CUDA's only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; UUIDs are unambiguous.
    """
    if value is None:
        return None
    selected: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.isdigit():
            selected.append(str(int(entry)))
        elif entry.startswith(("GPU-", "MIG-")):
            selected.append(entry)
        else:
            break
    return tuple(selected)


def process_tree_pids(root_pid: int) -> frozenset[int]:
    """``root_pid`` and all its descendants now alive; empty if the root is gone."""
    try:
        root = psutil.Process(root_pid)
        children = root.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return frozenset()
    return frozenset([root_pid, *(c.pid for c in children)])


# ---------------------------------------------------------------------------------------
# The call thread


class _Hung(Exception):
    """An NVML call passed its deadline (now or in an earlier sample) and is still running."""

    def __init__(self, fn_name: str, since_monotonic: float) -> None:
        super().__init__(fn_name)
        self.fn_name = fn_name
        self.since_monotonic = since_monotonic

    def detail(self) -> str:
        hung_s = time.monotonic() - self.since_monotonic
        return f"NVML call {self.fn_name} hung for {hung_s:.0f}s"


class _Job:
    __slots__ = ("fn", "args", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _CallThread:
    """Runs one NVML call at a time on a daemon thread; callers wait with a deadline.

    Not concurrent.futures: its workers are joined at interpreter exit, so a call hung in
    the driver would hang the wrapper's exit too. A daemon thread is simply abandoned.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._busy_fn: str | None = None
        self._busy_since = 0.0

    def hung(self) -> _Hung | None:
        with self._lock:
            return None if self._busy_fn is None else _Hung(self._busy_fn, self._busy_since)

    def call(self, deadline: float, fn: Callable[..., Any], *args: Any) -> Any:
        name = getattr(fn, "__name__", "nvml")
        with self._lock:
            if self._busy_fn is not None:
                raise _Hung(self._busy_fn, self._busy_since)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fluxgymd-nvml", daemon=True)
                self._thread.start()
            job = _Job(fn, args)
            self._busy_fn, self._busy_since = name, time.monotonic()
            since = self._busy_since
        self._jobs.put(job)
        if not job.done.wait(max(0.0, deadline - time.monotonic())):
            raise _Hung(name, since)
        if job.error is not None:
            raise job.error
        return job.result

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # handed to the caller, who classifies it
                job.error = exc
            with self._lock:
                self._busy_fn = None
            job.done.set()


# ---------------------------------------------------------------------------------------
# NVML errors -> statuses


def _error_names() -> dict[int, str]:
    if _nvml is None:
        return {}
    return {v: k for k, v in vars(_nvml).items() if k.startswith("NVML_ERROR_") and isinstance(v, int)}


_ERROR_NAMES = _error_names()


def _nvml_code(exc: BaseException) -> int | None:
    if _nvml is not None and isinstance(exc, _nvml.NVMLError):
        return int(getattr(exc, "value", -1))
    return None


def _classify(exc: BaseException) -> tuple[NvmlStatus, str]:
    """Status and one-line detail for an exception from a pynvml call. The detail names
    the error from pynvml's constants, not nvmlErrorString(): that would be one more call
    into a library that may be wedged."""
    code = _nvml_code(exc)
    if code is None:
        return NvmlStatus.ERROR, f"{type(exc).__name__}: {exc}"
    name = _ERROR_NAMES.get(code, f"NVML error {code}")
    status = {
        _nvml.NVML_ERROR_LIBRARY_NOT_FOUND: NvmlStatus.NO_LIBRARY,
        _nvml.NVML_ERROR_DRIVER_NOT_LOADED: NvmlStatus.NO_DRIVER,
        _nvml.NVML_ERROR_GPU_IS_LOST: NvmlStatus.GPU_LOST,
        _nvml.NVML_ERROR_NOT_SUPPORTED: NvmlStatus.UNSUPPORTED,
        _nvml.NVML_ERROR_FUNCTION_NOT_FOUND: NvmlStatus.UNSUPPORTED,
    }.get(code, NvmlStatus.ERROR)
    return status, name


def _is_code(exc: BaseException, *names: str) -> bool:
    code = _nvml_code(exc)
    return code is not None and any(code == getattr(_nvml, n, None) for n in names)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _process_utilization(handle: Any, since_us: int) -> Any:
    """nvmlDeviceGetProcessUtilization, asked again once if processes appeared between
    pynvml's count query and its read (NVML_ERROR_INSUFFICIENT_SIZE): a race, not a fault."""
    try:
        return _nvml.nvmlDeviceGetProcessUtilization(handle, since_us)
    except _nvml.NVMLError as exc:
        if not _is_code(exc, "NVML_ERROR_INSUFFICIENT_SIZE"):
            raise
    return _nvml.nvmlDeviceGetProcessUtilization(handle, since_us)


_process_utilization.__name__ = "nvmlDeviceGetProcessUtilization"  # for "hung" details


# ---------------------------------------------------------------------------------------
# The monitor


@dataclass
class _Target:
    """A selected GPU: the selection string and, once resolved, its handle and identity."""

    spec: str  # index or UUID as selected
    index: int
    uuid: str = ""
    name: str = ""
    handle: Any = None
    window_start_us: int | None = None  # end of the previous per-process window


@dataclass
class _GpuResult:
    reading: GpuReading
    compute_pids: frozenset[int] | None = None  # None: unknown
    samples: dict[int, int] | None = None  # pid -> peak smUtil; None: unknown
    per_process: bool | None = None  # False: unsupported; None: not asked or failed


@dataclass
class _Outcome:
    """A reading in progress for one target: values and the worst status met so far."""

    util: int | None = None
    mem_used: int | None = None
    mem_total: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    statuses: list[tuple[NvmlStatus, str]] = field(default_factory=list)

    def note(self, status: NvmlStatus, detail: str) -> None:
        self.statuses.append((status, detail))

    def reading(self, t: _Target) -> GpuReading:
        status = _worst([s for s, _ in self.statuses])
        detail = "; ".join(dict.fromkeys(d for s, d in self.statuses if s is status)) if self.statuses else ""
        return GpuReading(t.index, t.uuid, t.name, self.util, self.mem_used, self.mem_total,
                          status, detail, self.temperature_c, self.power_w)


class GpuMonitor:
    """Samples the selected GPUs through NVML with a deadline; never raises.

    ``gpus``: indices (``"0"``) or UUIDs (``"GPU-..."``); ``None`` means the process's
    ``CUDA_VISIBLE_DEVICES`` (see :func:`parse_cuda_visible_devices`) or, if unset, all
    GPUs. NVML is initialised on the first sample; a missing library is detected once and
    stays ``NO_LIBRARY``; a missing driver is retried every 30 s. Thread-safe: calls are
    serialised, and a caller waiting on another thread's sample gives up after
    ``call_timeout_s`` with ``TIMED_OUT``.
    """

    def __init__(self, gpus: tuple[str, ...] | None = None, call_timeout_s: float = 2.0,
                 environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._selection: tuple[str, ...] | None = (
            tuple(gpus) if gpus is not None else parse_cuda_visible_devices(env.get("CUDA_VISIBLE_DEVICES"))
        )
        self.call_timeout_s = call_timeout_s
        self._calls = _CallThread()
        self._lock = threading.Lock()
        self._init_status: NvmlStatus | None = None  # None: not initialised yet
        self._init_detail = ""
        self._next_init_at = 0.0
        self._targets: list[_Target] | None = None
        self._compute_fn: Callable[[Any], Any] | None = None  # first that worked, v3 or v2
        self._closed = False

    @property
    def selection(self) -> tuple[str, ...] | None:
        return self._selection

    # -- public ---------------------------------------------------------------------------

    def sample(self, pids: Collection[int]) -> GpuSample:
        """Reads the selected GPUs for ``pids`` (the run's process tree). Returns within
        about ``call_timeout_s``; never raises."""
        taken_at_s = time.time()
        deadline = time.monotonic() + self.call_timeout_s
        if not self._lock.acquire(timeout=self.call_timeout_s):
            return self._empty(taken_at_s, NvmlStatus.TIMED_OUT, "GPU monitor busy in another thread")
        try:
            return self._sample(taken_at_s, deadline, frozenset(int(p) for p in pids))
        except Exception as exc:  # a bug here must not take the wrapper down
            return self._empty(taken_at_s, NvmlStatus.ERROR, f"GPU sampling failed: {type(exc).__name__}: {exc}")
        finally:
            self._lock.release()

    def inventory(self) -> Inventory:
        """All GPUs with identity, utilisation, memory, temperature and power, plus the
        driver version; for ``fluxgym doctor`` and stall forensics. Never raises."""
        deadline = time.monotonic() + self.call_timeout_s
        if not self._lock.acquire(timeout=self.call_timeout_s):
            return Inventory(NvmlStatus.TIMED_OUT, "GPU monitor busy in another thread", None, None, ())
        try:
            return self._inventory(deadline)
        except Exception as exc:
            return Inventory(NvmlStatus.ERROR, f"GPU inventory failed: {type(exc).__name__}: {exc}", None, None, ())
        finally:
            self._lock.release()

    def close(self) -> None:
        """Shuts NVML down (unless a call is hung) and stops the call thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._init_status is NvmlStatus.OK and self._calls.hung() is None:
                try:
                    self._calls.call(time.monotonic() + self.call_timeout_s, _nvml.nvmlShutdown)
                except Exception:
                    pass  # closing anyway; a hung shutdown is abandoned with the daemon thread
            self._init_status = None
            self._calls.stop()

    def __enter__(self) -> GpuMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- init -----------------------------------------------------------------------------

    def _call(self, deadline: float, fn: Callable[..., Any], *args: Any) -> Any:
        return self._calls.call(deadline, fn, *args)

    def _ensure_init(self, deadline: float) -> None:
        """Leaves ``_init_status`` OK, or the reason NVML cannot be used now."""
        if self._init_status in (NvmlStatus.OK, NvmlStatus.NO_LIBRARY) or self._closed:
            return
        if time.monotonic() < self._next_init_at:
            return
        if _nvml is None:
            self._init_status, self._init_detail = NvmlStatus.NO_LIBRARY, "pynvml (nvidia-ml-py) is not installed"
            return
        try:
            self._call(deadline, _nvml.nvmlInit)
        except _Hung:
            raise
        except Exception as exc:
            status, name = _classify(exc)
            if status is NvmlStatus.NO_LIBRARY:
                detail = "libnvidia-ml.so.1 not found (no NVIDIA driver installed)"
            elif status is NvmlStatus.NO_DRIVER:
                detail = "NVIDIA kernel driver not loaded (nvmlInit: NVML_ERROR_DRIVER_NOT_LOADED)"
            else:
                status, detail = (NvmlStatus.ERROR if status is NvmlStatus.UNSUPPORTED else status), f"nvmlInit failed: {name}"
            self._init_status, self._init_detail = status, detail
            self._next_init_at = time.monotonic() + _REINIT_INTERVAL_S
            return
        self._init_status, self._init_detail = NvmlStatus.OK, ""
        self._targets = None  # resolve afresh after each successful init

    def _resolve_targets(self, deadline: float) -> list[_Target]:
        if self._targets is None:
            if self._selection is None:
                count = int(self._call(deadline, _nvml.nvmlDeviceGetCount))
                self._targets = [_Target(spec=str(i), index=i) for i in range(count)]
            else:
                self._targets = [
                    _Target(spec=s, index=int(s) if s.isdigit() else -1, uuid="" if s.isdigit() else s)
                    for s in self._selection
                ]
        return self._targets

    def _handle(self, deadline: float, t: _Target) -> Any:
        """The NVML handle of ``t``, resolved on first use (and retried while unresolved)."""
        if t.handle is not None:
            return t.handle
        spec = t.spec
        if spec.isdigit():
            handle = self._call(deadline, _nvml.nvmlDeviceGetHandleByIndex, int(spec))
        else:
            try:
                handle = self._call(deadline, _nvml.nvmlDeviceGetHandleByUUID, spec)
            except Exception as exc:
                if not _is_code(exc, "NVML_ERROR_NOT_FOUND", "NVML_ERROR_INVALID_ARGUMENT"):
                    raise
                handle = self._handle_by_uuid_prefix(deadline, spec)
        t.index = int(self._call(deadline, _nvml.nvmlDeviceGetIndex, handle))
        t.uuid = _text(self._call(deadline, _nvml.nvmlDeviceGetUUID, handle))
        t.name = _text(self._call(deadline, _nvml.nvmlDeviceGetName, handle))
        t.handle = handle
        return handle

    def _handle_by_uuid_prefix(self, deadline: float, prefix: str) -> Any:
        # CUDA_VISIBLE_DEVICES accepts a unique UUID prefix; NVML wants the whole UUID.
        count = int(self._call(deadline, _nvml.nvmlDeviceGetCount))
        matches = []
        for i in range(count):
            try:
                h = self._call(deadline, _nvml.nvmlDeviceGetHandleByIndex, i)
                if _text(self._call(deadline, _nvml.nvmlDeviceGetUUID, h)).startswith(prefix):
                    matches.append(h)
            except _Hung:
                raise
            except Exception:
                continue  # a lost GPU cannot be the one asked for by prefix; keep looking
        if len(matches) != 1:
            raise LookupError(f"GPU {prefix!r} not found" if not matches else f"GPU {prefix!r} is ambiguous")
        return matches[0]

    # -- sampling -------------------------------------------------------------------------

    def _empty(self, taken_at_s: float, status: NvmlStatus, detail: str,
               gpus: tuple[GpuReading, ...] = ()) -> GpuSample:
        return GpuSample(taken_at_s, status, detail, gpus, None, (), None, None, None)

    def _unknown_readings(self, status: NvmlStatus, detail: str) -> tuple[GpuReading, ...]:
        return tuple(GpuReading(t.index, t.uuid, t.name, None, None, None, status, detail)
                     for t in (self._targets or []))

    def _sample(self, taken_at_s: float, deadline: float, pids: frozenset[int]) -> GpuSample:
        if self._closed:
            return self._empty(taken_at_s, NvmlStatus.ERROR, "GPU monitor closed")
        hung = self._calls.hung()
        if hung is not None:  # never pile a second call onto a wedged driver
            return self._empty(taken_at_s, NvmlStatus.TIMED_OUT, hung.detail(),
                               self._unknown_readings(NvmlStatus.TIMED_OUT, hung.detail()))
        results: list[_GpuResult] = []
        try:
            self._ensure_init(deadline)
            if self._init_status is not NvmlStatus.OK:
                assert self._init_status is not None
                return self._empty(taken_at_s, self._init_status, self._init_detail)
            targets = self._resolve_targets(deadline)
            for t in targets:
                results.append(self._read(deadline, t))
        except _Hung as h:
            done = len(results)
            rest = tuple(GpuReading(t.index, t.uuid, t.name, None, None, None, NvmlStatus.TIMED_OUT, h.detail())
                         for t in (self._targets or [])[done:])
            readings = tuple(r.reading for r in results) + rest
            return self._empty(taken_at_s, NvmlStatus.TIMED_OUT, h.detail(), readings)
        except Exception as exc:  # e.g. nvmlDeviceGetCount failing: nothing to read
            status, name = _classify(exc)
            return self._empty(taken_at_s, status, f"NVML device list: {name}")
        return self._combine(taken_at_s, results, pids)

    def _ask(self, deadline: float, out: _Outcome, label: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Calls fn; on an NVML error notes it in ``out`` and returns None (_Hung passes)."""
        try:
            return self._call(deadline, fn, *args)
        except _Hung:
            raise
        except Exception as exc:
            status, name = _classify(exc)
            out.note(status, f"{label} {getattr(fn, '__name__', 'nvml')}: {name}")
            return None

    def _read_device(self, deadline: float, t: _Target, out: _Outcome, extended: bool) -> Any:
        """Identity, utilisation and memory (plus temperature and power if ``extended``)
        into ``out``. Returns the handle, or None when the GPU cannot be queried further.
        Raises only _Hung."""
        label = f"GPU {t.spec}"
        try:
            handle = self._handle(deadline, t)
        except _Hung:
            raise
        except LookupError as exc:
            out.note(NvmlStatus.ERROR, str(exc))
            return None
        except Exception as exc:
            status, name = _classify(exc)
            if _is_code(exc, "NVML_ERROR_NOT_FOUND", "NVML_ERROR_INVALID_ARGUMENT"):
                out.note(NvmlStatus.ERROR, f"{label} not found ({name})")
            else:
                out.note(status, f"{label}: {name}")
            return None
        label = f"GPU {t.index}"
        util = self._ask(deadline, out, label, _nvml.nvmlDeviceGetUtilizationRates, handle)
        if util is not None:
            out.util = int(util.gpu)
        if any(s is NvmlStatus.GPU_LOST for s, _ in out.statuses):
            return None  # every further call would say the same
        mem = self._ask(deadline, out, label, _nvml.nvmlDeviceGetMemoryInfo, handle)
        if mem is not None:
            out.mem_used, out.mem_total = int(mem.used), int(mem.total)
        if extended:
            temp = self._ask(deadline, out, label, _nvml.nvmlDeviceGetTemperature, handle,
                             _nvml.NVML_TEMPERATURE_GPU)
            if temp is not None:
                out.temperature_c = int(temp)
            power_mw = self._ask(deadline, out, label, _nvml.nvmlDeviceGetPowerUsage, handle)
            if power_mw is not None:
                out.power_w = int(power_mw) / 1000.0
        return handle

    def _read(self, deadline: float, t: _Target) -> _GpuResult:
        """One selected GPU: device readings, compute PIDs, per-process samples."""
        out = _Outcome()
        handle = self._read_device(deadline, t, out, extended=False)
        if handle is None:
            return _GpuResult(out.reading(t))
        label = f"GPU {t.index}"
        compute_pids = self._compute_pids(deadline, handle, out, label)
        samples, per_process = self._process_samples(deadline, t, handle, out, label)
        return _GpuResult(out.reading(t), compute_pids, samples, per_process)

    def _compute_pids(self, deadline: float, handle: Any, out: _Outcome, label: str) -> frozenset[int] | None:
        fns = [self._compute_fn] if self._compute_fn else [
            _nvml.nvmlDeviceGetComputeRunningProcesses_v3, _nvml.nvmlDeviceGetComputeRunningProcesses_v2]
        for fn in fns:
            try:
                procs = self._call(deadline, fn, handle)
            except _Hung:
                raise
            except Exception as exc:
                if _is_code(exc, "NVML_ERROR_FUNCTION_NOT_FOUND"):
                    continue  # older driver: try the older version
                status, name = _classify(exc)
                out.note(status, f"{label} {fn.__name__}: {name}")
                return None
            self._compute_fn = fn
            return frozenset(int(p.pid) for p in procs)
        return None  # no version available: unknown, not an error

    def _process_samples(self, deadline: float, t: _Target, handle: Any, out: _Outcome,
                         label: str) -> tuple[dict[int, int] | None, bool | None]:
        now_us = time.time_ns() // 1000
        since_us = now_us - _MIN_WINDOW_US
        if t.window_start_us is not None:
            since_us = min(since_us, t.window_start_us)
        since_us = max(since_us, now_us - _MAX_WINDOW_US)
        try:
            raw = self._call(deadline, _process_utilization, handle, since_us)
        except _Hung:
            raise
        except Exception as exc:
            # pynvml raises NVMLError(NVML_SUCCESS) when a driver answers "0 samples" that way
            if _is_code(exc, "NVML_ERROR_NOT_FOUND", "NVML_SUCCESS"):
                raw = []  # no process used the SMs in the window
            elif _is_code(exc, "NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND"):
                return None, False  # a device/driver limit, not a fault: device level it is
            else:
                status, name = _classify(exc)
                out.note(status, f"{label} nvmlDeviceGetProcessUtilization: {name}")
                return None, None
        t.window_start_us = now_us
        peaks: dict[int, int] = {}
        for s in raw:
            pid, sm = int(s.pid), int(s.smUtil)
            if sm > 100:  # NVML marks invalid values with large numbers
                continue
            peaks[pid] = max(peaks.get(pid, 0), sm)
        return peaks, True

    def _combine(self, taken_at_s: float, results: list[_GpuResult], pids: frozenset[int]) -> GpuSample:
        readings = tuple(r.reading for r in results)
        status = _worst([r.status for r in readings])
        detail = "; ".join(r.detail for r in readings if r.status is status and r.detail)
        if not readings:
            detail = "no GPUs selected" if self._selection is not None else "no GPUs found"

        utils = [r.util_percent for r in readings if r.util_percent is not None]
        device_busy = max(utils) if utils else None

        answered = [r for r in results if r.per_process is not None]
        per_process: bool | None = None
        if answered:
            per_process = all(r.per_process for r in answered)

        visible: set[int] = set()
        for r in results:
            visible |= (r.compute_pids or frozenset()) | set(r.samples or {})
        own_pids = tuple(sorted(pids & visible))

        own_sm: int | None = None
        others_busy: bool | None = None
        if per_process and own_pids:
            per_gpu = [min(100, sum(sm for pid, sm in r.samples.items() if pid in pids))
                       for r in answered if r.samples is not None]
            own_sm = max(per_gpu) if per_gpu else None
            if own_sm is not None:
                others_busy = any(sm > 0 and pid not in pids
                                  for r in answered if r.samples is not None for pid, sm in r.samples.items())
        return GpuSample(taken_at_s, status, detail, readings, own_sm, own_pids, device_busy,
                         per_process, others_busy)

    # -- inventory ------------------------------------------------------------------------

    def _inventory(self, deadline: float) -> Inventory:
        hung = self._calls.hung()
        if hung is not None:
            return Inventory(NvmlStatus.TIMED_OUT, hung.detail(), None, None, ())
        try:
            self._ensure_init(deadline)
            if self._init_status is not NvmlStatus.OK:
                assert self._init_status is not None
                return Inventory(self._init_status, self._init_detail, None, None, ())
            driver = nvml_version = None
            try:
                driver = _text(self._call(deadline, _nvml.nvmlSystemGetDriverVersion))
                nvml_version = _text(self._call(deadline, _nvml.nvmlSystemGetNVMLVersion))
            except _Hung:
                raise
            except Exception:
                pass  # versions are nice to have
            count = int(self._call(deadline, _nvml.nvmlDeviceGetCount))
            readings: list[GpuReading] = []
            for i in range(count):
                readings.append(self._inventory_one(deadline, _Target(spec=str(i), index=i)))
        except _Hung as h:
            return Inventory(NvmlStatus.TIMED_OUT, h.detail(), None, None, ())
        except Exception as exc:
            status, name = _classify(exc)
            return Inventory(status, f"NVML device list: {name}", None, None, ())
        status = _worst([r.status for r in readings])
        detail = "; ".join(r.detail for r in readings if r.status is status and r.detail)
        return Inventory(status, detail, driver, nvml_version, tuple(readings))

    def _inventory_one(self, deadline: float, t: _Target) -> GpuReading:
        out = _Outcome()
        self._read_device(deadline, t, out, extended=True)
        return out.reading(t)


# ---------------------------------------------------------------------------------------
# Text


def describe(sample: GpuSample) -> str:
    """Short text for ``STATUS=`` and logs: "GPU 97%", "GPU 0 lost", "NVML hung", ..."""
    s = sample.status
    if s is NvmlStatus.NO_LIBRARY:
        return "GPU n/a (no NVML)"
    if s is NvmlStatus.NO_DRIVER:
        return "GPU n/a (no driver)"
    if s is NvmlStatus.TIMED_OUT:
        return "NVML hung"
    if s is NvmlStatus.GPU_LOST:
        lost = ",".join(str(r.index) for r in sample.gpus if r.status is NvmlStatus.GPU_LOST)
        return f"GPU {lost} lost"
    percent = sample.own_sm_percent if sample.own_sm_percent is not None else sample.device_busy_percent
    if percent is not None:
        return f"GPU {percent}%"
    if not sample.gpus and s is NvmlStatus.OK:
        return "GPU n/a (none)"
    if s is NvmlStatus.ERROR:
        return "GPU n/a (NVML error)"
    return "GPU n/a"


def inventory(call_timeout_s: float = 5.0) -> Inventory:
    """One-shot :meth:`GpuMonitor.inventory` of all GPUs (``fluxgym doctor``)."""
    monitor = GpuMonitor(gpus=None, call_timeout_s=call_timeout_s, environ={})
    try:
        return monitor.inventory()
    finally:
        monitor.close()
