"""Pictures and logs: JOB/loss.png, `plan --plot`, `jobs --plot`, and --log csv,tensorboard.

A picture counts as drawn when the PNG decodes and holds the colours of what it should show (the
training curve's blue, the evaluation curve's orange, the budget's red) in quantity: a blank or
half-drawn figure fails.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import loss_pictures_drawn
from test_cli import cli  # the CLI in-process: (exit code, stdout, stderr)
from test_resume import COMMON, signal_at_step

from lowmem_ft import pictures

pytest.importorskip("matplotlib")  # the test extra installs it; a bare install says how to get it

BLUE, ORANGE, RED = (31, 119, 180), (255, 127, 14), (214, 39, 40)  # tab:blue, tab:orange, tab:red
ARGS = [*COMMON, "--max-steps", "6", "--eval-every", "2", "--save-every", "2", "--lr", "1e-3"]


@pytest.fixture(autouse=True, scope="module")
def _drawn():
    """Here runs draw their pictures (the suite's others do not: conftest.py)."""
    with loss_pictures_drawn():
        yield


def pixels_of(png: Path, colour: tuple[int, int, int]) -> int:
    """How many pixels of ``png`` have ``colour`` (within a little antialiasing)."""
    from matplotlib.image import imread

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG file"
    image = (imread(png)[..., :3] * 255).round()
    return int((np.abs(image - np.array(colour)).max(axis=-1) <= 8).sum())


def metrics(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, data_module) -> Path:
    """A 6-step full fine-tune with both extra logs, evaluated every 2 steps; JOB/drawn.json says
    how many lines metrics.jsonl held each time loss.png was drawn."""
    from lowmem_ft.cli import main

    job = tmp_path_factory.mktemp("pictures") / "job"
    drawn, draw = [], pictures.draw_loss

    def counting_draw(job_dir, out=None, title=None):
        drawn.append(len(metrics(job_dir)))
        return draw(job_dir, out, title)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_code:
        patch.setattr(pictures, "draw_loss", counting_draw)
        patch.setattr(pictures.LossPicture, "REDRAW_EVERY_S", 0.0)  # every checkpoint is due
        main(["run", "tiny", str(data_module), "--out", str(job), "--log", "csv,tensorboard", *ARGS])
    assert exit_code.value.code == 0
    (job.parent / "drawn.json").write_text(json.dumps(drawn))
    return job


def test_a_finished_job_has_its_loss_picture(finished_job):
    png = finished_job / "loss.png"
    assert pixels_of(png, BLUE) > 300, "no training-loss curve"
    assert pixels_of(png, ORANGE) > 300, "no evaluation-loss curve"
    assert not list(finished_job.glob(".*.partial")), "a temporary file was left behind"


def test_a_checkpoint_redraws_the_picture_only_when_the_last_drawing_is_a_minute_old(tmp_path, monkeypatch):
    """Drawing costs a third of a second: a job checkpointing every few seconds draws once a minute;
    a stop draws what the last checkpoint skipped, and the end of a run whatever the clock says."""
    drawn, now = [], [0.0]
    monkeypatch.setattr(pictures, "draw_loss", lambda job_dir, title=None: drawn.append(now[0]))
    picture = pictures.LossPicture(tmp_path, "job", clock=lambda: now[0])
    for now[0] in (100.0, 130.0, 159.0, 160.0, 200.0, 230.0):
        picture.at_checkpoint()
    picture.catch_up()  # a stop right after a drawn checkpoint: nothing to add
    now[0] = 240.0
    picture.at_checkpoint()
    picture.catch_up()  # a stop after one that was not drawn
    picture.catch_up()
    now[0] = 241.0
    picture.draw()
    assert drawn == [100.0, 160.0, 230.0, 240.0, 241.0]


def test_the_loss_picture_is_redrawn_at_each_checkpoint_and_at_the_end(finished_job):
    drawn = json.loads((finished_job.parent / "drawn.json").read_text())
    rows = metrics(finished_job)
    # checkpoints at steps 2, 4 and 6 (with what was logged up to them), then after the final evaluation
    at_checkpoints = [sum(1 for r in rows[:-1] if r["step"] <= step) for step in (2, 4, 6)]
    assert "eval_loss" in rows[-1] and drawn == [*at_checkpoints, len(rows)]


def test_csv_and_tensorboard_logs_hold_what_metrics_jsonl_holds(finished_job):
    rows = metrics(finished_job)
    with open(finished_job / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for row, record in zip(table, rows, strict=True):
        assert int(row["step"]) == record["step"]
        for key in ("loss", "eval_loss", "lr", "grad_norm"):
            assert (float(row[key]) if row[key] else None) == record.get(key), key

    scalars = tensorboard_scalars(finished_job)
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in rows if "loss" in r]
    evaluations = [(r["step"], pytest.approx(r["eval_loss"])) for r in rows if "eval_loss" in r]
    assert scalars["eval/loss"] == evaluations


def tensorboard_scalars(job: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(job / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_resumed_job_logs_each_step_once(tmp_path, capsys, monkeypatch, data, finished_job):
    """A second Ctrl-C at step 3 stops at once: metrics.jsonl holds step 3, its checkpoint (step 2)
    does not. The resumed run logs step 3 again; the CSV and TensorBoard must not hold it twice."""
    job = tmp_path / "job"
    with monkeypatch.context() as patch:
        signal_at_step(patch, 3, count=2)
        code, _, _ = cli(capsys, "run", "tiny", data, "--out", job, "--log", "csv,tensorboard", *ARGS)
    assert code == 130 and any(r.get("step") == 3 for r in metrics(job))
    code, _, err = cli(capsys, "resume", job, "-q")
    assert code == 0, err

    with open(job / "metrics.csv", newline="") as f:
        steps = [(row["step"], bool(row["loss"])) for row in csv.DictReader(f)]
    assert len(steps) == len(set(steps)) == len(metrics(job))
    reference = tensorboard_scalars(finished_job)
    resumed = tensorboard_scalars(job)
    for tag in ("train/loss", "eval/loss", "train/lr"):
        assert [s for s, _ in resumed[tag]] == [s for s, _ in reference[tag]], tag


def test_logs_first_asked_for_by_resume_hold_the_steps_before_it(
    tmp_path, capsys, monkeypatch, data, finished_job
):
    """A job run without --log and resumed with --log csv,tensorboard: both logs hold every step
    from the first, as the finished job's do, not only the steps after the resume."""
    job = tmp_path / "job"
    with monkeypatch.context() as patch:
        signal_at_step(patch, 3, count=2)
        code, _, _ = cli(capsys, "run", "tiny", data, "--out", job, *ARGS)
    assert code == 130 and not (job / "tensorboard").exists()
    code, _, err = cli(capsys, "resume", job, "--log", "csv,tensorboard", "-q")
    assert code == 0, err
    with open(job / "metrics.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(metrics(job))
    reference, resumed = tensorboard_scalars(finished_job), tensorboard_scalars(job)
    for tag in ("train/loss", "eval/loss", "train/lr"):
        assert [s for s, _ in resumed[tag]] == [s for s, _ in reference[tag]], tag


def test_plan_plot_draws_the_memory_against_the_budget(tmp_path, capsys):
    png = tmp_path / "plan.png"
    # (--cpu-mem: the host budget is otherwise what this machine has free now, less beside other tests)
    args = ["--method", "hift", "--gpu-mem", "8GiB", "--cpu-mem", "64GiB", "--plot", png]
    code, out, err = cli(capsys, "plan", "llama-2-7b", *args)
    assert code == 0, err
    assert f"plot       {png}" in out
    assert pixels_of(png, RED) > 200, "no budget line"
    assert pixels_of(png, BLUE) > 2000, "no component bars"

    # --json keeps standard output JSON
    code, out, _ = cli(capsys, "plan", "tiny", "--json", "--plot", tmp_path / "tiny.png")
    assert code == 0 and json.loads(out)["method"] == "full" and (tmp_path / "tiny.png").is_file()


def test_jobs_plot_compares_the_jobs_curves(tmp_path, capsys, finished_job):
    png = tmp_path / "compare.png"
    code, out, err = cli(capsys, "jobs", finished_job.parent, finished_job, "--plot", png)
    assert code == 0, err
    assert f"plot       {png} (1 job)" in out  # the same job given twice is drawn once
    assert pixels_of(png, BLUE) > 300


def test_a_plan_of_several_ranks_says_its_host_bars_are_one_ranks(tmp_path, capsys, monkeypatch):
    """The host rows are one rank's, the host peak the node's: the picture says so, or its peak line
    stands far from every bar for no reason it gives."""
    figures = []
    monkeypatch.setattr(pictures, "_save", lambda figure, out: figures.append(figure) or out)
    args = ["--method", "full", "--nproc", "8", "--gpu-mem", "24GiB", "--cpu-mem", "256GiB"]
    code, out, err = cli(capsys, "plan", "llama-2-7b", *args, "--plot", tmp_path / "p.png")
    assert code == 0, err
    gpu, host = (ax.get_title(loc="left") for ax in figures[0].axes)
    assert host.endswith("the node's 8 ranks together (the bars: one rank's)") and "ranks" not in gpu


@pytest.mark.parametrize(
    "logged", [[{"step": 1, "loss": 4.9, "lr": 7e-4}], [{"step": 0, "eval_loss": 4.6}], []]
)
def test_a_job_of_one_step_or_none_gets_whole_steps_on_its_axis(logged, tmp_path, monkeypatch):
    """A job of one step (or stopped before its first) is drawn on an axis of whole steps around it,
    not from -0.05 to 0.05 with no step on it; the comparison of such jobs too."""
    job = tmp_path / "job"
    job.mkdir()
    (job / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in logged))
    figures = []
    monkeypatch.setattr(pictures, "_save", lambda figure, out: figures.append(figure) or out)
    pictures.draw_loss(job)
    pictures.draw_comparison([("job", job)], tmp_path / "compare.png")
    step = logged[0]["step"] if logged else 0
    comparison = figures[1]  # an empty panel says so, as loss.png does
    said = [[text.get_text() for text in ax.texts] for ax in comparison.axes]
    trained, evaluated = any("loss" in line for line in logged), any("eval_loss" in line for line in logged)
    assert said == [[] if evaluated else ["nothing logged yet"], [] if trained else ["nothing logged yet"]]
    assert [ax.get_xlim() for figure in figures for ax in figure.axes] == [(step - 1, step + 1)] * sum(
        len(figure.axes) for figure in figures
    )


def test_many_jobs_are_each_told_apart_in_the_comparison(tmp_path, capsys, finished_job, monkeypatch):
    """24 jobs, two by two of the same name in two experiments: each has a colour and line of its
    own (matplotlib's cycle repeats at the eleventh), a label naming its experiment, and the legend
    sits in the picture, clear of both panels (inside the left one, it ran off the top)."""
    for experiment in ("exp1", "exp2"):
        for i in range(12):
            shutil.copytree(finished_job, tmp_path / experiment / f"job-{i:02d}")
    figures = []
    monkeypatch.setattr(pictures, "_save", lambda figure, out: figures.append(figure) or out)
    code, out, err = cli(capsys, "jobs", tmp_path / "exp1", tmp_path / "exp2", "--plot", tmp_path / "all.png")
    assert code == 0, err
    (figure,) = figures
    lines = [line for ax in figure.axes for line in ax.get_lines()]
    looks = {(line.get_color(), line.get_linestyle()) for line in figure.axes[0].get_lines()}
    assert len(lines) == 48 and len(looks) == 24
    (legend,) = figure.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert len(set(labels)) == 24 and "exp1/job-00 (full)" in labels and "exp2/job-00 (full)" in labels
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)  # laid out and drawn as savefig draws it
    canvas.draw()
    renderer = canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1
    assert figure.bbox.y0 <= box.y0 and box.y1 <= figure.bbox.y1
    assert all(not box.overlaps(ax.get_tightbbox(renderer)) for ax in figure.axes)


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "tiny", "--plot", "plan.svg"], "pictures are PNG files; give a name ending in .png"),
        (["plan", "tiny", "--plot", "nowhere/plan.png"], "the directory nowhere does not exist"),
        (["jobs", "empty", "--plot", "jobs.png"], "no jobs under empty to draw"),
        (["plan", "tiny", "--plot", "empty"], "--plot empty: pictures are PNG files"),
        (
            ["plan", "tiny", "--plot", "a-directory.png"],
            "that is a directory; give a file name ending in .png",
        ),
        (
            ["jobs", "empty", "--plot", "a-file/jobs.png"],
            "--plot a-file/jobs.png: a-file is a file, not a directory",
        ),
        (
            ["jobs", "nowhere"],
            "nowhere: no such directory; give directories holding jobs, or job directories",
        ),
        (["jobs", "a-file"], "a-file: not a directory; give directories holding jobs"),
        (["run", "tiny", "DATA", "--log", "wandb"], "--log 'wandb' is not known; give csv, tensorboard"),
    ],
)
def test_bad_picture_and_log_options_are_one_line(args, message, tmp_path, capsys, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-directory.png").mkdir()
    (tmp_path / "a-file").write_text("")
    code, out, err = cli(capsys, *[data if a == "DATA" else a for a in args])
    assert code == 2 and err.strip() == f"error: {err.strip().removeprefix('error: ')}"
    assert message in err and len(err.strip().splitlines()) == 1
    assert out == ""  # checked before any work: no plan, no table printed above the error
    assert not (tmp_path / "runs").exists()
    assert not list(tmp_path.rglob("*.partial"))


def test_a_picture_that_cannot_be_written_is_one_line_before_any_work_and_leaves_nothing(
    tmp_path, capsys, monkeypatch
):
    """A directory the user cannot write to (checked by writing there: root passes any permission
    test): one line, exit 2; a write that fails half way (a full disk): one line, exit 4; no
    temporary file either way."""
    real_touch = Path.touch

    def touch(path, *args, **kwargs):
        if path.parent.name == "read-only":
            raise PermissionError(13, "Permission denied", str(path))
        return real_touch(path, *args, **kwargs)

    (tmp_path / "read-only").mkdir()
    monkeypatch.setattr(Path, "touch", touch)
    for command in (["plan", "llama-2-7b", "--gpu-mem", "24GiB"], ["jobs", tmp_path]):
        code, out, err = cli(capsys, *command, "--plot", tmp_path / "read-only" / "p.png")
        assert code == 2 and out == "", err
        assert err.strip() == (
            f"error: --plot {tmp_path / 'read-only' / 'p.png'}: cannot write under {tmp_path / 'read-only'} "
            "(Permission denied); give a path you can write to"
        )

    from matplotlib.figure import Figure

    def full_disk(self, path, **kwargs):
        Path(path).write_bytes(b"half a picture")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    code, out, err = cli(capsys, "plan", "tiny", "--plot", tmp_path / "plan.png")
    assert code == 4, err  # (DiskError's code: a full disk)
    assert err.strip() == f"error: could not write {tmp_path / 'plan.png'}: the disk is full"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["read-only"]


def test_without_matplotlib_a_job_still_runs_and_says_how_to_draw(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pictures, "available", lambda: False)
    picture = pictures.LossPicture(tmp_path, "job")  # what the recipe makes before its first step
    picture.draw()  # at a checkpoint: nothing, no error
    out = capsys.readouterr().out
    assert 'loss.png   not drawn: matplotlib is not installed (pip install "lowmem-ft[plots]")' in out
    assert not (tmp_path / "loss.png").exists()
    code, _, err = cli(capsys, "plan", "tiny", "--plot", tmp_path / "plan.png")
    assert (
        code == 2
        and 'drawing needs matplotlib, which is not installed: pip install "lowmem-ft[plots]"' in err
    )


def test_curves_skip_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "lo')
    curves = pictures.Curves.read(tmp_path / "metrics.jsonl")
    assert curves.steps == [1] and curves.loss == [2.0]
    assert pictures.draw_loss(tmp_path).is_file()


def test_curves_skip_lines_damaged_by_hand(tmp_path, capsys):
    """Bytes that are not UTF-8 and a loss that is text made `jobs --plot` a traceback."""
    (tmp_path / "metrics.jsonl").write_bytes(
        b'{"step": 1, "loss": 2.0, "lr": 0.1}\n\xff\xfe{"step": 2}\n{"step": 3, "loss": "abc", "lr": 0.1}\n'
        b'{"step": 4, "loss": 1.5, "lr": "x", "eval_loss": 1.7}\n{"step": true, "loss": 1.0}\n'
    )
    curves = pictures.Curves.read(tmp_path / "metrics.jsonl")
    assert (curves.steps, curves.loss, curves.lr) == ([1, 4], [2.0, 1.5], [0.1, None])
    assert (curves.eval_steps, curves.eval_loss) == ([4], [1.7])
    assert pictures.draw_loss(tmp_path).is_file()
