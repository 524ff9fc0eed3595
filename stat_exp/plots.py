"""Bar charts as PNG files in the run folder: profiles, per-skill accuracy, sweep comparisons."""

from pathlib import Path


def bar_chart(series: dict[str, dict[str, float]], path: Path, *, title: str, xlabel: str,
              order: list[str] | None = None) -> Path:
    """Horizontal bars, one group per category (e.g. skill) and one bar per series (e.g. before
    and after training). Categories in `order`, else by their largest value, descending."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    categories = order or sorted({c for values in series.values() for c in values},
                                 key=lambda c: -max(values.get(c, 0) for values in series.values()))
    height = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(categories), 3) * max(1, len(series) / 2) + 1.2))
    for i, (label, values) in enumerate(series.items()):
        ax.barh([y + i * height for y in range(len(categories))], [values.get(c, 0) for c in categories], height,
                label=label)
    ax.set_yticks([y + height * (len(series) - 1) / 2 for y in range(len(categories))], categories, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
