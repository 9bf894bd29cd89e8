"""Which precision the fast path runs at here: what this machine can do, a short measured calibration, and the rule
that turns a request ("auto", "fp32", "bf16", "int8", or an opt-in: "int8-library", "bf16-emulated") into a mode
(`analog_ep.phi.PRECISIONS`).

Why: the fast path's modes are only fast on some machines. int8 is fast through our kernels (AMX, or AVX2 where
AMX is missing); without them it runs oneDNN's int8 kernels, which on an AVX2-only CPU take hundreds of times as
long as fp32, so a run never finishes. bf16 is fast where the CPU has bf16 dot products (AVX512-BF16, AMX); on
a CPU without them torch
emulates every bf16 product, 26-49 times slower than fp32 (both measured: `INT8_WITHOUT_KERNELS`,
`BF16_WITHOUT_INSTRUCTIONS`). So:

- A mode that would be such a trap here is refused (ConfigError, with the reason, the measurement and the
  alternatives): "int8" without our int8 kernels, "bf16" on a CPU without bf16 instructions. Its opt-in name
  ("int8-library", "bf16-emulated") runs it anyway, on purpose (e.g. to measure it).
- "bf16" where its products measure slower than fp32 for another reason runs, with one warning that says so.
- "int8" on our AVX2 kernels where the exact path folds the first synapse (and `ep.fold_keys` is not "off")
  runs the exact path, folded, and says why: int8 took 1.6-4.7 times its time there. With `ep.fold_keys=off`
  int8 runs (it is then faster than the unfolded exact path), as it does, with a warning, where FC-1 is below
  AVX2_INT8_MIN_WEIGHTS.
- "auto" times the first synapse's two products of a step (h·W and x·Wᵀ, 64 rows) once per mode that runs
  faithfully here (fp32; bf16 where the CPU has bf16 instructions; int8 on our kernels only) and picks the
  fastest, a low-precision mode only where it is at least MIN_SPEEDUP times as fast as fp32. On a CPU with
  neither bf16 instructions nor our int8 kernels it is fp32 without measuring. Where the exact path folds the
  first synapse (`folded`) and the int8 kernels are not AMX ones, it is fp32 (folded); our AVX2 int8 kernels
  are a candidate from AVX2_INT8_MIN_WEIGHTS weights in FC-1. Where the CPU has no bf16 instructions, int8
  runs its other products in fp32 (`lowp_weights.lowp_dtype`). The timings are cached as JSON per machine (CPU model,
  flags, torch version, threads, device) and shape class under the seqep cache directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from analog_ep.errors import ConfigError, DataError
from analog_ep.fast import native_kernels
from analog_ep.fast.native_kernels import BF16_INSTRUCTIONS

if TYPE_CHECKING:
    from analog_ep.spec import GraphSpec

SLOW_INT8 = "int8-library"  # the explicit opt-in: int8 without our int8 kernels (oneDNN's int8 products)
SLOW_BF16 = "bf16-emulated"  # the explicit opt-in: bf16 on a CPU without bf16 dot-product instructions
OPT_INS = {SLOW_INT8: "int8", SLOW_BF16: "bf16"}  # each opt-in and the mode it runs
REQUESTS = ("auto", "fp32", "bf16", "int8", SLOW_INT8, SLOW_BF16)
# Our AVX2 int8 kernels are a candidate from this many weights in FC-1 (on an AVX2-only CPU, per batch against fp32:
# imdb-cpu's 160,000 1.17× slower, snli-cpu's 1.3 M unfolded 1.49× faster, imdb-paper's 180 M 2.9× faster;
# docs/benchmarks.md): below it the products' speed-up is lost in the int8 path's other work
AVX2_INT8_MIN_WEIGHTS = 1 << 20
MIN_SPEEDUP = 1.1  # a lossy mode must beat fp32 by this factor: timing noise must not trade exactness for nothing
ROWS = 64  # rows of the calibration products (a training batch's order of magnitude)
MAX_CALIBRATION_IN = 1 << 13  # FC-1 inputs measured at most: a product's time grows linearly past it
REPEATS = 7  # timed samples per mode; the median is kept
SAMPLE_SECONDS = 0.05  # a sample repeats the products until it lasts this long (small shapes: timer and noise)
CLEARLY_SLOWER = 10.0  # a mode whose first call takes this many fp32 medians (and > 1 s) is not timed again
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
CACHE_FOLDER = "precision"
CALIBRATION_VERSION = 2  # bumped when `measure` changes: older cached timings are measured again

_warned: set[str] = set()


@dataclass(frozen=True)
class Machine:
    """What decides which mode is fastest: the processor (or GPU), its instruction sets, torch, threads."""

    device: str  # "cpu" or "cuda"
    model: str  # CPU model name or GPU name
    flags: tuple[str, ...]  # the CPU's flags (all of them: they key the cache)
    torch: str
    threads: int

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"device": self.device, "model": self.model, "isa": [f for f in ISA_FLAGS if f in self.flags],
                "torch": self.torch, "threads": self.threads}


def this_machine(device: str = "cpu") -> Machine:
    kind = torch.device(device).type
    model = torch.cuda.get_device_name(torch.device(device)) if kind == "cuda" else native_kernels.cpu_model()
    return Machine(kind, model, tuple(native_kernels.cpu_flags() or ()), torch.__version__, torch.get_num_threads())


def emulates_bf16(machine: Machine) -> bool:
    """Whether this is an x86 CPU without bf16 dot-product instructions, where torch emulates every bf16 product.
    False where the flags do not say (another architecture, no /proc/cpuinfo): nothing is refused on a guess."""
    return machine.device == "cpu" and native_kernels.emulates_bf16(machine.flags)


@dataclass(frozen=True)
class SlowMode:
    """A mode that runs on some machines far slower than fp32: what it needs to be fast, what runs it without
    that, and the measurement; refused there unless requested by its opt-in name."""

    mode: str
    opt_in: str
    needs: str
    runs_instead: str
    how_slow: str
    measured: str

    def refusal(self, why: str, alternatives: str) -> ConfigError:
        return ConfigError(
            f"precision {self.mode} needs {self.needs}, which are not available here ({why}); without them {self.mode} "
            f"runs {self.runs_instead}, {self.how_slow} ({self.measured}), so a run would take many times as long "
            f"as in fp32. Use precision {alternatives}; to run {self.mode} anyway, precision {self.opt_in}")

    def opted_in(self, why: str) -> str:
        return f"{self.mode}: requested as {self.opt_in}: {self.runs_instead} ({why})"


INT8_WITHOUT_KERNELS = SlowMode(
    "int8", SLOW_INT8, "our int8 kernels (AMX, or AVX2 with FMA and a C compiler)", "oneDNN's int8 kernels",
    "hundreds of times slower than fp32 on an AVX2-only CPU",
    "measured on an AMD EPYC with AVX2 only (docs/benchmarks.md): a step's two products with a 1,024 × 8,192 "
    "synapse, 64 rows, 8.8 s in int8 against 0.026 s in fp32")
BF16_WITHOUT_INSTRUCTIONS = SlowMode(
    "bf16", SLOW_BF16, f"bf16 dot-product instructions ({' or '.join(BF16_INSTRUCTIONS)})",
    "torch's emulated bf16 products", "26-49 times slower than fp32",
    "measured on an AMD EPYC with AVX2 only (docs/benchmarks.md): a step's two FC-1 products, 64 rows, "
    "1,222 ms in bf16 against 46 ms in fp32 at the snli-paper shape class, 13.3 ms against 0.27 ms at the "
    "smoke shape class")


def _alternatives(refused: str, usable: dict[str, bool]) -> str:
    """The requests that run well here instead of `refused`: auto, fp32 and the other fast modes this machine has."""
    names = ["auto (the fastest faithful mode here)", "fp32", *(m for m, ok in usable.items() if ok and m != refused)]
    return ", ".join(names[:-1]) + " or " + names[-1]


def int8_kernels() -> tuple[bool, str]:
    """Whether our int8 kernels run in this process: (True, which: "AMX kernels" or "AVX2 kernels") or (False, why
    not)."""
    from analog_ep.fast import amx_int8, lowp_weights

    kernel = lowp_weights.int8_kernel()
    if kernel in ("amx", "avx2"):
        return True, f"{kernel.upper()} kernels"
    return False, f"AMX: {amx_int8.unavailable_reason()}; AVX2: {lowp_weights.avx2_kernels_reason()}"


@dataclass(frozen=True)
class ShapeClass:
    """The calibration products: h (rows × hidden) · W and x (rows × inputs) · Wᵀ, W (hidden × inputs); sizes are
    rounded up to powers of two (and inputs capped) so that similar networks share one calibration."""

    rows: int
    inputs: int
    hidden: int

    @classmethod
    def of(cls, spec: GraphSpec) -> ShapeClass:
        inputs, hidden = spec.fc_input_size, spec.layers[0]
        return cls(ROWS, min(_next_power_of_two(inputs), MAX_CALIBRATION_IN), _next_power_of_two(hidden))

    def key(self) -> str:
        return f"{self.rows}x{self.inputs}x{self.hidden}"


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def _first_synapse_weights(spec: GraphSpec) -> int:
    return spec.fc_input_size * spec.layers[0]


def has_large_synapse(spec: GraphSpec) -> bool:
    """Whether the fast path runs any product in low precision for this graph (a synapse of ≥ LOWP_MIN_WEIGHTS)."""
    from analog_ep.fast.lowp_phi import LOWP_MIN_WEIGHTS

    sizes = [spec.fc_input_size, *spec.layers]
    return max(a * b for a, b in zip(sizes[:-1], sizes[1:])) >= LOWP_MIN_WEIGHTS


# ------------------------------------------------------------------ measurement
def _products(mode: str, w: torch.Tensor, h: torch.Tensor, x: torch.Tensor) -> Callable[[], object]:
    """One step's two products with W in `mode`, as the fast path (or the exact path, fp32) takes them."""
    if mode == "fp32":
        return lambda: (torch.mm(h, w), torch.mm(x, w.t()))
    from analog_ep.fast.lowp_weights import Bf16Weight, Int8Weight

    low = Bf16Weight(w) if mode == "bf16" else Int8Weight(w, rows_hint=h.shape[0])
    return lambda: low.down_up(h, x)


