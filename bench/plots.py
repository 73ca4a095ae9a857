"""The report's figures, drawn with ``matplotlib.figure.Figure`` (no pyplot: no global state, no display).

Each function takes plain tables (pandas DataFrames already selected by ``bench.report``), returns a Figure
or None when there is nothing to draw, and never computes a number the report does not also print.
``save_figure`` writes a figure atomically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.io import atomic_write

DPI = 130
DISPLAY_NAMES = {"sisma": "SISMA", "dit": "DiT-SIS", "sdm": "SDM", "dim": "DiM"}
MODEL_COLOURS = {"sisma": "#1f77b4", "dit": "#ff7f0e", "sdm": "#2ca02c", "dim": "#9467bd"}  # one hue per family
EXTRA_COLOURS = ["#d62728", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]  # families without a hue of their own
# A variant keeps its family's hue in another shade (mixed towards white when positive, black when negative) and
# another line style and marker, so that no two series of a figure look alike.
VARIANT_SHADES = (0.0, 0.45, -0.35, 0.65, -0.55, 0.25, -0.2, 0.8)
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LOSS_SMOOTHING_POINTS = 20  # the moving average of a loss curve spans 1/20 of its logged points
PROJECTED_HATCH = "//"
TITLE_CHARS = 38  # a panel title wraps at this many characters
GRID_TITLE_LINE_IN = 0.15  # height of one line of a sample-grid column title (inches, at its font size)
SLANT_CHARS_PER_BAR = 12  # bar labels longer than this on average are slanted, so that neighbours do not overlap


def display_name(model: str) -> str:
    """SISMA, DiT-SIS, SDM, DiM; a variant keeps its overrides: 'SISMA (scan=raster)'."""
    base, _, overrides = model.partition(":")
    name = DISPLAY_NAMES.get(base, base)
    return f"{name} ({overrides.replace(':', ', ')})" if overrides else name


@dataclass(frozen=True)
class Style:
    """How one model's series is drawn."""

    colour: str
    line: str
    marker: str


def family(model: str) -> str:
    return model.partition(":")[0]


def shade(hex_colour: str, amount: float) -> str:
    """``hex_colour`` mixed towards white (amount > 0) or black (amount < 0) by |amount|."""
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=float)
    target = 255.0 if amount > 0 else 0.0
    mixed = rgb + (target - rgb) * abs(amount)
    return "#" + "".join(f"{int(round(v)):02x}" for v in mixed)


def style(model: str, order: list[str]) -> Style:
    """The family's hue (its shade, line style and marker set by the variant's place among the family's models in
    ``order``, the plain backbone first)."""
    fam = family(model)
    families = list(dict.fromkeys(family(m) for m in [*order, model] if family(m) not in MODEL_COLOURS))
    base = MODEL_COLOURS.get(fam) or EXTRA_COLOURS[families.index(fam) % len(EXTRA_COLOURS)]
    members = sorted(dict.fromkeys(m for m in [*order, model] if family(m) == fam), key=lambda m: (m != fam,))
    i = members.index(model)
    return Style(shade(base, VARIANT_SHADES[i % len(VARIANT_SHADES)]), LINE_STYLES[i % len(LINE_STYLES)],
                 MARKERS[i % len(MARKERS)])


def colour(model: str, order: list[str]) -> str:
    return style(model, order).colour


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def plain_log_ticks(axis) -> None:
    """Label a log axis with plain numbers (0.3, 20, 1500), minor ticks too, so that a short range is readable."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    label = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1000 else f"{v:.3g}")
    axis.set_major_formatter(label)
    axis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
    axis.set_minor_formatter(label)


def tera_ticks(axis) -> None:
    """Label a log axis of FLOPs in TFLOP (20, not 2 x 10^13), minor ticks at 2, 3 and 5 too, which do not crowd."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    label = FuncFormatter(lambda v, _: f"{v / 1e12:.3g}")
    axis.set_major_formatter(label)
    axis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
    axis.set_minor_formatter(label)


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path``, atomically (bench.io)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


# ---------------------------------------------------------------------------------------------- latency

