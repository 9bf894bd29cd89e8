"""What a finished spiking run reports: report.json's numbers and its plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analog_ep.train.run_dir import software_versions
from spiking_ep.convert import SpikingNet
from spiking_ep.train.config import SpikingTrainConfig


def build_report(cfg: SpikingTrainConfig, snet: SpikingNet, before: dict, after: dict, curve: list[dict],
            best_epoch: int, seconds: float, meta: dict[str, Any]) -> dict[str, Any]:
    T = str(cfg.timesteps)
    return {
        "status": "completed", "backend": "spiking", "estimator": cfg.estimator, **meta,
        "spiking_train": cfg.to_dict(), "spiking": snet.config(), "timesteps": cfg.timesteps,
        "test_accuracy": after["accuracy"][T], "test_accuracy_before": before["accuracy"][T],
        "test_analog_accuracy": after["analog_accuracy"], "test_analog_accuracy_before": before["analog_accuracy"],
        "improvement": {t: after["accuracy"][t] - before["accuracy"][t] for t in after["accuracy"]},
        "before": before, "after": after, "val_accuracy": max((r["val_accuracy"] for r in curve[1:]), default=None),
        "best_epoch": best_epoch, "epochs_completed": cfg.epochs, "curve": curve, "train_minutes": seconds / 60,
        "n_test": after["samples"], "parameters": sum(p.numel() for p in snet.net.parameters()),
        "software": software_versions(),
    }


def write_plots(run_dir: Path, report: dict[str, Any]) -> None:
    """plots/training.png (`analog_ep.train.plots.plot_run`) and plots/spiking_before_after.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analog_ep.train.plots import plot_run

    plot_run(run_dir)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, res, style in (("before", report["before"], "o--"), ("after", report["after"], "o-")):
        Ts = sorted(res["accuracy"], key=int)
        ax.plot([int(t) for t in Ts], [100 * res["accuracy"][t] for t in Ts], style,
                label=f"spiking, {name} (analog {100 * res['analog_accuracy']:.1f} %)")
    ax.set(xscale="log", xlabel="timesteps T", ylabel="test accuracy (%)",
           title=f"{report['estimator']} fine-tuning at T = {report['timesteps']}")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "spiking_before_after.png", dpi=110)
    plt.close(fig)