def measure(shape: ShapeClass, modes: tuple[str, ...], device: str = "cpu") -> dict[str, float]:
    """Median seconds of one step's two products per mode. The modes are timed in interleaved rounds, so that other
    work on a shared machine slows all of them alike, and each sample repeats a small product until it lasts
    SAMPLE_SECONDS. A mode whose first call is already CLEARLY_SLOWER than fp32 is not timed again (a bf16
    product without bf16 hardware can take seconds)."""
    gen = torch.Generator().manual_seed(0)  # a private generator: the caller's random stream is left alone
    w = torch.randn(shape.hidden, shape.inputs, generator=gen).to(device)
    h, x = torch.rand(shape.rows, shape.hidden, generator=gen).to(device), torch.rand(
        shape.rows, shape.inputs, generator=gen).to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed(call: Callable[[], object], times: int = 1) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(times):
            call()
        sync()
        return (time.perf_counter() - start) / times

    calls = {mode: _products(mode, w, h, x) for mode in ("fp32", *(m for m in modes if m != "fp32"))}
    seconds: dict[str, float] = {}
    loops: dict[str, int] = {}

    def clearly_slower(t: float) -> bool:
        return "fp32" in seconds and t > max(1.0, CLEARLY_SLOWER * seconds["fp32"])

    for mode, call in calls.items():
        once = timed(call)  # warm-up: primitive creation, packing, page faults; already decisive if clearly slower
        if not clearly_slower(once):
            once = timed(call)
        if clearly_slower(once):
            seconds[mode] = once
        else:
            loops[mode] = max(1, math.ceil(SAMPLE_SECONDS / max(once, 1e-9)))
            if mode == "fp32":
                seconds["fp32"] = once  # provisional: the yardstick of CLEARLY_SLOWER, replaced by the median
    samples: dict[str, list[float]] = {mode: [] for mode in loops}
    for _ in range(REPEATS):
        for mode in loops:
            samples[mode].append(timed(calls[mode], loops[mode]))
    seconds.update({mode: statistics.median(times) for mode, times in samples.items()})
    return seconds


