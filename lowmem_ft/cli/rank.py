"""One rank of a job started by `--nproc N` (launch.py): ``python -m lowmem_ft.cli.rank
run|resume PAYLOAD.json [--quiet]``. It runs what `lowmem-ft run` / `resume` would, as a rank;
only rank 0 prints (the others' output would repeat it N times)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from lowmem_ft.distributed.ranks import Ranks


@record  # a rank's traceback reaches the agent, which reports it
def main(argv: list[str]) -> None:
    from lowmem_ft.cli import report_to_console
    from lowmem_ft.errors import UserError
    from lowmem_ft.stop import RunInterrupted

    command, payload_file = argv[0], Path(argv[1])
    show_progress = "--quiet" not in argv
    payload = json.loads(payload_file.read_text())
    main_rank = Ranks.from_env().main
    if main_rank:
        report_to_console()
    else:
        logging.getLogger("lowmem_ft").setLevel(logging.WARNING)
    try:
        if command == "run":
            from lowmem_ft.config import RunConfig
            from lowmem_ft.start import run

            run(RunConfig.from_json(payload["config"]), show_progress=show_progress and main_rank)
        else:
            from lowmem_ft.resume import resume

            resume(Path(payload["job"]), payload["overrides"], show_progress=show_progress and main_rank)
    except RunInterrupted as exc:
        if main_rank:
            print(str(exc), file=sys.stderr)
        sys.exit(130)
    except UserError as exc:  # the same bad input on every rank: said once
        if main_rank:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception as exc:  # one line (the job's error.log has rank 0's traceback), not N tracebacks
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: rank {Ranks.from_env().rank}: {type(exc).__name__}: {first_line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