def latency_figure(panels: list[tuple[str, pd.DataFrame]], paper: pd.DataFrame, steps: int, paper_label: str):
    """Bars of seconds per image at ``steps`` steps: one panel per device of ours (measured solid, projected
    hatched), then the paper's.

    ``panels``: (title, DataFrame of model, latency_s, projected (bool), iqr_s (spread of the per-NFE latency times
    steps, or NaN)). ``paper``: model, latency_s.
    """
    panels = [(label, df) for label, df in panels if not df.empty]
    if not panels:
        return None
    order = list(dict.fromkeys(m for _, df in panels for m in df["model"]))
    widths = [max(len(df), 2) for _, df in panels] + [max(len(paper), 1) + 0.5]
    fig = new_figure(3.0 + 1.1 * sum(widths), 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(widths), width_ratios=widths))
    for ax, (label, ours) in zip(axes, panels):
        for i, row in enumerate(ours.itertuples()):
            err = None if not np.isfinite(row.iqr_s) else [[row.iqr_s / 2], [row.iqr_s / 2]]
            ax.bar(i, row.latency_s, color=colour(row.model, order), hatch=PROJECTED_HATCH if row.projected else None,
                   edgecolor="black", linewidth=0.6, yerr=err, capsize=4)
            top = row.latency_s + (row.iqr_s / 2 if np.isfinite(row.iqr_s) else 0)  # above the error bar
            ax.annotate(f"{row.latency_s:.4g} s" + ("\n(projected)" if row.projected else ""),
                        (i, top), ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
        names = [display_name(m) for m in ours["model"]]
        slanted = sum(map(len, names)) > SLANT_CHARS_PER_BAR * len(names)  # labels that would meet their neighbours
        ax.set_xticks(np.arange(len(ours)), names, fontsize=8, rotation=30 if slanted else 0,
                      ha="right" if slanted else "center")
        ax.set_title(wrap(label), fontsize=8)
        ax.set_ylim(0, ours["latency_s"].max() * 1.3)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"seconds per image ({steps} Euler steps)")
    ax = axes[-1]
    if paper.empty:
        ax.set_axis_off()
    else:
        for i, row in enumerate(paper.itertuples()):
            ax.bar(i, row.latency_s, color=colour(row.model, order), edgecolor="black", linewidth=0.6, alpha=0.75)
            ax.annotate(f"{row.latency_s:.4g} s", (i, row.latency_s), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 3), textcoords="offset points")
        ax.set_xticks(np.arange(len(paper)), [display_name(m) for m in paper["model"]], fontsize=8)
        ax.set_ylim(0, paper["latency_s"].max() * 1.3)
        ax.set_title(wrap(paper_label), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return fig


def wrap(text: str, width: int = TITLE_CHARS) -> str:
    """A title broken into lines of at most ``width`` characters, so that neighbouring panels' titles do not meet."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


# ---------------------------------------------------------------------------------------------- scaling

def scaling_figure(panels: list[dict], order: list[str]):
    """Log-log panels of a cost against image resolution, one line per model with its fitted exponent.

    Each panel: {"title", "ylabel", "data": DataFrame(model, resolution, value), "fits": {model: (k, a) or None}}
    where the fit is value = a * tokens**k and tokens = (resolution / 16)**2, so the slope against
    resolution on these axes is 2k.
    """
    from matplotlib.ticker import NullLocator

    panels = [p for p in panels if not p["data"].empty]
    if not panels:
        return None
    fig = new_figure(4.2 * len(panels), 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, panel in zip(axes, panels):
        data = panel["data"]
        for model in [m for m in order if m in set(data["model"])]:
            d = data[data["model"] == model].sort_values("resolution")
            fit = panel["fits"].get(model)
            label = f"{display_name(model)}: k = {fit[0]:.2f}" if fit else f"{display_name(model)}: k n/a (one size)"
            st = style(model, order)
            ax.plot(d["resolution"], d["value"], st.marker, color=st.colour, label=label)
            if fit:
                r = np.geomspace(d["resolution"].min(), d["resolution"].max(), 20)
                ax.plot(r, fit[1] * ((r / 16.0) ** 2) ** fit[0], st.line, color=st.colour, linewidth=1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        res = sorted(set(data["resolution"]))
        ax.set_xticks(res, [f"{int(r)}" for r in res])
        ax.xaxis.set_minor_locator(NullLocator())
        plain_log_ticks(ax.yaxis)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("image resolution (px)")
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"], fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, title="cost ~ pixels^k", title_fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------- quality vs latency

def quality_latency_figure(points: pd.DataFrame, metrics: list[tuple[str, str]], order: list[str], xlabel: str):
    """Scatter of quality metrics against seconds per image; one panel per (column, label) in ``metrics``.

    ``points``: model, latency_s, projected (bool), and the metric columns. Hollow markers are projected
    latencies, filled ones measured.
    """
    metrics = [(c, lab) for c, lab in metrics if c in points and points[c].notna().any()]
    points = points[points["latency_s"].notna()]
    if not metrics or points.empty:
        return None
    fig = new_figure(3.6 * len(metrics) + 2.6, 3.6)  # + the legend
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharex=True))
    for ax, (column, label) in zip(axes, metrics):
        for row in points.itertuples():
            value = getattr(row, column)
            if value is None or not np.isfinite(value):
                continue
            st = style(row.model, order)
            ax.plot(row.latency_s, value, st.marker, markersize=9, color=st.colour,
                    markerfacecolor="white" if row.projected else st.colour, markeredgewidth=2,
                    label=display_name(row.model))
        ax.set_xscale("log")
        plain_log_ticks(ax.xaxis)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.15, y=0.15)
    # one legend for the figure, not a label beside each point: close points would overlap their labels
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    return fig


# ---------------------------------------------------------------------------------------------- training loss

def loss_figure(curves: dict[str, pd.DataFrame], order: list[str]):
    """Loss against step for each run (``curves[model]`` has step and loss): raw thin, moving average thick."""
    curves = {m: c for m, c in curves.items() if not c.empty}
    if not curves:
        return None
    fig = new_figure(7.0, 3.8)
    ax = fig.subplots()
    for model in [m for m in order if m in curves]:
        c = curves[model].sort_values("step")
        st = style(model, order)
        window = max(1, math.ceil(len(c) / LOSS_SMOOTHING_POINTS))
        ax.plot(c["step"], c["loss"], color=st.colour, alpha=0.3, linewidth=0.8)
        ax.plot(c["step"], c["loss"].rolling(window, min_periods=1).mean(), color=st.colour, linestyle=st.line,
                linewidth=2, label=display_name(model))
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("training step")
    ax.set_ylabel("flow-matching loss (MSE, log scale)")
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------- quality vs training

def training_quality_figure(curves: dict[str, pd.DataFrame], order: list[str], targets: tuple = (),
                            reached: pd.DataFrame | None = None):
    """mIoU (line) and its interval (band) against training steps and against training FLOPs, per model; the mIoU
    targets of the time-to-quality table as dotted lines, and where each model reaches them (mean over seeds) as
    crosses.

    ``curves[model]`` has step, train_flops, miou, low, high; ``reached`` has model, target, step, train_flops.
    """
    curves = {m: c for m, c in curves.items() if not c.empty}
    if not curves:
        return None
    has_flops = any(c["train_flops"].notna().all() for c in curves.values())
    fig = new_figure(12.0 if has_flops else 7.0, 4.4)
    axes = fig.subplots(1, 2 if has_flops else 1, squeeze=False)[0]
    for ax, x, label in zip(axes, ("step", "train_flops"), ("training step", "training TFLOP (log scale)")):
        for model in [m for m in order if m in curves]:
            c = curves[model].sort_values("step")
            if c[x].isna().any():
                continue
            st = style(model, order)
            ax.plot(c[x], c["miou"], color=st.colour, marker=st.marker, linestyle=st.line, linewidth=1.8,
                    label=display_name(model))
            if c["low"].notna().all():
                ax.fill_between(c[x], c["low"], c["high"], color=st.colour, alpha=0.15, linewidth=0)
            hits = reached[(reached["model"] == model) & reached[x].notna()] if reached is not None else ()
            for hit in getattr(hits, "itertuples", lambda: ())():
                ax.plot(getattr(hit, x), hit.target, "x", color=st.colour, markersize=9, markeredgewidth=2.2)
        for t in targets:
            ax.axhline(t, color="#555555", linestyle=":", linewidth=0.9)
        ax.set_xlabel(label)
        ax.set_ylabel("mask mIoU")
        if x == "train_flops":
            ax.set_xscale("log")
            tera_ticks(ax.xaxis)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    return fig


# ---------------------------------------------------------------------------------------------- samples

def column_title(model: str) -> str:
    """A model's name for a narrow column: the backbone, then one variant setting per line."""
    base, _, overrides = model.partition(":")
    return "\n".join([DISPLAY_NAMES.get(base, base), *overrides.split(":")]) if overrides else \
        DISPLAY_NAMES.get(base, base)


def sample_grid_figure(masks: list[np.ndarray], columns: dict[str, list[np.ndarray]], row_labels: list[str]):
    """Rows of mask | one sample per model (same mask, same seed); ``masks`` are RGB pictures of the labels."""
    if not masks or not columns:
        return None
    names = ["mask"] + [column_title(m) for m in columns]
    n_rows, n_cols = len(masks), len(names)
    cell = 1.45
    title_lines = max(n.count("\n") + 1 for n in names)
    fig = new_figure(cell * n_cols + 0.6, cell * n_rows + 0.4 + GRID_TITLE_LINE_IN * title_lines)
    axes = np.array(fig.subplots(n_rows, n_cols, squeeze=False))
    for r in range(n_rows):
        pictures = [masks[r]] + [columns[m][r] for m in columns]
        for c, picture in enumerate(pictures):
            ax = axes[r, c]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c], fontsize=8)
        axes[r, 0].set_ylabel(row_labels[r], fontsize=7)
    return fig


