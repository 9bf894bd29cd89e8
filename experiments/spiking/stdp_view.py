"""STDP view of spiking EP: does a synapse's EP update depend on pre/post spike timing like STDP?

    python experiments/spiking/stdp_view.py [--samples 500] [--beta 0.5] [--free 128] [--nudge 32]
        [--max-lag 12] [--bin 3] [--out experiments/spiking/results/stdp_view.json]

EqSpike (Martin et al. 2021) reads EP's update as STDP. We measure it instead of assuming it. Model: the
tiny token-presence network of experiments/spiking/common.py, analog-trained for `--epochs` (default
3: ~94 % accurate, so that many samples are nudged; at 15 epochs the outputs sit saturated on their
targets and only a handful of samples move any synapse), IF units (τ = 8), herding attention. Per test
sequence: a spiking free phase of `--free` steps, then one +β nudged phase of `--nudge` steps. The
update of synapse (post i, pre j) from that sample is the spike-driven C-EP update summed over the
nudged phase (η → 0), which telescopes to

    ΔW_ij = (1/β) [ m_i m_j (end of nudge) − m_i m_j (end of free phase) ]

with m the plasticity traces of `spiking_ep.learning` (checked against `spiking_cep` to 1e-9). Its
timing statistics are the pre/post spike pairs of the nudged phase: C_ij(Δ) = #{(t_pre, t_post):
t_post − t_pre = Δ}, binned by `--bin` steps. The "STDP window" K(Δ) is the least-squares fit
ΔW_ij ≈ c + Σ_Δ K(Δ) C_ij(Δ) over all synapses and samples of a layer (and for one synapse over
samples): the weight change per spike pair at time difference Δ, the quantity an STDP experiment
measures. STDP-like = K(Δ) > 0 for Δ > 0 (pre before post) and < 0 for Δ < 0, and a fit (R²) better
than the pair count alone. Positive control: the same fit on a pair-based STDP rule applied to the
same spike trains must recover its window (it does, R² ≥ 0.9).

Pre = the lower layer, post = the upper one: Φ's synapses are symmetric, so this is a convention.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from common import test_set, train_tiny

from analog_ep.phi import one_hot_target
from spiking_ep.convert import SpikingNet, to_spiking
from spiking_ep.dynamics import SpikingState, run_phase, spiking_free_phase
from spiking_ep.learning import SpikingEPConfig, _SlowTraces, spiking_cep_on_copy

SYNAPSES = {"weights.1": "fc1 → fc2", "weights.2": "fc2 → out"}


class NudgeRecorder:
    """`on_step` hook: the plasticity traces (as `spiking_cep` keeps them) and every layer's spikes."""

    def __init__(self, slow: _SlowTraces) -> None:
        self.slow = slow
        self.spikes: list[list[torch.Tensor]] = []

    def __call__(self, old: SpikingState, new: SpikingState, spikes: list[torch.Tensor]) -> None:
        self.slow(old, new, spikes)
        self.spikes.append([s.clone() for s in spikes])

    def layer(self, n: int) -> torch.Tensor:
        """(B, steps, units) spikes of layer n."""
        return torch.stack([s[n] for s in self.spikes], 1)


def nudged_phase(snet: SpikingNet, x: torch.Tensor, y: torch.Tensor, cfg: SpikingEPConfig):
    """Free phase, then one +β nudged phase: plasticity traces at its start and end, and its spikes."""
    net = snet.net
    inputs = net.prepare(x)
    target = one_hot_target(y, net.spec.num_classes, net.weights[0].dtype)
    slow = _SlowTraces(cfg.plasticity_time_constant)
    free = spiking_free_phase(snet, inputs, cfg.free_steps, on_step=slow)
    start = slow.values(free)
    recorder = NudgeRecorder(slow)
    end_state = run_phase(snet, inputs, free, cfg.nudge_steps, beta=cfg.beta, target=target, phase="nudge",
                          on_step=recorder)
    return start, slow.values(end_state), recorder


