"""Matplotlib helpers shared by the analysis figures: headless backend, CJK-capable fonts,
atomic PNG writes, and a placeholder figure that says why a plot could not be drawn."""
from pathlib import Path

CJK_FONTS = ["Noto Sans CJK TC", "Noto Sans CJK JP", "Noto Serif CJK TC", "Noto Sans CJK SC"]


def pyplot():
    """matplotlib.pyplot on the Agg backend, with a CJK font as fallback after DejaVu Sans."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    plt.style.use("ggplot")  # the style optuna's figures use: all analysis figures look alike
    available = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [name for name in CJK_FONTS if name in available]
    matplotlib.rcParams["font.family"] = ["DejaVu Sans", *cjk]
    matplotlib.rcParams["axes.unicode_minus"] = False
    return plt


def new_figure(width=8, height=4.5):
    plt = pyplot()
    return plt.subplots(figsize=(width, height))


def save_figure(fig, path):
    """Write the PNG through a temp file (no half-written figure) and close the figure."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def placeholder_figure(path, title, message):
    """A small PNG that states why the real figure is missing (keeps the set of outputs stable)."""
    fig, ax = new_figure(7, 2.5)
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11, transform=ax.transAxes)
    save_figure(fig, path)
    return message
