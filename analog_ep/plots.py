"""Plots of a run directory: accuracy, loss, free-phase convergence (residual and Φ), time per epoch."""

from __future__ import annotations

import json
from pathlib import Path

from analog_ep.runs import read_jsonl


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