def per_sample_updates(start: list[torch.Tensor], end: list[torch.Tensor], k: int, beta: float) -> torch.Tensor:
    """ΔW of `weights.k` per sample, (B, post, pre): post = layer k+1, pre = layer k (proj is layer 0)."""
    def hebb(m: list[torch.Tensor]) -> torch.Tensor:
        return m[k + 1].unsqueeze(2) * m[k].flatten(1).unsqueeze(1)

    return (hebb(end) - hebb(start)) / beta


def pair_counts(post: torch.Tensor, pre: torch.Tensor, max_lag: int, width: int) -> tuple[torch.Tensor, list]:
    """C[b, i, j, bin] = #{(t_pre, t_post): post_i spikes at t_post, pre_j at t_pre, Δ = t_post − t_pre in bin};
    spikes (B, K, units). Bins of `width` steps on each side of Δ = 0 (its own bin): IF trains are
    nearly periodic, so single-step lags are collinear and a per-step window would fit the period."""
    edges = [(-hi, -lo) for lo, hi in reversed(_bins(max_lag, width))] + [(0, 0)] + _bins(max_lag, width)
    out = [sum(lag_count(post, pre, lag) for lag in range(lo, hi + 1)) for lo, hi in edges]
    return torch.stack(out, -1), [(lo + hi) / 2 for lo, hi in edges]


def lag_count(post: torch.Tensor, pre: torch.Tensor, lag: int) -> torch.Tensor:
    """(B, post, pre): #{t: post spikes at t + lag and pre spikes at t}."""
    K = post.shape[1]
    if lag >= 0:
        return torch.einsum("bki,bkj->bij", post[:, lag:], pre[:, :K - lag])
    return torch.einsum("bki,bkj->bij", post[:, :K + lag], pre[:, -lag:])


def _bins(max_lag: int, width: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + width - 1, max_lag)) for lo in range(1, max_lag + 1, width)]


def fit_window(counts: torch.Tensor, dw: torch.Tensor, lags: list, ridge: float = 1e-6) -> dict:
    """Least squares ΔW ≈ c + Σ_bin K(bin) C(bin) (rows: synapse-samples): K = ΔW per pair at that Δt; R².

    Also the coarse STDP fit ΔW ≈ c + K₊ (#pairs Δt > 0) + K₋ (#pairs Δt < 0) + K₀ (#pairs Δt = 0)."""
    X = counts.reshape(-1, counts.shape[-1]).double()
    t = dw.reshape(-1).double()
    keep = X.sum(1) > 0
    X, t = X[keep], t[keep]
    mid = len(lags) // 2
    coef, r2 = _lstsq(X, t, ridge)
    coarse = torch.stack([X[:, mid + 1:].sum(1), X[:, :mid].sum(1), X[:, mid]], 1)
    coef2, r2_coarse = _lstsq(coarse, t, ridge)
    _, r2_pairs = _lstsq(X.sum(1, keepdim=True), t, ridge)
    asym = (coarse[:, 0] - coarse[:, 1]) / (coarse[:, 0] + coarse[:, 1]).clamp_min(1)
    return {"lags": lags, "window": coef[1:].tolist(), "intercept": float(coef[0]), "r2": r2, "rows": int(len(t)),
            "coarse": {"K_post_after_pre": float(coef2[1]), "K_post_before_pre": float(coef2[2]),
                       "K_simultaneous": float(coef2[3]), "r2": r2_coarse},
            "r2_total_pairs_only": r2_pairs, "corr_dw_vs_asymmetry": _corr(asym, t)}


