"""Draws adaptive.png from adaptive.json (written by `cargo bench --bench pipeline -- --adaptive`).

One panel per processor limit N: answered calls per second (solid) and 429 answers
per second (dotted) for adaptive and the two fixed settings, with N (halved at the
midpoint) as a dashed line.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/adaptive")
results = json.loads((out / "adaptive.json").read_text())["results"]
limits = sorted({r["limit"] for r in results})
fig, axes = plt.subplots(len(limits), 1, figsize=(8, 3.2 * len(limits)), squeeze=False)
colors = {"adaptive": "tab:blue", "fixed-2x-too-high": "tab:red", "fixed-2x-too-low": "tab:green"}
for ax, n in zip(axes[:, 0], limits):
    for r in (r for r in results if r["limit"] == n):
        answered, throttled = r["answered_per_s"], r["throttled_per_s"]
        c = colors.get(r["variant"], None)
        ax.plot(range(len(answered)), answered, "-", color=c, label=f"{r['variant']}: answered/s")
        ax.plot(range(len(throttled)), throttled, ":", color=c, label=f"{r['variant']}: 429/s")
    half = len(results[0]["answered_per_s"]) // 2
    ax.plot([0, half, half, 2 * half], [n, n, n / 2, n / 2], "--", color="black", label="processor's limit N")
    ax.set_title(f"N = {n:.0f} calls/s, halved after {half} s")
    ax.set_xlabel("second")
    ax.set_ylabel("calls per second")
    ax.set_ylim(0, n * 1.6)
    ax.grid(True, alpha=0.3)
axes[0, 0].legend(fontsize=7, ncol=2)
fig.tight_layout()
fig.savefig(out / "adaptive.png", dpi=110)
print(out / "adaptive.png")
