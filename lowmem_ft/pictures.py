"""Pictures of a job and of a plan, as PNG files (matplotlib, an optional extra).

    JOB/loss.png                          every job: redrawn at checkpoints (at most once a minute)
                                          and at the end
    lowmem-ft plan ... --plot FILE        the memory plan, by component, against the budget
    lowmem-ft jobs runs/ --plot FILE      the loss curves of several jobs side by side

Drawn with matplotlib's object API (a ``Figure`` of its own, no pyplot): nothing global, no window,
no display needed. Every file is written to a temporary name and renamed, so a run killed while it
draws leaves the previous picture, never half of one. Torch-free: it reads metrics.jsonl and plans
as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from lowmem_ft.errors import DiskError, UserError, disk_fault
from lowmem_ft.files import check_can_create

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "lowmem-ft[plots]"'
GiB = 1 << 30


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float):
    if not available():
        raise UserError(f"drawing needs matplotlib, which is not installed: {INSTALL_HINT}")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def check_destination(out: Path) -> None:
    """Refuse, in one line, a picture that could not be drawn or written to ``out``: checked before
    any work (``plan --plot`` plans first, ``jobs --plot`` reads every job)."""
    if not available():
        raise UserError(f"drawing needs matplotlib, which is not installed: {INSTALL_HINT}")
    if out.suffix.lower() != ".png":
        raise UserError(f"--plot {out}: pictures are PNG files; give a name ending in .png")
    if out.is_dir():
        raise UserError(f"--plot {out}: that is a directory; give a file name ending in .png")
    if not out.parent.exists():  # (a picture is a file: its directory is not made for it)
        raise UserError(f"--plot {out}: the directory {out.parent} does not exist")
    check_can_create(out, "--plot")


def _partial(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def _save(figure, out: Path) -> Path:
    """Write ``figure`` to ``out`` (a .png) atomically: a failed write leaves no temporary file."""
    out = Path(out)
    check_destination(out)
    partial = _partial(out)
    try:
        figure.savefig(partial, format="png", dpi=110)
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        fault = disk_fault(exc)  # a full disk exits 4, as every write of the tool does
        raise (DiskError if fault else UserError)(
            f"could not write {out}: {fault or exc.strerror or exc}"
        ) from None
    return out


# -- a job's curves -------------------------------------------------------------------------------
@dataclass
class Curves:
    """What metrics.jsonl holds, as columns: training steps and evaluations."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)

    @classmethod
    def read(cls, metrics: Path) -> Curves:
        """The curves of a metrics.jsonl. A line that is not a record of numbers is skipped: a torn
        last line (a run killed while writing), or a file edited or damaged by hand (bytes that
        are not UTF-8, a loss that is text)."""
        curves = cls()
        if not metrics.is_file():
            return curves

        def number(value) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        for line in metrics.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or not number(record.get("step")):
                continue
            loss, lr = record.get("loss"), record.get("lr")
            if number(loss) and not record.get("skipped"):
                curves.steps.append(record["step"])
                curves.loss.append(loss)
                curves.lr.append(lr if number(lr) else None)
            if number(record.get("eval_loss")):
                curves.eval_steps.append(record["step"])
                curves.eval_loss.append(record["eval_loss"])
        return curves

    @property
    def window(self) -> int:
        """Steps in the moving average of the training loss: a tenth of the run."""
        return max(1, len(self.loss) // 10)

    def smoothed_loss(self) -> list[float]:
        """The training loss averaged over the last ``window`` steps: a noisy per-step loss hides
        its trend (the raw one is drawn faintly behind it)."""
        window = self.window
        total, out = 0.0, []
        for i, value in enumerate(self.loss):
            total += value
            if i >= window:
                total -= self.loss[i - window]
            out.append(total / min(i + 1, window))
        return out


def draw_loss(job_dir: Path, out: Path | None = None, title: str | None = None) -> Path:
    """JOB/loss.png: training loss (raw and smoothed) and evaluation loss against the optimizer step,
    with the learning rate on a second axis."""
    job_dir = Path(job_dir)
    curves = Curves.read(job_dir / "metrics.jsonl")
    figure = _figure(8, 4.5)
    ax = figure.add_subplot()
    if curves.steps:
        ax.plot(curves.steps, curves.loss, color="tab:blue", alpha=0.25, linewidth=1)
        label = "training loss" + (f" (mean of {curves.window} steps)" if curves.window > 1 else "")
        marker = _few(curves.steps)
        ax.plot(
            curves.steps, curves.smoothed_loss(), color="tab:blue", linewidth=2, label=label, marker=marker
        )
    if curves.eval_steps:
        ax.plot(
            curves.eval_steps, curves.eval_loss, color="tab:orange", marker="o", linewidth=2,
            label="evaluation loss",
        )  # fmt: skip
    _steps_axis(ax, curves.steps, curves.eval_steps)
    ax.set_ylabel("loss (per target token)")
    ax.grid(alpha=0.3)
    if curves.steps and any(lr is not None for lr in curves.lr):
        lr_axis = ax.twinx()
        lr_axis.plot(
            curves.steps, curves.lr, color="tab:gray", linestyle="--", linewidth=1, label="learning rate",
            marker="x" if _few(curves.steps) else None,  # (a cross: a dot would hide the loss's dot)
        )  # fmt: skip
        lr_axis.set_ylabel("learning rate", color="tab:gray")
        lr_axis.tick_params(axis="y", colors="tab:gray")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        handles = ax.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    else:
        handles = ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, loc="best")
    else:
        ax.text(0.5, 0.5, "no steps logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title or job_dir.name)
    return _save(figure, out or job_dir / "loss.png")


def _few(steps: list[int]) -> str | None:
    """A marker on each point of a curve of a few steps: a line through one point is not drawn."""
    return "o" if len(steps) <= 3 else None


def _steps_axis(ax, *steps: list[int]) -> None:
    """Optimizer steps, whole numbers on the axis (matplotlib would put 0.2 between steps 0 and 1).
    ``steps``: the steps drawn; where they are one step (or none), the axis spans a step either side
    (matplotlib's would span a tenth of a step, with no whole number on it)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    drawn = [step for some in steps for step in some]
    if not drawn or max(drawn) == min(drawn):
        middle = drawn[0] if drawn else 0
        ax.set_xlim(middle - 1, middle + 1)


class LossPicture:
    """A running job's loss.png, redrawn at checkpoints and at the end. A picture is never worth a
    run: without matplotlib it says so once, and a failure to draw is a warning.

    Drawing takes about a third of a second of CPU. At a checkpoint it is redrawn only when
    ``REDRAW_EVERY_S`` have passed since the last drawing: a job that checkpoints every few
    seconds (small models, tests) would otherwise spend more time drawing than training."""

    REDRAW_EVERY_S = 60.0

    def __init__(self, job_dir: Path, title: str, enabled: bool = True, clock=time.monotonic):
        self.job_dir, self.title, self.clock = job_dir, title, clock
        self.enabled = enabled and available()
        self._drawn_at: float | None = None
        self._behind = False  # a checkpoint came since the last drawing and was not drawn
        if enabled and not self.enabled:
            log.info(f"loss.png   not drawn: matplotlib is not installed ({INSTALL_HINT})")

    def at_checkpoint(self) -> None:
        """After a checkpoint: redrawn if the last drawing is ``REDRAW_EVERY_S`` old (or none)."""
        if self._drawn_at is None or self.clock() - self._drawn_at >= self.REDRAW_EVERY_S:
            self.draw()
        else:
            self._behind = True

    def catch_up(self) -> None:
        """A stop: redrawn if a checkpoint since the last drawing was not drawn."""
        if self._behind:
            self.draw()

    def draw(self) -> None:
        """Redrawn now (the end of the run, a stop)."""
        if not self.enabled:
            return
        self._drawn_at, self._behind = self.clock(), False
        try:
            draw_loss(self.job_dir, title=self.title)
        except Exception as exc:  # a font, a full disk: the run goes on, the next checkpoint retries
            log.warning(f"warning    could not draw {self.job_dir / 'loss.png'}: {type(exc).__name__}: {exc}")


# -- several jobs ---------------------------------------------------------------------------------
def draw_comparison(jobs: list[tuple[str, Path]], out: Path) -> Path:
    """Evaluation loss (left) and smoothed training loss (right) of several jobs, each its own colour
    and line (``_looks``), with one legend below both; ``jobs`` holds (label, job directory)."""
    if not jobs:
        raise UserError("no jobs to draw; give job directories or a directory holding them")
    rows = -(-len(jobs) // 3)  # the legend's rows, three jobs to a row, below the panels
    figure = _figure(12, 4.8 + 0.22 * rows)
    eval_ax, train_ax = figure.subplots(1, 2, sharex=True)  # (one step alone would get a scale of its own)
    for (label, directory), (color, style) in zip(jobs, _looks(len(jobs)), strict=True):
        curves = Curves.read(directory / "metrics.jsonl")
        look = dict(color=color, linestyle=style, label=label)
        eval_ax.plot(curves.eval_steps, curves.eval_loss, marker="o", markersize=3, **look)
        train_ax.plot(curves.steps, curves.smoothed_loss(), marker=_few(curves.steps), **look)
    titles = ("evaluation loss", "training loss (moving average over a tenth of the run)")
    every_step = [step for _, directory in jobs for step in _all_steps(directory)]
    for ax, what in zip((eval_ax, train_ax), titles, strict=True):
        ax.set_title(what)
        _steps_axis(ax, every_step)
        ax.set_ylabel("loss (per target token)")
        ax.grid(alpha=0.3)
        if not any(len(line.get_xdata()) for line in ax.get_lines()):  # (as loss.png says it)
            ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes)
    handles, labels = eval_ax.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=min(len(jobs), 3), fontsize="small")
    return _save(figure, out)


def _all_steps(directory: Path) -> list[int]:
    curves = Curves.read(directory / "metrics.jsonl")
    return curves.steps + curves.eval_steps


def _looks(n: int) -> list[tuple]:
    """``n`` (colour, line style) pairs, no two alike: ten colours for up to ten jobs, twenty for up to
    twenty, then the twenty again in dashed, dotted and dash-dotted lines (matplotlib's own cycle
    comes back to its first colour at the eleventh)."""
    from matplotlib import colormaps

    colors = colormaps["tab10" if n <= 10 else "tab20"].colors
    styles = ("-", "--", ":", "-.")
    return [(colors[i % len(colors)], styles[(i // len(colors)) % len(styles)]) for i in range(n)]


# -- a plan ---------------------------------------------------------------------------------------
def _is_transient(component: dict) -> bool:
    return "transient" in component["name"] or "transient" in component.get("note", "")


def draw_plan(plan: dict, model_name: str, out: Path) -> Path:
    """The memory a plan (its JSON form) counts, by component, on the GPU and in host memory, with
    its peak and budget. Components that live only for a moment (hatched) are not all alive at once:
    the peak is the largest moment, not the sum of the bars."""
    import textwrap

    panels = [("GPU", "gpu_bytes", plan["gpu"])] if plan["device"] == "cuda" else []
    panels.append(("host", "host_bytes", plan["host"]))
    rows = [sum(1 for c in plan["components"] if c[key]) for _, key, _ in panels]
    figure = _figure(12, 2.0 + 0.4 * sum(r + 2 for r in rows))
    axes = figure.subplots(len(panels), 1, squeeze=False, height_ratios=[r + 2 for r in rows])[:, 0]
    for ax, (where, key, totals) in zip(axes, panels, strict=True):
        shown = [c for c in plan["components"] if c[key]][::-1]  # the plan's order, top to bottom
        sizes = [c[key] / GiB for c in shown]
        bars = ax.barh([c["name"] for c in shown], sizes, height=0.6, color="tab:blue")
        for bar, component in zip(bars, shown, strict=True):
            if _is_transient(component):
                bar.set_hatch("//")
                bar.set_facecolor("tab:cyan")
        peak, budget = totals["peak_bytes"] / GiB, totals["budget_bytes"] / GiB
        ax.axvline(peak, color="black", linestyle="--", label=f"peak {peak:.1f} GiB")
        ax.axvline(budget, color="tab:red", linewidth=2, label=f"budget {budget:.1f} GiB")
        ax.set_xlim(0, max(budget, peak, *sizes) * 1.05)
        ax.set_xlabel(f"{where} memory (GiB)")
        at = f", at {plan['peak_phase']}" if where == "GPU" and plan.get("peak_phase") else ""
        if where == "host" and plan.get("ranks", 1) > 1:  # the bars are one rank's, as the table's rows
            at = f", the node's {plan['ranks']} ranks together (the bars: one rank's)"
        ax.set_title(f"{where}: peak {peak:.1f} GiB of {budget:.1f} GiB{at}", fontsize="medium", loc="left")
        ax.tick_params(axis="y", labelsize="small")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    verdict = "fits" if plan["fits"] else "does not fit"
    settings = "  ".join(f"{k}={v}" for k, v in plan.get("settings", {}).items())
    figure.suptitle(
        f"{model_name}, --method {plan['method']}: {verdict}   (hatched: transient; the peak is the largest "
        f"moment of a step, not the sum of the bars)\n" + textwrap.fill(settings, 130),
        fontsize="medium",
    )
    return _save(figure, out)
