"""Turn a benchmark's results into a markdown table and a PNG plot (time and peak memory per provider per shape).

    python bench/report.py bench/results/cpu-2026-11-24.json    # re-make the table (.md) and plot (.png)

``results`` are the dicts of bench/measure.py with the floors of bench/run.py added: path, shape, provider,
status, reason, time_ms, peak_mib, floor_ms, x_floor, x_eager, errors.
"""

from __future__ import annotations

import json
import os
import sys

MEASURED = ("ok", "different loss")


def _fmt(value, digits=3):
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _status(row: dict) -> str:
    if row["status"] == "different loss":
        return f"different loss ({row['computes'].upper()})"
    return row["status"]


def _max_error(row: dict):
    errors = {k: v for k, v in (row.get("errors") or {}).items() if k in ("loss", "d_hidden", "d_weight", "d_logits")}
    return max(errors.values()) if errors else None


def _skipped_everywhere(rows: list[dict]) -> dict:
    """(path, provider) -> reason, for providers with no figures on any shape of a path and one reason."""
    out = {}
    for path in dict.fromkeys(r["path"] for r in rows):
        for provider in dict.fromkeys(r["provider"] for r in rows if r["path"] == path):
            mine = [r for r in rows if r["path"] == path and r["provider"] == provider]
            if all(r["status"] not in MEASURED for r in mine) and len({r["reason"] for r in mine}) == 1:
                out[(path, provider)] = f"{mine[0]['status']}: {mine[0]['reason']}"
    return out


def ordered(data: dict) -> list[dict]:
    """The results by path and shape in the order of data["shapes"] (they are measured smallest first)."""
    index = {(s["path"], s["name"]): i for i, s in enumerate(data.get("shapes", []))}
    return sorted(data["results"], key=lambda r: index.get((r["path"], r["shape"]), len(index)))


