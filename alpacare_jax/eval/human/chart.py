"""The results chart, in the style of the AlpaCare paper's human-evaluation figure.

One panel per model pair, one horizontal bar per criterion, split into the share of votes the first model
wins, ties and loses. Drawn on a bare `Figure` with the Agg canvas: no pyplot state, no display needed, safe
in the server's worker threads.
"""

from __future__ import annotations

import io
from collections import defaultdict

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .results import Comparison

COLORS = ("#2a9d8f", "#c9ccd1", "#e76f51")  # win, tie, loss


def preference_chart(comparisons: list[Comparison]) -> bytes:
    """PNG bytes of the win / tie / loss bars."""
    by_pair: dict[tuple[str, str], list[Comparison]] = defaultdict(list)
    for c in comparisons:
        by_pair[(c.model_1, c.model_2)].append(c)
    fig = Figure(figsize=(8, 1.2 + 1.5 * max(1, len(by_pair))), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(by_pair)), 1, squeeze=False)[:, 0]
    for ax, ((m1, m2), comps) in zip(axes, by_pair.items()):
        labels = [c.criterion.capitalize() for c in comps]
        left = [0.0] * len(comps)
        for part, color, name in zip(("wins", "ties", "losses"), COLORS, (f"{m1} wins", "Tie", f"{m2} wins")):
            shares = [100 * getattr(c, part) / max(1, c.wins + c.ties + c.losses) for c in comps]
            bars = ax.barh(labels, shares, left=left, color=color, label=name, height=0.6)
            ax.bar_label(bars, labels=[f"{s:.0f}%" if s >= 6 else "" for s in shares], label_type="center", fontsize=9)
            left = [a + b for a, b in zip(left, shares)]
        for y, c in enumerate(comps):
            ax.annotate(f"pref. {100 * c.preference:.0f}% [{100 * c.ci_low:.0f}, {100 * c.ci_high:.0f}]",
                        (101, y), va="center", fontsize=8, annotation_clip=False)
        ax.set_xlim(0, 100)
        ax.invert_yaxis()
        ax.set_xlabel("% of votes")
        ax.set_title(f"{m1} vs {m2} (n = {comps[0].wins + comps[0].ties + comps[0].losses} votes per criterion)",
                     fontsize=10, pad=22)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False, fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    if not by_pair:
        axes[0].text(0.5, 0.5, "no votes yet", ha="center", va="center")
        axes[0].set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
