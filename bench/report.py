"""The loss benchmark's results as a markdown table and a PNG plot (time and peak memory per provider per shape);
re-made from a JSON by ``python -m bench report <file>.json`` (a token-statistics JSON gets its own table)."""

from __future__ import annotations

import json
import os

from . import common as C
from .floors import floors_line

MEASURED = ("ok", "different loss")


def _max_error(row: dict):
    errors = {k: v for k, v in (row.get("errors") or {}).items() if k in ("loss", "d_hidden", "d_weight", "d_logits")}
    return max(errors.values()) if errors else None


def ordered(data: dict) -> list[dict]:
    """The results by path and shape in the order of data["shapes"] (they are measured smallest first)."""
    index = {(s["path"], s["name"]): i for i, s in enumerate(data.get("shapes", []))}
    return sorted(data["results"], key=lambda r: index.get((r["path"], r["shape"]), len(index)))


def markdown(data: dict) -> str:
    """The results table, then the footnotes and the providers that did not run, each with its reason."""
    meta, rows = data["meta"], ordered(data)
    v, hidden, notes, table = meta["versions"], C.notes_and_skipped(rows, MEASURED), [], []
    for row in (r for r in rows if (r["path"], r["provider"]) not in hidden):
        status = f"different loss ({row['computes'].upper()})" if row["status"] == "different loss" else row["status"]
        note = row["reason"] if row["status"] not in MEASURED else row.get("retried_after")
        if note:
            notes.append(f"{row['provider']} ({row['path']}, {row['shape']}): " + (
                note if row["status"] not in MEASURED else f"measured on a second try, after {note}"))
            status += f"{', retried' if row['status'] in MEASURED else ''} [{len(notes)}]"
        table.append([row["path"], row["shape"], row["provider"], status]
                     + [C.fmt(row.get(k), d) for k, d in (("time_ms", 3), ("x_eager", 2), ("peak_mib", 3),
                                                          ("floor_ms", 3), ("x_floor", 2))] + [C.fmt(_max_error(row), 2)])
    lines = [f"{meta['device_name']} ({meta['device']}), {meta['date']}, {meta['dtype']}, groups of "
             f"{meta['group_size']}; torch {v['torch']}, triton {v['triton']}, gvpo-kernels {v['gvpo-kernels']}"
             + (" (--quick)" if meta.get("quick") else ""), ""]
    lines += C.md_table(["path", "shape", "provider", "status", "fwd+bwd ms", "× eager", "peak MiB", "floor ms",
                         "× floor", "rel. err"], table, 4) + C.footer(notes, hidden)
    if meta.get("floors"):
        lines += ["", f"Floors (bench/README.md): {floors_line(meta['floors'])}."]
    return "\n".join(lines) + "\n"


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
            top = max([r[key] for r in mine if r.get(key)] or [0.5]) * 2
            for k, name in enumerate(providers):
                hits = {r["shape"]: r for r in mine if r["provider"] == name}
                dx = (k - (len(providers) - 1) / 2) * 0.5 / len(providers)  # side by side, not on top
                other = any(r["status"] == "different loss" for r in hits.values())
                style = dict(color=colours[name], marker="o", linestyle="--" if other else "-",
                             markerfacecolor="none" if other else colours[name])
                for model in dict.fromkeys(model_of.get((path, s)) for s in shapes):  # one line per model head
                    xs = [x for x, s in enumerate(shapes) if model_of.get((path, s)) == model and s in hits]
                    ys = [hits[shapes[x]].get(key) if hits[shapes[x]]["status"] in MEASURED else None for x in xs]
                    pts = [(x + dx, y) for x, y in zip(xs, ys) if y and y > 0]
                    if pts:
                        (handles[name],) = ax.plot(*zip(*pts), **style)
                    oom = [x + dx for x in xs if hits[shapes[x]]["status"] == "out of memory"]
                    if oom:
                        ax.plot(oom, [top] * len(oom), marker="x", color=colours[name], markersize=9, linestyle="none")
                        handles["x: out of memory"] = ax.plot([], [], "x", color="gray")[0]
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
    if len(argv) != 1:
        print("usage: python -m bench report <results>.json   (re-makes the .md beside it, and the loss .png)")
        return 2
    with open(argv[0]) as f:
        data = json.load(f)
    stem = os.path.splitext(argv[0])[0]
    if "passes" in data["meta"]:  # the token statistics
        from . import stats

        table, problem = stats.markdown(data), "no plot for the token statistics"
    else:
        table, problem = markdown(data), None
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    problem = problem or plot(data, stem + ".png")
    print(problem or f"wrote {stem}.md and {stem}.png")
    return 0
