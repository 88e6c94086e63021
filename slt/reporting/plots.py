"""PNG plots of the report (matplotlib, the `plot` extra). Each method writes one figure
and returns the markdown line that shows it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from slt.analysis import (
    mean_std,  # noqa: E402
    theory_width,  # noqa: E402
)
from slt.fileio import atomic_write_bytes  # noqa: E402


def _label(key: tuple) -> str:
    """A group's label for a legend, wrapped (a model reference's arguments make it long)."""
    import textwrap

    from slt.reporting.studies import label_of

    return textwrap.fill(label_of(key), 48)


class Plots:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def _save(self, fig: Any, name: str, alt: str) -> str:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        atomic_write_bytes(self.out_dir / name, buf.getvalue())  # a failure names the file
        return f"![{alt}]({name})\n"

    @staticmethod
    def _line(ax: Any, by_x: dict[float, list[float]], label: str, **kw: Any) -> None:
        xs = sorted(x for x, v in by_x.items() if v)
        stats = [mean_std(by_x[x]) for x in xs]
        ax.errorbar(xs, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats],
                    marker="o", capsize=3, label=label, **kw)

    @staticmethod
    def _style(ax: Any, xlabel: str, ylabel: str, title: str, legend_size: int | None = 7
               ) -> None:
        """Labels, a light grid and (unless None) a legend: the same on every panel."""
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if legend_size is not None:
            ax.legend(fontsize=legend_size)

    def _vs_density(self, series: dict[tuple, dict[float, list[float]]], ylabel: str,
                    title: str, name: str, alt: str) -> str:
        """One line per setting of a percentage against the source density (log scale)."""
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for key, by_d in series.items():
            self._line(ax, by_d, _label(key))
        ax.set_xscale("log")
        self._style(ax, "source density d (log scale)", ylabel, title)
        return self._save(fig, name, alt)

    def accuracy(self, series: dict[tuple, dict[float, list[float]]]) -> str:
        return self._vs_density(series, "test accuracy (%)", "Ticket accuracy vs source density",
                                "accuracy_vs_density.png", "accuracy vs source density")

    def survival(self, series: dict[tuple, dict[float, dict[str, list[float]]]]) -> str:
        from matplotlib.lines import Line2D

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        parts = {"fraction": (":", "dense-ticket edges in source"),
                 "surviving": ("--", "surviving part, no search (acc)"),
                 "searched": ("-", "searched again (acc)")}
        for key, by_d in series.items():
            color = axes[0].plot([], [])[0].get_color()  # one colour per setting, both panels
            self._line(axes[0], {d: v["retained"] for d, v in by_d.items()}, _label(key),
                       color=color)
            for part, (style, _) in parts.items():
                self._line(axes[1], {d: v[part] for d, v in by_d.items()}, "", color=color,
                           linestyle=style)
        for ax in axes:
            ax.set_xscale("log")
        xlabel = "source density d (log scale)"
        self._style(axes[0], xlabel, "accuracy retained vs d = 1 (%)", "Accuracy retained")
        self._style(axes[1], xlabel, "percent", "What survives of the dense ticket", None)
        axes[1].legend(handles=[Line2D([], [], color="gray", linestyle=style, label=label)
                                for style, label in parts.values()], fontsize=7)
        return self._save(fig, "survival.png", "survival")

    def width(self, series: dict[tuple, dict[float, list[float]]]) -> str:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for (key, d), by_w in series.items():
            line = ax.plot([], [])[0]
            color = line.get_color()
            self._line(ax, by_w, f"d={d:g} {_label(key)}", color=color)
            if d < 1:
                ax.axvline(theory_width(d), color=color, linestyle=":", alpha=0.8)
        ax.set_xscale("log")
        self._style(ax, "width multiplier (dotted: theory w(d))", "test accuracy (%)",
                    "Width study")
        return self._save(fig, "width.png", "width study")

    def profiles(self, profiles: dict[tuple, dict[float, list[tuple[str, float]]]]) -> str:
        densities = sorted({d for by_d in profiles.values() for d in by_d}, reverse=True)
        fig, axes = plt.subplots(1, len(densities), figsize=(4.2 * len(densities), 3.8),
                                 squeeze=False)
        for ax, d in zip(axes[0], densities):
            for key, by_d in sorted(profiles.items(), key=str):
                if d in by_d:
                    ys = [v for _, v in by_d[d]]
                    ax.plot(range(len(ys)), ys, marker=".", label=_label(key))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_yscale("log")
            self._style(ax, "layer", "layer density d_l", f"d = {d:g}", 6)
        return self._save(fig, "layer_densities.png", "layerwise densities")

    def planted(self, series: dict[tuple, dict[float, dict[str, list[float]]]]) -> str:
        """Left: the plant's survival in the source (dotted) and the ticket's recall of it
        (solid); right: the plant's accuracy inside the source (dashed) and the ticket's."""
        from matplotlib.lines import Line2D

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for key, by_d in series.items():
            color = axes[0].plot([], [])[0].get_color()
            def part(name: str, by_d: dict = by_d) -> dict[float, list[float]]:
                return {d: v[name] for d, v in by_d.items()}

            self._line(axes[0], part("recall"), _label(key), color=color)
            self._line(axes[0], part("planted edges in source"), "", color=color,
                       linestyle=":")
            self._line(axes[0], part("chance recall"), "", color=color, linestyle="-.",
                       alpha=0.5)
            self._line(axes[1], part("found ticket (acc)"), "", color=color)
            self._line(axes[1], part("plant in source, no search (acc)"), "", color=color,
                       linestyle="--")
        for ax in axes:
            ax.set_xscale("log")
        xlabel = "source density d (log scale)"
        self._style(axes[0], xlabel, "percent of planted edges", "Plant kept and found")
        self._style(axes[1], xlabel, "test accuracy (%)", "Plant vs found ticket", None)
        axes[0].legend(handles=[*axes[0].get_legend_handles_labels()[0],
                                Line2D([], [], color="gray", label="recall"),
                                Line2D([], [], color="gray", linestyle=":",
                                       label="in source"),
                                Line2D([], [], color="gray", linestyle="-.",
                                       label="chance recall")], fontsize=7)
        axes[1].legend(handles=[Line2D([], [], color="gray", label="found ticket"),
                                Line2D([], [], color="gray", linestyle="--",
                                       label="plant in source, no search")], fontsize=7)
        return self._save(fig, "planted.png", "planted ticket")

    def effective(self, series: dict[tuple, dict[float, list[float]]]) -> str:
        """Effective over nominal ticket density vs source density, one line per setting."""
        return self._vs_density(series, "effective / nominal density (%)",
                                "Ticket edges on an input-to-output path",
                                "effective_density.png", "effective vs nominal density")
