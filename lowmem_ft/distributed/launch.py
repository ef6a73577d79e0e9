"""`--nproc N`: start N ranks on this machine through torchrun's own agent (torch.distributed
.elastic), each running ``python -m lowmem_ft.rank``, and wait for them.

The options were checked here, in one process, before any rank starts: a mistake is one line, not
N. Rank 0 prints (the ranks share this terminal); a rank that fails makes the agent stop the others
at once (a dead rank's peers see their collectives fail), and this process exits non-zero with the
line the first rank to fail ended with (rank.py leaves it here), said once, as one process
would say it. The job directory and its last checkpoint stay as they were: `lowmem-ft resume JOB`
continues.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from lowmem_ft.errors import UserError


def launch(
    command: str,
    payload: dict,
    nproc: int,
    show_progress: bool,
    job_dir: Path,
    on_failure: Callable[[str], None],
) -> None:
    """Run ``python -m lowmem_ft.rank COMMAND PAYLOAD.json`` on ``nproc`` ranks;
    ``payload``: what the worker's command needs (a run's configuration, a job to resume), for the
    job in ``job_dir``. ``on_failure(line)``: told the line that says why the ranks failed (the job
    records it: rank 0, whose collectives broke when another rank went away, recorded only that)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="lowmem-ft-ranks-") as scratch:
        payload_file = Path(scratch) / "payload.json"
        payload_file.write_text(json.dumps(payload))
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=scratch),  # the ranks write to this terminal
            local_addr="localhost", monitor_interval=0.1,
        )  # fmt: skip
        # each rank gets its share of the cores (torch would give every rank all of them)
        threads = max(1, (os.cpu_count() or 1) // nproc)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks end with this process (rank.py)
        args = ["-u", "-m", "lowmem_ft.rank", command, str(payload_file)]
        args += [] if show_progress else ["--quiet"]
        try:
            with _agent_quiet():
                elastic_launch(config, sys.executable)(*args)
        except SignalException:  # Ctrl-C, SIGTERM: the agent passed it on to the ranks, which
            # finished their step and saved it; rank 0's line says where the job stands
            _say(_last_words(payload_file, 0))
            raise UserError("", exit_code=130) from None
        except ChildFailedError as exc:
            rank, failure = _cause(exc.failures)  # the others were stopped because of it
            if failure.exitcode > 0:  # the rank ended on a line of its own (an error, "interrupted")
                line = (
                    _last_words(payload_file, rank)
                    or f"error: rank {rank} stopped with exit code {failure.exitcode}"
                )
                code = 1 if failure.exitcode == PEER_LOST else failure.exitcode
            else:
                then = (
                    f"the job's last checkpoint is intact (`lowmem-ft resume {job_dir}` continues it)"
                    if (job_dir / "job.json").is_file()
                    else "no job was made; run the command again"  # (killed while setting up)
                )
                killed = f"rank {rank} was killed ({failure.signal_name()}); the other ranks were stopped"
                line, code = f"error: {killed}; {then}", 1
            if code != 130:  # (an interrupted job says so itself)
                on_failure(line.removeprefix("error: "))
            _say(line)
            raise UserError("", exit_code=code) from None


LAUNCHER_PID = "LOWMEM_FT_LAUNCHER_PID"
PEER_LOST = 75  # a rank's exit code when its collective failed because another rank went away


def _cause(failures: dict) -> tuple:
    """The failed rank that stopped the job, and its failure: the first the agent saw fail (its
    clock has whole seconds; within one, the order it found them in), passing over those that
    failed only because another had gone (PEER_LOST). Two ranks often end within one look of the
    agent: one killed, and one whose collective with it broke a moment later; the killed one is the
    cause, whichever is listed first. (The ranks the agent then stopped itself come after.)"""
    order = {rank: i for i, rank in enumerate(failures)}
    return min(failures.items(), key=lambda kv: (kv[1].exitcode == PEER_LOST, kv[1].timestamp, order[kv[0]]))


def last_words_file(payload_file: Path, rank: int) -> Path:
    """Where rank ``rank`` leaves the line it ended with (rank.py writes it, launch() says it)."""
    return payload_file.with_name(f"rank-{rank}.txt")


def _last_words(payload_file: Path, rank: int) -> str | None:
    try:
        return last_words_file(payload_file, rank).read_text().strip() or None
    except OSError:
        return None


def _say(line: str | None) -> None:
    if line:
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _agent_quiet() -> Iterator[None]:
    """Without the agent's own log lines ("Sending process ... closing signal SIGTERM", "failed
    (exitcode: 2) local_rank: 1 ..."): what went wrong is said once, by launch(), as one process
    would say it. Its loggers set their own levels, so they are cut off where they join torch's
    (whose handler prints them), for the launch only."""
    names = ("torch.distributed.elastic", "torch.distributed.launcher")
    saved = [(logging.getLogger(name), logging.getLogger(name).propagate) for name in names]
    silent = logging.NullHandler()  # (with no handler at all, logging's last resort would print them)
    for logger, _ in saved:
        logger.propagate = False
        logger.addHandler(silent)
    try:
        yield
    finally:
        for logger, propagate in saved:
            logger.removeHandler(silent)
            logger.propagate = propagate