# ------------------------------------------------------------------ cache
def _cache_file(machine: Machine) -> Path | None:
    from analog_ep.data.cache import resolve_cache_dir

    try:
        return resolve_cache_dir() / CACHE_FOLDER / f"{machine.key()}.json"
    except DataError:
        return None


def _read(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("version") == CALIBRATION_VERSION else {}


def _write(path: Path | None, data: dict) -> None:
    """Atomically (a temporary file moved into place); a cache that cannot be written is skipped."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except OSError:
        pass


def calibration(spec: GraphSpec, device: str = "cpu", modes: tuple[str, ...] = ("fp32", "bf16")
                ) -> dict[str, float]:
    """Seconds per mode of one step's two FC-1 products at this spec's shape class on this machine; measured once
    per machine and shape class (and per mode), then read from the cache."""
    machine, shape = this_machine(device), ShapeClass.of(spec)
    path = _cache_file(machine)
    data = _read(path)
    entry = data.get("shapes", {}).get(shape.key(), {})
    seconds = {m: float(s) for m, s in entry.get("seconds", {}).items() if m in modes}
    if any(m not in seconds for m in modes):  # all modes measured together: one moment's load for all of them
        seconds = measure(shape, modes, device)
        data = _read(path)  # another process may have added other shape classes meanwhile
        data["machine"], data["version"] = machine.describe(), CALIBRATION_VERSION
        data.setdefault("shapes", {})[shape.key()] = {
            "seconds": seconds, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write(path, data)
    return seconds


# ------------------------------------------------------------------ the rule
def _ratio(slow: float, fast: float) -> str:
    return f"{slow / fast:.1f}×"


def _versus_fp32(mode: str, seconds: dict[str, float]) -> str:
    s, ref = seconds[mode], seconds["fp32"]
    return (f"{mode} products {_ratio(ref, s)} faster than fp32 here" if s < ref
            else f"{mode} products {_ratio(s, ref)} slower than fp32 here")


def choose(seconds: dict[str, float], int8: tuple[bool, str]) -> tuple[str, str]:
    """The auto rule on measured seconds per mode: the fastest, a low-precision one only if it is at least
    MIN_SPEEDUP times as fast as fp32 (never one slower than fp32); the reason names the numbers. `int8`: our
    int8 kernels' (available, which or why not)."""
    fp32 = seconds["fp32"]
    fast = [m for m in ("int8", "bf16") if m in seconds and seconds[m] * MIN_SPEEDUP <= fp32]
    others = [_versus_fp32(m, seconds) for m in ("int8", "bf16") if m in seconds]
    no_int8 = [] if int8[0] else [f"int8 is no candidate here ({int8[1]})"]
    if not fast:
        return "fp32", "fp32: " + "; ".join(no_int8 + others)
    best = min(fast, key=seconds.__getitem__)
    why = [int8[1]] if best == "int8" else no_int8
    return best, f"{best}: " + "; ".join(why + [_versus_fp32(best, seconds)]
                                         + [o for o in others if not o.startswith(best)])


def resolve_precision(requested: str, spec: GraphSpec, device: str = "cpu", fold_keys: str = "auto"
                      ) -> tuple[str, str]:
    """(mode, reason) for a requested precision on this machine and device; ConfigError where the request
    cannot run usefully here (module docstring: the rule). `fold_keys` is the run's `ep.fold_keys`: with "off" an
    explicit int8 is compared with the unfolded exact path, else with the folded one where it folds."""
    if requested not in REQUESTS:
        raise ConfigError(f"precision {requested!r}: choose one of {', '.join(REQUESTS)}")
    if requested == "fp32":
        return "fp32", "fp32: requested (the exact path)"
    mode, on_cpu = OPT_INS.get(requested, requested), torch.device(device).type == "cpu"
    if mode == "int8":
        from analog_ep.fast.lowp_weights import int8_available

        if not int8_available(device):
            raise ConfigError(f"precision {requested} needs the CPU and an AVX2 or AMX CPU or a torch build with "
                              f"oneDNN's int8 linear (device is {device}); use precision auto or bf16")
        if not has_large_synapse(spec):  # nothing would run in int8: the fast path's overhead alone
            return "fp32", (f"fp32: {requested} requested, but no synapse is large enough for int8 products (the int8 "
                            f"path would take the same fp32 products with more overhead: 1.6-1.9× as long at the "
                            f"tiny shapes)")
        ours, why = int8_kernels()
        folded = _fold_beats_products(spec, device) if ours and why == "AVX2 kernels" and fold_keys != "off" else None
        if folded:  # int8 would take 1.6-4.7× the exact path's time here: the exact path runs, and says why
            return "fp32", (f"fp32: {requested} requested, but {folded} (int8 on our AVX2 kernels took 1.6× as long "
                            f"at snli-cpu, 4.7× at snli-paper); to run int8 anyway, against the unfolded exact path, "
                            f"set ep.fold_keys=off")
        if ours:
            slower = _too_small_for_avx2_int8(spec) if why == "AVX2 kernels" else None
            if slower:  # runs, as asked, but says what would be faster
                _warn_once(f"int8/{this_machine(device).key()}/{ShapeClass.of(spec).key()}",
                           f"precision int8: {slower}; precision auto (fp32 here) is as fast or faster")
                return "int8", f"int8: requested, {why}; not faster than fp32 here: {slower}"
            return "int8", f"int8: requested, {why}"
        if requested == SLOW_INT8:
            return "int8", INT8_WITHOUT_KERNELS.opted_in(why)
        raise INT8_WITHOUT_KERNELS.refusal(why, _alternatives("int8", {"bf16": not emulates_bf16(this_machine())}))
    machine = this_machine(device)
    if mode == "bf16" and on_cpu and emulates_bf16(machine):
        why = f"{machine.model} has none of {', '.join(BF16_INSTRUCTIONS)}"
        if requested == SLOW_BF16:
            return "bf16", BF16_WITHOUT_INSTRUCTIONS.opted_in(why)
        raise BF16_WITHOUT_INSTRUCTIONS.refusal(why, _alternatives("bf16", {"int8": int8_kernels()[0]}))
    if not has_large_synapse(spec):  # nothing to calibrate: no product would run in low precision
        if mode == "bf16":
            return "bf16", "bf16: requested"
        return "fp32", "fp32: no synapse is large enough for low-precision products"
    int8 = int8_kernels() if on_cpu else (False, f"int8 runs on the CPU only (device is {device})")
    if mode == "bf16":
        seconds = calibration(spec, device, ("fp32", "bf16"))
        if seconds["bf16"] > seconds["fp32"]:
            _warn_once(f"{machine.key()}/{ShapeClass.of(spec).key()}",
                       f"precision bf16: {_versus_fp32('bf16', seconds)}; precision auto or fp32 runs faster")
        return "bf16", f"bf16: requested; {_versus_fp32('bf16', seconds)}"
    emulated = on_cpu and emulates_bf16(machine)
    if on_cpu and int8[1] != "AMX kernels":
        folded = _fold_beats_products(spec, device)
        if folded:
            return "fp32", f"fp32: {folded}"
    too_small = _too_small_for_avx2_int8(spec) if int8[1] == "AVX2 kernels" else None
    if too_small:
        int8 = (False, too_small)
    if emulated and not int8[0]:
        # nothing to measure: bf16 products are emulated here (BF16_WITHOUT_INSTRUCTIONS), and a timing on a busy
        # machine could only mislead
        return "fp32", (f"fp32: this CPU has no bf16 dot-product instructions ({', '.join(BF16_INSTRUCTIONS)}) "
                        f"and int8 is no candidate here ({int8[1]})")
    modes = ("fp32", *(() if emulated else ("bf16",)), *(("int8",) if int8[0] else ()))
    return choose(calibration(spec, device, modes), int8)


def _fold_beats_products(spec: GraphSpec, device: str) -> str | None:
    """Why the exact path, folded onto the keys, beats every product mode here (measured against int8 on our AVX2
    kernels: snli-paper 1.82 against 8.47 s a batch, docs/benchmarks.md), or None where it does not fold."""
    from analog_ep.fast.folded import resolve_fold

    folds, how = resolve_fold("auto", spec, "fp32", None, 1, device)
    return f"the exact path folds here, fewer multiply-adds than any product mode; {how[4:]}" if folds else None


def _too_small_for_avx2_int8(spec: GraphSpec) -> str | None:
    """Why FC-1 is too small for our AVX2 int8 kernels to pay (`AVX2_INT8_MIN_WEIGHTS`), or None."""
    weights = _first_synapse_weights(spec)
    if weights >= AVX2_INT8_MIN_WEIGHTS:
        return None
    return f"our AVX2 kernels pay from {AVX2_INT8_MIN_WEIGHTS:,} FC-1 weights, this graph has {weights:,}"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
