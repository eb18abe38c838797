"""The sensitivity figure: each unit's KL with its interval, and KL against units kept (ranked vs random)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["sensitivity_figure"]


def sensitivity_figure(r: Any) -> Any:
    """``SensitivityResult`` -> a matplotlib figure: per-unit KL in forward order (log scale, 95 % CI bars) and,
    where measured, the mixed-precision curve with the random choices' mean and band."""
    import matplotlib.pyplot as plt

    panels = 2 if r.mixed else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    kl = np.array([u.kl_vs_ref for u in r.units])
    lo = np.array([(u.kl_vs_ref_ci95 or (v, v))[0] for u, v in zip(r.units, kl, strict=True)])
    hi = np.array([(u.kl_vs_ref_ci95 or (v, v))[1] for u, v in zip(r.units, kl, strict=True)])
    x = np.arange(len(kl))
    ax.bar(x, kl, color="#4c72b0")
    ax.errorbar(x, kl, yerr=[kl - lo, hi - kl], fmt="none", ecolor="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(f"{r.unit} (forward order)")
    ax.set_ylabel("KL vs float (nats/token)")
    ax.set_title(f"{r.model}: {r.method}, one {r.unit} at a time")
    if len(kl) <= 40:
        ax.set_xticks(x, [u.unit.removeprefix("block ") for u in r.units], rotation=90, fontsize=7)
    if r.mixed:
        ax = axes[0][1]
        pts = r.mixed["points"]
        ks = [p["k"] for p in pts]
        ax.plot(ks, [p["ranked_kl"] for p in pts], "o-", label="top-k of the ranking kept")
        rand = [p for p in pts if "random_kl_mean" in p]
        if rand:
            ax.plot([p["k"] for p in rand], [p["random_kl_mean"] for p in rand], "s--", label="k random units kept")
            ax.fill_between(
                [p["k"] for p in rand],
                [p["random_kl_band"][0] for p in rand],
                [p["random_kl_band"][1] for p in rand],
                alpha=0.2,
                color="C1",
            )
        ax.set_yscale("log")
        ax.set_xlabel(f"{r.unit}s kept at {r.mixed['keep']}")
        ax.set_ylabel("KL on held-out windows")
        ax.set_title(f"ranked on {r.mixed['ranked_on']}, scored on {r.mixed['scored_on']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
