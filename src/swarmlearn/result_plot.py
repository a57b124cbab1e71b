"""The picture at the end of `swarm run`: the swarm's validation accuracy after its merges next to
each node trained alone, measured at the same steps, and the final accuracy of every model as bars.

matplotlib is imported here only, when a run has finished: never on the CLI's start-up path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

Curve = list[tuple[float, float]]  # (optimizer steps per node, accuracy)


@dataclass
class ResultFigure:
    swarm_curve: Curve
    alone_curves: dict[str, Curve]  # node -> its curve trained alone
    finals: list[tuple[str, float]]  # (model, final test accuracy), drawn as bars in this order
    noise_band: float  # 95 % half-width on the test set, drawn as error bars
    eval_rows: int  # how many test rows the curves were measured on
    test_rows: int
    title: str = ""


def write_result_plot(path: Path, figure: ResultFigure) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    palette = plt.get_cmap("tab10")
    for i, (node, points) in enumerate(sorted(figure.alone_curves.items())):
        if points:
            steps, accuracy = zip(*points)
            curves.plot(steps, accuracy, "--o", color=palette(i + 1), markersize=4, label=f"{node} alone")
    if figure.swarm_curve:
        steps, accuracy = zip(*figure.swarm_curve)
        curves.plot(steps, accuracy, "-o", color=palette(0), linewidth=2.5, label="swarm (merged model)")
    curves.set_xlabel("optimizer steps per node")
    curves.set_ylabel(f"accuracy on {figure.eval_rows} test reviews")
    curves.set_ylim(0.3, 1.0)
    curves.grid(alpha=0.3)
    curves.legend(loc="lower right", fontsize=8)
    curves.set_title("during training", fontsize=10)

    names = [name for name, _ in figure.finals]
    values = [value for _, value in figure.finals]
    colors = [palette(0) if name == "swarm" else "0.55" if name.startswith("pooled") else palette(i + 1)
              for i, name in enumerate(names)]
    bars.bar(range(len(values)), values, color=colors, yerr=figure.noise_band, capsize=4)
    for x, value in enumerate(values):
        bars.text(x, value + figure.noise_band + 0.01, f"{value:.3f}", ha="center", fontsize=8)
    bars.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    bars.set_ylim(0.3, 1.0)
    bars.set_ylabel(f"final accuracy on {figure.test_rows} test reviews")
    bars.set_title(f"final (error bars: ±{figure.noise_band:.3f}, the noise band)", fontsize=10)
    bars.grid(axis="y", alpha=0.3)
    if figure.title:
        fig.suptitle(figure.title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