def _lstsq(X: torch.Tensor, t: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    A = torch.cat([torch.ones(len(X), 1, dtype=X.dtype), X], 1)
    scale = A.abs().amax(0).clamp_min(1e-12)  # ridge on standardised columns
    A = A / scale
    coef = torch.linalg.solve(A.T @ A + ridge * len(A) * torch.eye(A.shape[1], dtype=A.dtype), A.T @ t)
    resid = t - A @ coef
    return coef / scale, 1 - float(resid.var() / t.var().clamp_min(1e-300))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


def term_shares(start: list[torch.Tensor], end: list[torch.Tensor], k: int, dw: torch.Tensor) -> dict:
    """Which end moves the update: ΔW = (1/β)[m_pre Δm_post + m_post Δm_pre + Δm_post Δm_pre]. The first
    term is "presynaptic activity × change of postsynaptic activity" (Bengio et al. 2015's STDP-like
    rule); the second is its mirror image (anti-STDP in pair timing). Share = correlation with ΔW."""
    pre0, pre1 = start[k].flatten(1), end[k].flatten(1)
    post0, post1 = start[k + 1], end[k + 1]
    post_term = pre1.unsqueeze(1) * (post1 - post0).unsqueeze(2)
    pre_term = post0.unsqueeze(2) * (pre1 - pre0).unsqueeze(1)
    return {"corr_dw_vs_pre_x_dpost": _corr(post_term, dw), "corr_dw_vs_post_x_dpre": _corr(pre_term, dw),
            "rms_pre_x_dpost": float(post_term.pow(2).mean().sqrt()),
            "rms_post_x_dpre": float(pre_term.pow(2).mean().sqrt())}


def one_synapse(counts: torch.Tensor, dw: torch.Tensor, lags: list) -> dict:
    """The synapse that moves (|ΔW| > 10 % of the layer's RMS, with spike pairs) on the most samples: a few
    large outliers or saturated/silent units would make a degenerate picture. Its window and its points."""
    mid = len(lags) // 2
    active = ((dw.abs() > 0.1 * dw.pow(2).mean().sqrt()) & (counts.sum(-1) > 0)).sum(0)
    i, j = divmod(int(active.argmax()), active.shape[1])
    c, d = counts[:, i, j], dw[:, i, j]
    causal, anti = c[:, mid + 1:].sum(1), c[:, :mid].sum(1)
    return {"post": i, "pre": j, **fit_window(c.unsqueeze(1), d.unsqueeze(1), lags, ridge=1e-3),
            "samples": {"dw": d.tolist(), "asymmetry": ((causal - anti) / (causal + anti).clamp_min(1)).tolist(),
                        "pairs": (causal + anti).tolist()}}


def stdp_control(post: torch.Tensor, pre: torch.Tensor, max_lag: int, width: int, tau: float = 4.0) -> dict:
    """The method on a rule that *is* STDP: ΔW = Σ_pairs sign(Δt) e^{−|Δt|/τ} on the same spike trains.
    It must come out antisymmetric with R² ≈ 1, else the fit, not EP, decides the answer."""
    dw = sum(math.copysign(math.exp(-abs(lag) / tau), lag) * lag_count(post, pre, lag)
             for lag in range(-max_lag, max_lag + 1) if lag)
    counts, lags = pair_counts(post, pre, max_lag, width)
    return fit_window(counts, dw, lags)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    for name, layer in result["layers"].items():
        w = torch.tensor(layer["window"]["window"])
        axes[0].plot(layer["window"]["lags"], (w / w.abs().max()).tolist(), "o-", ms=3,
                     label=f"{SYNAPSES[name]} (R² {layer['window']['r2']:.2f})")
    control = torch.tensor(result["stdp_control"]["window"])
    axes[0].plot(result["stdp_control"]["lags"], (control / control.abs().max()).tolist(), "k--", lw=1,
                 label=f"control: a pair-STDP rule (R² {result['stdp_control']['r2']:.2f})")
    axes[0].set(title="EP update per spike pair, all synapses", xlabel="Δt = t_post − t_pre (steps)",
                ylabel="K(Δt) / max|K|")
    syn = result["one_synapse"]
    axes[1].plot(syn["lags"], syn["window"], "o-", ms=3, color="tab:red")
    axes[1].set(title=f"one synapse: {SYNAPSES[result['one_synapse_layer']]} ({syn['pre']} → {syn['post']})",
                xlabel="Δt = t_post − t_pre (steps)", ylabel="ΔW per pair")
    s = syn["samples"]
    axes[2].scatter(s["asymmetry"], s["dw"], s=6, alpha=0.5, color="tab:red")
    axes[2].set(title=f"same synapse, one point per sample (r = {syn['corr_dw_vs_asymmetry']:.2f})",
                xlabel="(#pairs Δt>0 − #pairs Δt<0) / #pairs, |Δt| ≤ D", ylabel="ΔW over the nudged phase")
    for a in axes:
        a.axhline(0, color="k", lw=0.6)
        a.grid(alpha=0.3)
    axes[0].axvline(0, color="k", lw=0.6)
    axes[1].axvline(0, color="k", lw=0.6)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"STDP view of spiking EP (IF τ={result['tau']:g}, β={result['beta']}, nudged phase "
                 f"{result['nudge_steps']} steps, {result['samples']} samples)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3, help="analog pre-training epochs of the tiny model")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--free", type=int, default=128)
    parser.add_argument("--nudge", type=int, default=32)
    parser.add_argument("--tau", type=float, default=8.0)
    parser.add_argument("--max-lag", type=int, default=12)
    parser.add_argument("--bin", type=int, default=3, help="lag bin width in steps")
    parser.add_argument("--out", default="experiments/spiking/results/stdp_view.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    net = train_tiny(epochs=args.epochs).double()
    x, y = test_set(args.samples)
    x = x.double()
    snet = to_spiking(net, "if", tau=args.tau)
    cfg = SpikingEPConfig(args.beta, args.free, args.nudge)
    start, end, rec = nudged_phase(snet, x, y, cfg)
    library = spiking_cep_on_copy(snet, x, y, cfg, 0.0).grads  # −(batch mean ΔW) by the library's own rule
    result: dict = {"samples": args.samples, "pretrain_epochs": args.epochs, "beta": args.beta,
                    "free_steps": args.free, "nudge_steps": args.nudge,
                    "tau": args.tau, "plasticity_tau": cfg.plasticity_time_constant, "max_lag": args.max_lag,
                    "layers": {}}
    counts_by = {}
    for name in SYNAPSES:
        k = int(name.split(".")[1])
        dw = per_sample_updates(start, end, k, args.beta)
        check = float((dw.mean(0) + library[name]).abs().max() / library[name].abs().max())
        assert check < 1e-9, f"{name}: per-sample updates do not add up to spiking_cep's ({check:.1e})"
        counts, lags = pair_counts(rec.layer(k + 1).double(), rec.layer(k).double(), args.max_lag, args.bin)
        counts_by[name] = (counts, dw, lags)
        result["layers"][name] = {"synapse": SYNAPSES[name], "check_vs_spiking_cep": check,
                                  "rms_dw": float(dw.pow(2).mean().sqrt()),
                                  "window": fit_window(counts, dw, lags), **term_shares(start, end, k, dw)}
        row = result["layers"][name]
        w = row["window"]
        print(f"{SYNAPSES[name]:>10}: R² window {w['r2']:.3f}, coarse {w['coarse']['r2']:.3f}, total pairs only "
              f"{w['r2_total_pairs_only']:.3f}; corr(ΔW, timing asymmetry) {w['corr_dw_vs_asymmetry']:+.3f}; "
              f"corr(ΔW, pre·Δpost) {row['corr_dw_vs_pre_x_dpost']:+.3f}, corr(ΔW, post·Δpre) "
              f"{row['corr_dw_vs_post_x_dpre']:+.3f}")
        print(f"{'':>12}K₊ (post after pre) {w['coarse']['K_post_after_pre']:+.2e}, K₋ (post before pre) "
              f"{w['coarse']['K_post_before_pre']:+.2e}; K(Δt): "
              + " ".join(f"{d:+.0f}:{v:+.1e}" for d, v in zip(w["lags"], w["window"])))
    k = 1
    result["stdp_control"] = stdp_control(rec.layer(k + 1).double(), rec.layer(k).double(), args.max_lag, args.bin)
    c = result["stdp_control"]
    print(f"control (pair STDP rule on the same fc1 → fc2 spikes): R² {c['r2']:.3f}, K₊ "
          f"{c['coarse']['K_post_after_pre']:+.2e}, K₋ {c['coarse']['K_post_before_pre']:+.2e}")
    result["one_synapse_layer"] = "weights.1"
    result["one_synapse"] = one_synapse(*counts_by["weights.1"])
    result["seconds"] = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
