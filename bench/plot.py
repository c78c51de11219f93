"""Draws the benchmark charts from results.json (written by `cargo bench --bench pipeline`)."""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
data = json.loads((out / "results.json").read_text())
results = data["results"]

sweep = sorted((r for r in results if r["name"].startswith("sweep-")), key=lambda r: r["max_in_flight"])
if sweep:
    x = [r["max_in_flight"] for r in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [r["throughput_rps"] for r in sweep], "o-", label="paysync")
    ax.plot(x, [r["little_limit_rps"] for r in sweep], "--", label="max_in_flight / 50 ms (Little's law)")
    ax.plot(x, [min(r["sim_capacity_rps"], r["broker_capacity_rps"]) for r in sweep], ":", label="limit (connector mock, broker)")
    ax.set_xscale("log")
    ax.set_xlabel("max_in_flight")
    ax.set_ylabel("requests per second")
    ax.set_title("Throughput against max_in_flight (50 ms connector)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_max_in_flight.png", dpi=120)

paced = [r for r in results if r.get("e2e_ms")]
if paced:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = ["p50", "p95", "p99", "max"]
    series = [("e2e_ms", "", "end to end"), ("overhead_ms", "//", "overhead"), ("relay_floor_ms", "..", "Kafka relay floor")]
    width = 0.8 / (len(series) * len(paced))
    for i, r in enumerate(paced):
        for j, (key, hatch, what) in enumerate(series):
            if not r.get(key):
                continue
            vals = [r[key][k] for k in labels]
            pos = [p + (len(series) * i + j) * width for p in range(len(labels))]
            ax.bar(pos, vals, width, hatch=hatch, label=f"{r['name']} {what}")
    ax.set_xticks([p + width * (len(series) * len(paced) - 1) / 2 for p in range(len(labels))])
    ax.set_xticklabels(labels)
    ax.set_ylabel("milliseconds")
    ax.set_title("Latency at half the maximum throughput")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_percentiles.png", dpi=120)

growth = sorted((r for r in results if r["name"].startswith("growth-")), key=lambda r: r["n"])
if growth:
    fig, ax1 = plt.subplots(figsize=(7, 4.5))
    x = [r["n"] for r in growth]
    ax1.plot(x, [r["cpu_s_per_1k"] * 1000 for r in growth], "o-", color="tab:blue", label="CPU ms per 1,000 requests")
    ax1.set_xscale("log")
    ax1.set_xlabel("requests in the backlog")
    ax1.set_ylabel("CPU ms per 1,000 requests", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(x, [r["peak_rss_mb"] for r in growth], "s--", color="tab:red", label="peak RSS")
    ax2.set_ylabel("peak RSS (MiB)", color="tab:red")
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    ax1.set_title("Cost and memory as the backlog grows (0 ms connector, 1,000 in flight)")
    fig.tight_layout()
    fig.savefig(out / "growth.png", dpi=120)
print("charts written to", out)
