"""The configuration of a run: what the user asked for, validated, with defaults filled in.

It is frozen, and a run flows one way: the request (``job.json``'s "requested") → the planner fills
in what the user left open (prepare.plan_run) → the resolved run (``job.json``'s "config"), which
the methods and the recipe read. A change during the run (an out-of-memory retry with a smaller
micro-batch) is a new resolved run, recorded in the job, not an edit. Every check names the flag
it is about, so an error tells the user what to change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lowmem_ft.choices import METHOD_NAMES, OPTIMIZERS, SCHEDULES, flag, precision_problem
from lowmem_ft.devices import compute_dtype, device_problem, resolve_device
from lowmem_ft.errors import UserError
from lowmem_ft.registry import METHOD_SPECS, methods_taking, option_fields, options_class

if TYPE_CHECKING:  # torch only where a run needs it: the command line starts without it
    import torch

    from lowmem_ft.methods.options import MethodOptions


SEED_RANGE = "a 64-bit integer, from -2**63 to 2**63 - 1"


def seed_in_range(seed: int) -> bool:
    """Whether ``seed`` is a 64-bit signed integer: torch.manual_seed takes -2**63 to 2**64 - 1, and
    the recipe seeds with ``seed + epoch`` and ``seed + 1``, which stay in torch's range."""
    return -(2**63) <= seed < 2**63


