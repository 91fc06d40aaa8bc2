"""``harli job plot``'s picture: a job's loss curve (train_loss at each logged step, valid_loss
at each scored checkpoint) as a PNG, drawn with matplotlib (the optional ``plots`` extra)."""

from __future__ import annotations

from pathlib import Path

from harli.bench import plotting
from harli.ipc.control import JobMetric, TrainMetric, ValidMetric


class NoMetrics(ValueError):
    """The job has logged no step yet: nothing to draw."""


def plot_loss_curve(metrics: list[JobMetric], out: Path, title: str) -> None:
    """Write the curve to ``out``; ``NoMetrics`` when there is no loss to draw,
    ``plotting.PlotsUnavailable`` without matplotlib."""
    train = [(m.step, m.train_loss) for m in metrics
             if isinstance(m, TrainMetric) and m.train_loss is not None]
    valid = [(m.step, m.valid_loss, m.valid_accuracy) for m in metrics
             if isinstance(m, ValidMetric)]
    if not train and not valid:
        raise NoMetrics("no loss logged yet")
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([s for s, _ in train], [loss for _, loss in train], lw=1.2,
                label="train_loss (logged steps)")
    if valid:
        ax.plot([s for s, _, _ in valid], [loss for _, loss, _ in valid], "o--", ms=6,
                label="valid_loss (checkpoints)")
        for step, loss, accuracy in valid:
            ax.annotate(f"{100 * accuracy:.0f} %", (step, loss), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps: no 2.5
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(title + ("; labels: valid next-token accuracy" if valid else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