# ---------------------------------------------------------------------------------------------- time breakdown

OP_CLASS_COLOURS = {  # one colour per class of bench.breakdown.OP_CLASSES, in its order
    "matmul": "#4e79a7", "attention": "#f28e2b", "scan": "#e15759", "conv": "#76b7b2",
    "norm_elementwise": "#59a14f", "layout": "#edc948", "other": "#bab0ac",
}
LEGEND_COLUMNS_PER_PANEL = 4


def breakdown_figure(panels: list[tuple[str, pd.DataFrame]]):
    """Stacked bars of milliseconds per network evaluation by operator class: a bar per model, a panel per device.

    ``panels``: (title, DataFrame of model and one column per class of ``OP_CLASS_COLOURS``, ms per NFE).
    """
    panels = [(title, df) for title, df in panels if not df.empty]
    if not panels:
        return None
    longest = max(len(display_name(m)) for _, df in panels for m in df["model"])
    # each panel: its bars plus room for the longest model name on the y axis (about 0.07 in per character)
    fig = new_figure((3.6 + 0.07 * longest) * len(panels), 1.8 + 0.45 * max(len(df) for _, df in panels))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, df) in zip(axes, panels):
        rows = np.arange(len(df))
        ends = np.zeros(len(df))
        for cls, col in OP_CLASS_COLOURS.items():
            ms = df[cls].to_numpy(dtype=float)
            ax.barh(rows, ms, left=ends, color=col, edgecolor="black", linewidth=0.4, label=cls.replace("_", " + "))
            ends += ms
        for row, total in zip(rows, ends):
            ax.annotate(f"{total:.3g} ms", (total, row), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=7)
        ax.set_yticks(rows, [display_name(m) for m in df["model"]], fontsize=8)
        ax.invert_yaxis()  # the first model on top
        ax.margins(x=0.2)  # room for the totals
        ax.set_xlabel("ms per network evaluation (batch 1)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(wrap(title), fontsize=8)
        ax.set_axisbelow(True)
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=7,
               ncols=min(len(OP_CLASS_COLOURS), LEGEND_COLUMNS_PER_PANEL * len(panels)))
    return fig