@dataclass(frozen=True)
class RunConfig:
    model: str
    data: Path
    out: Path | None = None
    method: str = "full"
    # data
    format: str = "auto"
    seq_len: int = 512
    pack: bool = False
    eval_data: Path | None = None
    eval_fraction: float = 0.1
    eval_every: int = 50
    max_eval_examples: int = 500  # a seeded choice of the held-out examples; 0: all of them
    skip_bad_lines: bool = False
    # optimisation
    lr: float | None = None  # None: default_lr for the method and the model's size
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 16
    micro_batch_size: int | None = None  # None: the planner chooses
    epochs: float = 1.0
    max_steps: int | None = None
    optimizer: str = "adamw"
    # the method's own options (its package's options.py), e.g. HiFT's --units-per-group; None:
    # the method's defaults. Build a run with RunConfig.create(...) to give them by name.
    method_options: MethodOptions | None = None
    # streaming (hift and the sparse methods): decoder layers whose frozen weights stay in host memory
    streamed_layers: int | None = None  # None: the planner chooses
    # precision and device
    dtype: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool | None = None  # None: the planner chooses
    gpu_mem: str | None = None
    cpu_mem: str | None = None
    nproc: int = 1  # ranks on this machine (distributed/): one per GPU, or CPU processes with gloo
    save_dtype: str = "auto"
    seed: int = 0
    # checkpoints and faults (they change nothing in the result, so a resume may change them)
    save_every: int = 0  # optimizer steps between checkpoints; 0: by time only
    save_every_minutes: float = 30.0  # 0: by steps only
    keep_checkpoints: int = 2
    max_bad_steps: int = 5  # NaN/Inf losses in a row before the job stops
    log: str = ""  # copies of metrics.jsonl: "csv", "tensorboard" or both, comma-separated
    # model access
    allow_download: bool = False
    trust_remote_code: bool = False
    # The day a chat template writes into the text it renders (Llama-3's "Today Date: ..."): the
    # job's first day (ISO), kept by resume so that its examples are the ones the run started with.
    # Set by `run`, not an option; None (a job from before it): the day the data is rendered.
    chat_date: str | None = None

    def __post_init__(self):
        if self.method_options is None and self.method in METHOD_NAMES:  # an unknown one: validate says so
            object.__setattr__(self, "method_options", options_class(self.method)())
        for name in ("data", "eval_data", "out"):  # `--out=~/x` reaches us unexpanded: not a ./~ directory
            value = getattr(self, name)
            if value is not None and str(value).startswith("~"):
                object.__setattr__(self, name, Path(value).expanduser())

    @classmethod
    def create(cls, **values) -> RunConfig:
        """A run from option values by name, the method's options among them (as the command line
        and job.json give them). An option of another method is refused, whatever its value: the
        command line passes only the method options the user gave (cli.options.given)."""
        common = {name: values.pop(name) for name in _COMMON if name in values}
        method = common.get("method", "full")
        known = option_fields()
        unknown = set(values) - set(known)
        if unknown:
            raise TypeError(f"RunConfig.create: unknown options {sorted(unknown)}")
        if method not in METHOD_NAMES:
            return cls(**common)
        taken = options_class(method).names()
        for name in values:
            if name not in taken:
                takers = methods_taking(name)
                raise UserError(
                    f"{flag(name)} applies to --method {' / '.join(takers)}, not {method}"
                    + (" (their streamed weights are frozen)" if name == "stream" else "")
                )
        return cls(**common, method_options=options_class(method).from_values(values))

    def replace(self, **changes) -> RunConfig:
        """This run with some options changed, the method's options among them, by name."""
        common = {name: changes.pop(name) for name in _COMMON if name in changes}
        run = dataclasses.replace(self, **common)
        if changes:
            object.__setattr__(run, "method_options", dataclasses.replace(run.method_options, **changes))
        return run

    def option_values(self) -> dict:
        """Every option by name, the method's among them: what `job.json` records."""
        common = {name: getattr(self, name) for name in _COMMON}
        return {**common, **(dataclasses.asdict(self.method_options) if self.method_options else {})}

    def unused_options(self) -> list[str]:
        """Options given a value that this run does not read, each said in a line (a warning in the
        header: a value set and silently unused is a run the user did not ask for)."""
        default = {f.name: f.default for f in dataclasses.fields(RunConfig)}
        changed = lambda name: getattr(self, name) != default[name]  # noqa: E731
        unused = []
        if self.eval_data is not None and changed("eval_fraction"):
            unused.append(
                f"--eval-fraction {self.eval_fraction} is not used: --eval-data is the evaluation set"
            )
        if self.schedule == "constant" and changed("min_lr_ratio"):
            unused.append(
                f"--min-lr-ratio {self.min_lr_ratio} is not used: --schedule constant does not decay"
            )
        if self.eval_data is None and self.eval_fraction == 0 and changed("eval_every"):
            unused.append(
                f"--eval-every {self.eval_every} is not used: there is no evaluation set (--eval-fraction 0 "
                "and no --eval-data)"
            )
        return unused

    @property
    def streams_every_layer(self) -> bool:
        """--stream (HiFT and the sparse methods take it)."""
        return bool(getattr(self.method_options, "stream", False))

    def validate(self, data_files: bool = True, count_gpus: bool = True, device: bool = True) -> None:
        """Every option's check, in one place (``run``, ``plan`` and ``resume`` all come here);
        ``data_files``: also that the data files can be read (``plan`` has none); ``count_gpus``:
        also that --nproc has as many GPUs here (``plan`` may describe another machine);
        ``device``: also that --device is here (``resume`` checks a job's options without them first)."""
        from lowmem_ft.data import FORMAT_NAMES

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        # inf and nan pass every range check below (nan compares false to everything, inf is > 0),
        # and train a model into NaN that the job then marks done.
        for name, value in self.option_values().items():
            if isinstance(value, float) and not math.isfinite(value):
                need(False, f"{flag(name)} must be a finite number, got {value}")
        # Sizes are read only on the device they apply to: check them wherever they are given.
        from lowmem_ft.sizes import parse_size

        for given_as, size in (("--gpu-mem", self.gpu_mem), ("--cpu-mem", self.cpu_mem)):
            if size is not None:
                parse_size(size, given_as)

        need(
            self.method in METHOD_NAMES,
            f"--method {self.method!r} is not known; choose one of: {', '.join(METHOD_NAMES)}",
        )
        self.method_options.validate()  # the method's own options (its options.py)
        need(
            self.format == "auto" or self.format in FORMAT_NAMES,
            f"--format {self.format!r} is not known; choose auto or one of: {', '.join(FORMAT_NAMES)}",
        )
        need(self.seq_len >= 8, f"--seq-len must be at least 8 tokens, got {self.seq_len}")
        from lowmem_ft.data.records import utf8_encodable

        for given_as, path in (("DATA", self.data), ("--eval-data", self.eval_data), ("--out", self.out)):
            # A name that is not UTF-8 trained to the end and then failed writing the job's records.
            need(
                path is None or utf8_encodable(str(path)),
                f"{given_as} {str(path)!r} is not a UTF-8 name; the job's records are UTF-8 JSON: rename it",
            )
        need(seed_in_range(self.seed), f"--seed must be {SEED_RANGE}, got {self.seed}")
        need(0.0 <= self.eval_fraction < 1.0, f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        need(
            self.eval_every >= 0,
            f"--eval-every must be >= 0 (0 = only at start and end), got {self.eval_every}",
        )
        need(
            self.max_eval_examples >= 0,
            f"--max-eval-examples must be >= 0 (0 = every held-out example), got {self.max_eval_examples}",
        )
        need(self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(
            self.schedule in SCHEDULES,
            f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}",
        )
        need(0.0 <= self.warmup_ratio < 1.0, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        if self.micro_batch_size is not None:  # None: the planner chooses
            need(
                self.micro_batch_size >= 1,
                f"--micro-batch-size must be at least 1, got {self.micro_batch_size}",
            )
        need(
            self.micro_batch_size is None or self.micro_batch_size <= self.batch_size,
            f"--micro-batch-size ({self.micro_batch_size}) cannot exceed --batch-size ({self.batch_size})",
        )
        need(
            self.optimizer in OPTIMIZERS,
            f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
        )
        need(
            not self.streams_every_layer or self.gradient_checkpointing is not False,
            "--stream needs activation checkpointing (a streamed layer is rebuilt in the backward); "
            "drop --no-gradient-checkpointing",
        )
        # (--max-steps decides the length when given: --epochs is then not read, as its help says)
        need(self.epochs > 0 or self.max_steps is not None, f"--epochs must be positive, got {self.epochs}")
        need(
            self.max_steps is None or self.max_steps >= 1,
            f"--max-steps must be at least 1, got {self.max_steps}",
        )
        for option, value in (("--dtype", self.dtype), ("--save-dtype", self.save_dtype)):
            problem = precision_problem(option, value)
            need(problem is None, problem)
        problem = device_problem(self.device) if device else None
        need(problem is None, problem)
        from lowmem_ft.distributed.ranks import nproc_problem

        streams = self.streams_every_layer or bool(self.streamed_layers)
        gpus = _gpu_count() if count_gpus and self.device != "cpu" and self.nproc > 1 else None
        state_policy = getattr(self.method_options, "state_policy", None)  # HiFT's
        problem = nproc_problem(
            self.nproc, self.method, streams, self.batch_size, gpus, state_policy, self.micro_batch_size
        )
        need(problem is None, problem)
        if data_files:
            self._validate_data_files(need)
        need(
            self.save_every >= 0, f"--save-every must be >= 0 steps (0 = by time only), got {self.save_every}"
        )
        need(
            self.save_every_minutes >= 0,
            f"--save-every-minutes must be >= 0 (0 = by steps only), got {self.save_every_minutes}",
        )
        need(
            self.keep_checkpoints >= 1,
            f"--keep-checkpoints must be at least 1 (the newest is always kept), got {self.keep_checkpoints}",
        )
        need(self.max_bad_steps >= 1, f"--max-bad-steps must be at least 1, got {self.max_bad_steps}")
        need(
            self.chat_date is None or _iso_date(self.chat_date),
            f"job.json: chat_date {self.chat_date!r} is not a date",
        )
        from lowmem_ft.metric_logs import log_problem

        problem = log_problem(self.log)
        need(problem is None, problem)

    def _validate_data_files(self, need) -> None:
        from lowmem_ft.data.sources import data_path_problem  # imports neither torch nor datasets

        for path in (self.data, self.eval_data):
            if path is not None:
                problem = data_path_problem(path)
                need(
                    problem is None,
                    f"{problem}" + (" (given as --eval-data)" if path is self.eval_data else ""),
                )

    # -- derived values -------------------------------------------------------------------------
    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def compute_dtype(self) -> torch.dtype:
        """The precision the forward and backward run in (devices.compute_dtype)."""
        return compute_dtype(self.dtype, self.resolved_device())

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.option_values().items()}

    @classmethod
    def from_json(cls, saved: dict, where: Path | str = "job.json") -> RunConfig:
        """The configuration a job directory recorded (options added since then take defaults).
        A value of the wrong type (job.json edited by hand) is refused naming it and ``where`` it
        is, before any code compares it with a number."""
        method = saved.get("method", "full")
        own = options_class(method) if method in METHOD_NAMES else None
        option_types = {**_COMMON_TYPES, **(typing.get_type_hints(own) if own else {})}
        values = {k: v for k, v in saved.items() if k in option_types}
        for key, value in values.items():
            if (expected := _json_type_problem(value, option_types[key])) is not None:
                raise UserError(
                    f'{where}: "{key}" is {json.dumps(value)}, where {expected} belongs (was it edited?); '
                    "put such a value back, or start a new job with `lowmem-ft run`"
                )
        for key in ("data", "eval_data", "out"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return cls.create(**values)


def _gpu_count() -> int | None:
    """GPUs the ranks would run on (None: none, so the ranks run on CPU with gloo). torch counts
    them without initialising CUDA in this process, which the ranks could then not fork from."""
    import torch

    return torch.cuda.device_count() or None


def default_lr(method: str, params: int) -> float:
    """The learning rate a run gets without --lr: full fine-tuning's 2e-5 at 7B parameters (the
    usual value for Llama-2-7B), larger for smaller models in proportion to 1/sqrt(parameters)
    (narrower models take larger steps), between 1e-5 and 1e-3; times the method's ``lr_factor``
    (10 for the methods that train a small part of the model: LoRA's usual 2e-4 at 7B), at most 1e-2."""
    full = min(max(2e-5 * math.sqrt(7e9 / max(params, 1)), 1e-5), 1e-3)
    return float(f"{min(full * METHOD_SPECS[method].lr_factor, 1e-2):.2g}")  # 7.2e-4, not 7.19...e-4


# The options every run has (the method's own are in its options class)
_COMMON = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name != "method_options")
_COMMON_TYPES = {
    name: kind
    for name, kind in typing.get_type_hints(RunConfig, localns={"MethodOptions": object}).items()
    if name in _COMMON
}
_JSON_NAMES = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "a string",
    Path: "a path",
}


def _json_type_problem(value: object, kind: object) -> str | None:
    """What belongs where a job.json value of option type ``kind`` (``int``, ``float | None``, ...)
    is, if ``value`` (as JSON read it) is not that; None if it is."""
    kinds = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    for one in kinds:
        if (
            (one is type(None) and value is None)
            or (one is bool and isinstance(value, bool))
            or (one is int and isinstance(value, int) and not isinstance(value, bool))
            or (one is float and isinstance(value, int | float) and not isinstance(value, bool))
            or (one in (str, Path) and isinstance(value, str))
        ):
            return None
    names = [_JSON_NAMES[one] for one in kinds if one in _JSON_NAMES]
    return " or ".join(names + (["null"] if type(None) in kinds else []))


def _iso_date(text: object) -> bool:
    from datetime import date

    try:
        date.fromisoformat(text)
    except (TypeError, ValueError):
        return False
    return True