def markdown(data: dict) -> str:
    """The results table, then the providers that did not run, each with its reason."""
    meta, rows = data["meta"], ordered(data)
    lines = [f"{meta['device_name']} ({meta['device']}), {meta['date']}, {meta['dtype']}, groups of "
             f"{meta['group_size']}; torch {meta['versions']['torch']}, triton {meta['versions']['triton']}, "
             f"gvpo-kernels {meta['versions']['gvpo-kernels']}" + (" (--quick)" if meta.get("quick") else ""),
             "",
             "| path | shape | provider | status | fwd+bwd ms | × eager | peak MiB | floor ms | × floor | rel. err |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    hidden = _skipped_everywhere(rows)
    footnotes = []
    for row in rows:
        if (row["path"], row["provider"]) in hidden:
            continue
        status = _status(row)
        if row["status"] not in MEASURED and row["reason"]:
            footnotes.append(f"{row['provider']} ({row['path']}, {row['shape']}): {row['reason']}")
            status += f" [{len(footnotes)}]"
        elif row.get("retried_after"):
            footnotes.append(f"{row['provider']} ({row['path']}, {row['shape']}): measured on a second try, after "
                             f"{row['retried_after']}")
            status += f", retried [{len(footnotes)}]"
        lines.append(f"| {row['path']} | {row['shape']} | {row['provider']} | {status} | {_fmt(row.get('time_ms'))} | "
                     f"{_fmt(row.get('x_eager'), 2)} | {_fmt(row.get('peak_mib'))} | {_fmt(row.get('floor_ms'))} | "
                     f"{_fmt(row.get('x_floor'), 2)} | {_fmt(_max_error(row), 2)} |")
    if footnotes:
        lines += [""] + [f"[{i}] {note}" for i, note in enumerate(footnotes, 1)]
    if hidden:
        lines += ["", "Not run on this device:"]
        lines += [f"- {provider} ({path}): {reason}" for (path, provider), reason in hidden.items()]
    if meta.get("floors"):
        lines += ["", f"Floors (bench/README.md): {floors_line(meta['floors'])}."]
    return "\n".join(lines) + "\n"


def floors_line(floors: dict) -> str:
    """The peak rates the floors use, each with the probe that reached it (bench/run.py's measure_floors)."""
    if "copy_gbps" in floors:  # a JSON from before the peaks (one copy bandwidth, a matmul rate per head)
        rates = ", ".join(f"{k}: {v['tflops']:.3g} TFLOP/s" for k, v in floors.get("matmul", {}).items())
        return f"copy {floors['copy_gbps']:.4g} GB/s (read + write); matmul {rates}"
    parts = [f"{floors[f'peak_{unit}']:.4g} {label}, {floors[f'peak_{unit}_probe']}"
             for unit, label in (("gbps", "GB/s (read + write)"), ("tflops", "TFLOP/s")) if f"peak_{unit}" in floors]
    return "; ".join(f"peak {part}" for part in parts) or "none measured"


def plot(data: dict, path_png: str) -> str | None:
    """One row per path, time (left) and peak memory (right), on log scales: a line per provider across the shapes
    (broken between model heads), hollow and dashed for a different loss, the floor as a black bar per shape, an
    "x" at the top where the provider ran out of memory. Returns None, or why no plot was made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib is not installed ({exc})"
    rows = [r for r in ordered(data) if r["status"] in MEASURED + ("out of memory",)]
    paths = list(dict.fromkeys(r["path"] for r in rows)) or ["linear"]
    model_of = {(s["path"], s["name"]): s.get("model", s["name"]) for s in data.get("shapes", [])}
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colours = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    fig, axes = plt.subplots(len(paths), 2, figsize=(15, 4.8 * len(paths)), squeeze=False)
    handles = {}
    for i, path in enumerate(paths):
        mine = [r for r in rows if r["path"] == path]
        shapes = list(dict.fromkeys(r["shape"] for r in mine))
        for j, (key, label) in enumerate([("time_ms", "forward+backward, ms (median)"),
                                          ("peak_mib", "peak memory above the inputs, MiB")]):
            ax = axes[i][j]
            values = [r[key] for r in mine if r.get(key)]
            top = max(values) * 2 if values else 1.0
            for k, name in enumerate(providers):
                hits = {r["shape"]: r for r in mine if r["provider"] == name}
                dx = (k - (len(providers) - 1) / 2) * 0.5 / max(len(providers), 1)  # side by side, not on top
                if not hits:
                    continue
                other = any(r["status"] == "different loss" for r in hits.values())
                style = dict(color=colours[name], marker="o", linestyle="--" if other else "-",
                             markerfacecolor="none" if other else colours[name], label=name)
                segment = []
                for x, shape in enumerate(shapes + [None]):
                    hit = hits.get(shape)
                    value = hit.get(key) if hit and hit["status"] in MEASURED else None
                    if value and value > 0 and (not segment or model_of.get((path, shape)) ==
                                                model_of.get((path, shapes[round(segment[-1][0])]))):
                        segment.append((x + dx, value))
                        continue
                    if segment:
                        (handles[name],) = ax.plot(*zip(*segment), **style)
                    segment = [(x + dx, value)] if value and value > 0 else []
                    if hit and hit["status"] == "out of memory":
                        ax.plot([x + dx], [top], marker="x", color=colours[name], markersize=9, linestyle="none")
                        handles["x: out of memory"] = ax.plot([], [], marker="x", color="gray",
                                                              linestyle="none")[0]
            if key == "time_ms":
                for x, shape in enumerate(shapes):
                    floor = next((r.get("floor_ms") for r in mine if r["shape"] == shape and r.get("floor_ms")), None)
                    if floor:
                        handles["floor"] = ax.hlines(floor, x - 0.3, x + 0.3, colors="black", linewidth=2)
            ax.set_yscale("log")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=15, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(shapes) - 0.5)
            ax.set_title(f"{path} path: {label}", fontsize=10)
            ax.grid(which="major", axis="y", alpha=0.4)
            ax.grid(which="minor", axis="y", alpha=0.1)
    meta = data["meta"]
    fig.suptitle(f"GVPO loss, {meta['device_name']}, {meta['dtype']}, {meta['date']} "
                 f"(dashed, hollow: a different loss, timed for cost only)", fontsize=11)
    for name in ("x: out of memory", "floor"):  # last in the legend
        if name in handles:
            handles[name] = handles.pop(name)
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(len(handles), 9), fontsize=8,
               bbox_to_anchor=(0.5, 0.97))
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    with open(argv[1]) as f:
        data = json.load(f)
    stem = os.path.splitext(argv[1])[0]
    table = markdown(data)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    problem = plot(data, stem + ".png")
    print(problem or f"wrote {stem}.md and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
