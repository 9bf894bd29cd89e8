"""Plots of a run directory: accuracy, loss, free-phase convergence (residual and Φ), time per epoch."""

from __future__ import annotations

import json
from pathlib import Path

from analog_ep.train.run_dir import read_jsonl


def plot_run(run_dir: str | Path) -> Path:
    """Write RUN_DIR/plots/training.png (2×2 panels) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in rows if r.get("kind") == "step"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}

    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    a = ax[0, 0]
    if steps:
        a.plot([r["epoch"] for r in steps], [r["batch_accuracy"] for r in steps], alpha=0.35, lw=0.8,
               label="train (batch)")
    if epochs:
        a.plot([r["epoch"] for r in epochs], [r["train_accuracy"] for r in epochs], "o-", label="train (epoch)")
        a.plot([r["epoch"] for r in epochs], [r["val_accuracy"] for r in epochs], "s-", label="validation")
    if "test_accuracy" in report:
        a.axhline(report["test_accuracy"], color="k", ls="--", lw=1, label=f"test {report['test_accuracy']:.3f}")
    a.set(title="accuracy", xlabel="epoch")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)

    a = ax[0, 1]
    if steps:
        a.plot([r["epoch"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="batch MSE (free phase)")
    if epochs:
        a.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="epoch mean")
    a.set(title="loss", xlabel="epoch")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)

    a = ax[1, 0]
    trace = report.get("free_phase_trace", {})
    if trace.get("residuals"):
        a.semilogy(range(1, len(trace["residuals"]) + 1), trace["residuals"], label="residual ‖Δs‖∞")
        a.set_ylabel("residual")
        if trace.get("phi"):
            b = a.twinx()
            b.plot(range(len(trace["phi"])), trace["phi"], color="tab:orange", label="Φ (mean)")
            b.set_ylabel("Φ", color="tab:orange")
    a.set(title="free phase of the final model (one validation batch)", xlabel="step")
    a.grid(alpha=0.3)

    a = ax[1, 1]
    if epochs:
        a.bar([i + 1 for i in range(len(epochs))], [r["epoch_seconds"] / 60 for r in epochs], label="train")
        a.bar([i + 1 for i in range(len(epochs))], [r["val_seconds"] / 60 for r in epochs],
              bottom=[r["epoch_seconds"] / 60 for r in epochs], label="validation")
    a.set(title="time per epoch", xlabel="epoch", ylabel="minutes")
    a.legend(fontsize=8)
    title = f"{report.get('task', '')} · {report.get('estimator', '')} · {run_dir.name}"
    fig.suptitle(title)
    fig.tight_layout()
    out = run_dir / "plots" / "training.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_frontier(runs: dict[str, list[str | Path]], out: str | Path, title: str = "") -> Path:
    """Validation accuracy vs training minutes, one colour per variant (several seeds each): the frontier.

    `runs` maps a variant label to its run directories; ● marks each run's chosen (best-validation)
    epoch and ✕ its test accuracy, where report.json has one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, a = plt.subplots(figsize=(8, 5))
    for i, (label, dirs) in enumerate(runs.items()):
        color = f"C{i % 10}" if len(runs) <= 10 else plt.cm.tab20(i % 20)  # distinct colours beyond 10 variants
        for j, run_dir in enumerate(dirs):
            run_dir = Path(run_dir)
            epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
            if not epochs:
                continue
            minutes = [r["elapsed_minutes"] for r in epochs]
            val = [r["val_accuracy"] for r in epochs]
            a.plot(minutes, val, "-", color=color, alpha=0.8, lw=1.2, label=label if j == 0 else None)
            best = max(range(len(val)), key=val.__getitem__)
            a.plot(minutes[best], val[best], "o", color=color, ms=5)
            report_path = run_dir / "report.json"
            report = json.loads(report_path.read_text()) if report_path.is_file() else {}
            if "test_accuracy" in report:
                a.plot(minutes[best], report["test_accuracy"], "x", color=color, ms=7)
    a.set(xlabel="training minutes (wall, this machine)", ylabel="validation accuracy",
          title=title or "accuracy vs training time (● best validation, ✕ test at that checkpoint)")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
