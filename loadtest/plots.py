"""PNG plots of load-test reports: a run's throughput and latency over time, and a sweep's
throughput and p99 versus the client count.

matplotlib is imported inside the functions (the `loadtest` extra installs it; the test
suite's short run does not need it) and drives the Agg canvas directly, without pyplot,
so nothing needs a display and no global backend state is touched.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

THROUGHPUT_COLOR = "tab:blue"
P50_COLOR = "tab:green"
P99_COLOR = "tab:red"
BASELINE_COLOR = "tab:orange"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _seconds_axis(axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("time since start (s)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _values(values: list[Any]) -> list[float]:
    return [math.nan if value is None else value for value in values]


def plot_run(report: dict, directory: Path) -> list[Path]:
    """`<scenario>-throughput.png` and `<scenario>-latency.png` for one run's report."""
    directory.mkdir(parents=True, exist_ok=True)
    scenario = report["scenario"]
    subtitle = f"{report['mode']}, {report['duration_seconds']:g} s"
    return [
        _plot_throughput(report, directory / f"{scenario}-throughput.png", scenario, subtitle),
        _plot_latency(report, directory / f"{scenario}-latency.png", scenario, subtitle),
    ]


def _plot_throughput(report: dict, path: Path, scenario: str, subtitle: str) -> Path:
    figure = _figure(9, 4.8)
    axes = figure.add_subplot()
    timeline = report.get("transfers_timeline") or report.get("throughput_timeline") or []
    unit = "transfers/s" if report.get("transfers_timeline") else "requests/s"
    seconds = [point[0] for point in timeline]
    axes.plot(seconds, [point[1] for point in timeline], marker="o", markersize=3, color=THROUGHPUT_COLOR,
              label=f"{unit}, per second")  # fmt: skip
    mean = report.get("transfers_per_second") if unit == "transfers/s" else report.get("requests_per_second")
    if mean is not None:
        axes.axhline(mean, color=THROUGHPUT_COLOR, linestyle=":", label=f"run mean: {_number(mean)} {unit}")
    requests = report.get("throughput_timeline") or []
    if unit == "transfers/s" and scenario != "batch" and report.get("requests") != report.get("transfers_acknowledged"):
        # mixed and replay: requests that are not new transfers (reads, replays) show as the gap.
        axes.plot([p[0] for p in requests], [p[1] for p in requests], color="grey", linewidth=1,
                  label="requests/s, per second")  # fmt: skip
        unit = "transfers/s, requests/s"
    baseline = report.get("baseline")
    if baseline:
        axes.axhline(baseline["transfers_per_second"], color=BASELINE_COLOR, linestyle="--",
                     label=f"pgbench baseline ({baseline['pgbench']}, {baseline['clients']} clients): "
                           f"{_number(baseline['transfers_per_second'])} transfers/s")  # fmt: skip
        if "ratio" in baseline:
            subtitle += f"; ratio to baseline {baseline['ratio']:.2f}"
    axes.set_title(f"{scenario}: throughput over the run\n{subtitle}")
    _seconds_axis(axes)
    axes.set_ylabel(f"throughput ({unit})")
    axes.set_ylim(bottom=0, top=axes.get_ylim()[1] * 1.1)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.savefig(path)
    return path


def _plot_latency(report: dict, path: Path, scenario: str, subtitle: str) -> Path:
    figure = _figure(11, 4.8)
    over_time, overall = figure.subplots(1, 2, width_ratios=[3, 1])
    timeline = report.get("latency_timeline") or []
    seconds = [point[0] for point in timeline]
    over_time.plot(seconds, _values([p[1] for p in timeline]), marker="o", markersize=3, color=P50_COLOR,
                   label="p50 of the requests completed in that second")  # fmt: skip
    over_time.plot(seconds, _values([p[2] for p in timeline]), marker="o", markersize=3, color=P99_COLOR,
                   label="p99 of the requests completed in that second")  # fmt: skip
    over_time.set_title(f"{scenario}: latency per second\n{subtitle}")
    _seconds_axis(over_time)
    over_time.set_ylabel("latency (ms)")
    over_time.set_ylim(bottom=0, top=over_time.get_ylim()[1] * 1.25)  # room for the legend
    over_time.grid(True, alpha=0.3)
    over_time.legend(loc="upper right", fontsize="small")

    percentiles = report.get("latency_ms") or {}
    names = [name for name in ("p50", "p95", "p99", "p99.9", "max") if name in percentiles]
    values = [percentiles[name] for name in names]
    colors = [P50_COLOR, "tab:olive", P99_COLOR, "tab:purple", "tab:brown"][: len(names)]
    bars = overall.bar(names, values, color=colors)
    overall.bar_label(bars, labels=[_number(value) for value in values], fontsize="small", padding=2)
    positive = [value for value in values if value > 0]
    if positive and max(positive) / min(positive) > 20:
        overall.set_yscale("log")
        overall.set_ylabel("latency (ms, log scale)")
    else:
        overall.set_ylabel("latency (ms)")
    overall.margins(y=0.15)
    overall.set_title(f"whole run\n{report.get('requests', 0):,} requests")
    overall.set_xlabel("percentile")
    overall.grid(True, axis="y", alpha=0.3)
    figure.savefig(path)
    return path


def plot_sweep(points: list[dict], directory: Path, scenario: str) -> Path:
    """`<scenario>-sweep.png`: transfers/s and latency (p99, p50) versus the client count."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{scenario}-sweep.png"
    figure = _figure(9, 5)
    throughput = figure.add_subplot()
    clients = [point["clients"] for point in points]
    tps = [point["transfers_per_second"] for point in points]
    lines = throughput.plot(clients, tps, marker="o", color=THROUGHPUT_COLOR, label="throughput (transfers/s)")
    for x, y in zip(clients, tps, strict=True):
        throughput.annotate(_number(y), (x, y), textcoords="offset points", xytext=(0, 7), ha="center",
                            fontsize="small", color=THROUGHPUT_COLOR)  # fmt: skip
    throughput.set_xscale("log", base=2)
    throughput.set_xticks(clients, [str(count) for count in clients])
    throughput.minorticks_off()
    throughput.set_xlabel("concurrent clients (closed loop, log2 scale)")
    throughput.set_ylabel("throughput (transfers/s)", color=THROUGHPUT_COLOR)
    throughput.set_ylim(bottom=0, top=max(tps, default=1) * 1.15 or 1)
    throughput.grid(True, alpha=0.3)

    latency = throughput.twinx()
    lines += latency.plot(clients, [point["p99"] for point in points], marker="s", color=P99_COLOR,
                          label="p99 latency (ms)")  # fmt: skip
    lines += latency.plot(clients, [point["p50"] for point in points], marker="^", linestyle="--", color=P50_COLOR,
                          label="p50 latency (ms)")  # fmt: skip
    for point in points:
        latency.annotate(_number(point["p99"]), (point["clients"], point["p99"]), textcoords="offset points",
                         xytext=(7, -3), ha="left", fontsize="small", color=P99_COLOR)  # fmt: skip
    latency.set_ylabel("latency (ms)", color=P99_COLOR)
    latency.set_ylim(bottom=0, top=max((point["p99"] for point in points), default=1) * 1.15 or 1)

    durations = [point["duration_seconds"] for point in points if point.get("duration_seconds")]
    detail = f", about {sum(durations) / len(durations):.0f} s per step" if durations else ""
    throughput.set_title(f"{scenario}: throughput and latency versus clients{detail}")
    throughput.legend(lines, [line.get_label() for line in lines], loc="upper left", fontsize="small")
    figure.savefig(path)
    return path
