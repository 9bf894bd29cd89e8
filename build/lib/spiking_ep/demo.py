"""`seqep demo`: train analog EP on IMDB → convert to spiking → spiking evaluation → energy → NIR, one command.

Stages, each re-runnable on its own (a second `seqep demo` picks up where an interrupted one stopped):

1. train    the IMDB `smoke` preset into OUT (default runs/demo) with `analog_ep.train.trainer.train_run`;
            a finished run is reused (unless --fresh), an interrupted one resumes from checkpoints/last.pt
2. convert  sigma-delta units (the default coding), event-driven attention, OUT/spiking.json
3. compare  `seqep compare` on the test subset under the cmos45nm and loihi profiles: OUT/compare/
4. nir      OUT/model.nir and its round trip through norse and snntorch on the first test samples

Data: $SEQEP_DATA_DIR, else ../shared/data next to the repository (the Makefile sets the variable),
else a clear error. Timings per stage go to OUT/demo.json.

Threads: every stage runs with one torch thread by default. The smoke model's products are small, and
on a shared 2-core CPU two OpenMP threads oversubscribe the cores: training then takes several times
longer for the same accuracy. The accuracies the demo reports are the ones its own run measured.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analog_ep.errors import ConfigError, DataError
from analog_ep.train.run_dir import write_json

DEFAULT_OUT = Path("runs") / "demo"
DEFAULT_TIMESTEPS = (8, 16, 32, 64)
STAGES = ("train", "convert", "compare", "nir")
PROFILES = ("cmos45nm", "loihi")
NIR_SAMPLES, NIR_STEPS = 256, 256
REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_data_dir(root: Path = REPO_ROOT) -> Path:
    """$SEQEP_DATA_DIR, else ROOT/../shared/data (then exported for this process), else DataError."""
    env = os.environ.get("SEQEP_DATA_DIR")
    if env:
        if not Path(env).is_dir():
            raise DataError(f"SEQEP_DATA_DIR={env} is not a directory")
        return Path(env)
    fallback = (root / ".." / "shared" / "data").resolve()
    if fallback.is_dir():
        os.environ["SEQEP_DATA_DIR"] = str(fallback)
        return fallback
    raise DataError(f"no data: set SEQEP_DATA_DIR to the folder holding imdb/ and vectors/ (see docs/data.md); "
                    f"the fallback {fallback} does not exist")


def _log(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def prepare_out_dir(out: Path, fresh: bool) -> None:
    """--fresh deletes OUT, but only if it is empty or a run directory (never an unrelated folder)."""
    if not fresh or not out.exists():
        return
    if not out.is_dir() or not ((out / "config.json").is_file() or not any(out.iterdir())):
        raise ConfigError(f"--fresh would delete {out}, which is not a seqep run directory: pick another --out")
    shutil.rmtree(out)


def train_stage(out: Path, fresh: bool, progress: bool, command: str) -> dict[str, Any]:
    """Train the smoke preset, resume an interrupted run, or reuse a finished one."""
    from analog_ep.train.config import load_preset
    from analog_ep.train.run_dir import load_run_config
    from analog_ep.train.trainer import train_run

    prepare_out_dir(out, fresh)
    report_path = out / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("status") == "completed":
            _log(f"      reusing the finished run in {out} (test accuracy {report['test_accuracy']:.4f}; "
                 "--fresh to retrain)", progress)
            return report
    resume = (out / "checkpoints" / "last.pt").is_file()
    cfg = load_run_config(out) if resume else load_preset("imdb", "smoke")
    if resume:
        _log(f"      resuming the interrupted run in {out}", progress)
    return train_run(cfg, out, resume=resume, progress=progress, command=command)


def nir_stage(out: Path, progress: bool) -> dict[str, Any]:
    """Export OUT/model.nir and run it through norse (and snntorch) against our reference on the first test
    samples."""
    import torch

    from analog_ep.train.checkpoint import load_model
    from spiking_ep.evaluate import run_batches
    from spiking_ep.nir_consumers import round_trip as check_round_trip
    from spiking_ep.nir_export import export_nir

    net, _ = load_model(out)
    try:
        import norse  # noqa: F401 - optional extra (seqep[norse]); without it: export only
    except ImportError:
        export = export_nir(net, out / "model.nir")
        _log(f"      {export.summary()}; norse is not installed: no round trip (pip install norse --no-deps)", progress)
        return {"path": str(export.path), "check": None}
    batches, _, _ = run_batches(out, "test", NIR_SAMPLES, NIR_SAMPLES, progress=False)
    x, y = next(batches)
    with torch.no_grad():
        check = check_round_trip(export_nir(net, out / "model.nir").path, net, x, NIR_STEPS, y)
    export = export_nir(net, out / "model.nir", metadata={"round_trip": json.dumps(check)})  # the file records it
    _log(f"      {export.summary()}", progress)
    return {"path": str(export.path), "check": check}


def run_demo(out: str | Path = DEFAULT_OUT, timesteps: Sequence[int] = DEFAULT_TIMESTEPS, fresh: bool = False,
             limit: int | None = None, skip: Sequence[str] = (), progress: bool = True,
             command: str = "seqep demo", threads: int | None = 1) -> dict[str, Any]:
    """All four stages; returns (and writes to OUT/demo.json) what the final table shows."""
    from spiking_ep.energy.compare import torch_threads

    unknown = set(skip) - set(STAGES)
    if unknown:
        raise ConfigError(f"--skip {sorted(unknown)}: stages are {', '.join(STAGES)}")
    with torch_threads(threads):
        return _run_stages(Path(out), timesteps, fresh, limit, skip, progress, command)


def _run_stages(out: Path, timesteps: Sequence[int], fresh: bool, limit: int | None, skip: Sequence[str],
                progress: bool, command: str) -> dict[str, Any]:
    from spiking_ep.convert import save_spiking_config, to_spiking
    from spiking_ep.energy.compare import CompareOptions, compare_run
    from spiking_ep.energy.report import headline, load_report

    start = time.perf_counter()
    data_dir = resolve_data_dir()
    seconds: dict[str, float] = {}
    summary: dict[str, Any] = {"out": str(out), "data_dir": str(data_dir), "command": command}

    def stage(i: int, name: str, what: str) -> bool:
        run = name not in skip
        _log(f"[{i}/4] {name}: {what}" + ("" if run else " (skipped)"), progress)
        return run

    t = time.perf_counter()
    if stage(1, "train", "analog EP, IMDB smoke preset"):
        summary["train"] = {k: v for k, v in train_stage(out, fresh, progress, command).items()
                            if k in ("status", "test_accuracy", "val_accuracy", "train_minutes", "n_test")}
    seconds["train"] = time.perf_counter() - t
    t = time.perf_counter()
    if stage(2, "convert", "sigma-delta units, event-driven attention"):
        # event-driven attention: a review's attention is recomputed only when its first FC layer moved (docs/energy.md
        # §5); herding, the conversion's default, loses 3.7 pp at T = 8 on this model
        snet = to_spiking(out, attention="event")
        _log(f"      wrote {save_spiking_config(snet, out)}", progress)
    seconds["convert"] = time.perf_counter() - t
    t = time.perf_counter()
    what = f"spiking evaluation at T = {', '.join(map(str, timesteps))}, energy ({', '.join(PROFILES)})"
    if stage(3, "compare", what):
        compare_run(out, limit=limit, options=CompareOptions(timesteps=timesteps, profiles=PROFILES, threads=None,
                                                             progress=progress, command=command))
    seconds["compare"] = time.perf_counter() - t
    t = time.perf_counter()
    if stage(4, "nir", "export to NIR, round trip through norse and snntorch"):
        summary["nir"] = nir_stage(out, progress)
    seconds["nir"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    summary["seconds"] = seconds
    if (out / "compare" / "compare.json").is_file():
        summary["compare"] = headline(load_report(out))
    write_json(out / "demo.json", summary)
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """The final table (`compare.console_table`) between the training result and the NIR round trip."""
    from spiking_ep.energy.report import console_table

    lines = [f"seqep demo: {summary['out']}  (wall time {summary['seconds']['total'] / 60:.1f} min)"]
    train = summary.get("train")
    if train:
        lines.append(f"analog EP training: {train.get('status')}, test accuracy {100 * train['test_accuracy']:.2f} % "
                     f"on {train.get('n_test')} reviews, {train.get('train_minutes', 0):.1f} min")
    if summary.get("compare"):
        lines += ["", console_table(summary["compare"])]
    nir = summary.get("nir")
    if nir and not nir["check"]:
        lines.append(f"NIR:    {nir['path']} (no round trip: norse is not installed)")
    elif nir:
        c = nir["check"]
        trips = ", ".join(f"{name} {100 * r['identical_output_trains']:.1f} % (max count difference "
                          f"{r['max_count_difference']:.0f})" for name, r in c["consumers"].items())
        lines.append(f"NIR:    {nir['path']}: round trip on {c['samples']} reviews × {c['steps']} steps, identical "
                     f"output spike trains: {trips}; the IF-only export agrees with analog on "
                     f"{100 * c['agreement_with_analog']:.1f} %, accuracy "
                     f"{100 * c.get('accuracy', float('nan')):.2f} %")
    lines.append("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()))
    return "\n".join(lines)
