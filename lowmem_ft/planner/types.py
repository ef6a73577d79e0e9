"""The planner's data model: what is asked (PlanRequest), what one configuration costs at each
moment of a step (Estimate), and the answer (Plan, its Components); the constants every estimate
shares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from lowmem_ft.planner.accounting import GiB
from lowmem_ft.planner.sharding import GATHERED_BY_MOMENT
from lowmem_ft.registry import options_class

if TYPE_CHECKING:
    from lowmem_ft.methods.options import MethodOptions

WIDTH_NAMES = {2: "bf16", 4: "fp32"}  # a weight's bytes per value, as the plan names its precision
# CUDA context, cuBLAS(Lt) workspaces, SDPA and bitsandbytes kernels: outside the allocator, seen by
# NVML; 0.6-1.0 GiB on H100-class cards. Not measured here: `run` measures the real one before step 1.
CUDA_CONTEXT_BYTES = GiB
# Less than this to spare is a bet on the context and the allocator's fragmentation: the plan says so.
THIN_SPARE_BYTES = GiB // 2
ALLOCATOR_MARGIN = 0.05  # fragmentation of the caching allocator, as a fraction of the tensor peak
HOST_RUNTIME_BYTES = {True: 3 * GiB, False: 1 * GiB}  # Python + torch (+ CUDA libraries when on a GPU)
ASSUMED_LINK_BYTES_PER_S = 25e9  # PCIe Gen4 x16 in practice, when NVML cannot tell
# Sustained bf16 training throughput assumed to compare streaming with compute: well below the
# peak of a current data-centre GPU, above a consumer card's. An assumption, and said to be one.
ASSUMED_FLOPS = 100e12
# FLOPs per parameter and token of a step's compute, averaged over a HiFT cycle: forward 2, the
# recompute and input gradients of the layers above the active group (half the model on average)
# 2 + 2 halved. SIFT rebuilds, back-propagates and forms a dense weight gradient in every layer.
FLOPS_PER_PARAM_TOKEN = {"hift": 4, "sparse": 8}
STREAM_BUFFERS = 2  # engine/streaming.py: one buffer computing, one arriving
# The loop's small tensors: AdamW's step counters, gradient norms, losses, scalars of the schedule
# (hundreds of bytes in the traces: a HiFT drop plan at 24 GiB was 626 bytes under without them).
SMALL_TENSORS_BYTES = 1 << 20


@dataclass
class PlanRequest:
    """What the user asked for; ``None`` means "the planner chooses"."""

    method: str = "full"
    seq_len: int = 512
    batch_size: int = 16
    compute_bytes: int = 2
    micro_batch_size: int | None = None
    gradient_checkpointing: bool | None = None
    # the method's own options (its package's options.py); None: the method's defaults
    options: MethodOptions | None = None
    on_gpu: bool = True  # planned for a GPU, or for the CPU (make_plan sets it from the budget)
    # Ranks the job runs on (--nproc): the plan is one rank's, ``batch_size`` stays the global batch
    ranks: int = 1

    @property
    def rank_batch_size(self) -> int:
        """Each rank's slice of every global batch."""
        return self.batch_size // self.ranks

    def __post_init__(self):
        if self.options is None:
            self.options = options_class(self.method)()

    @classmethod
    def create(cls, method: str = "full", **values) -> PlanRequest:
        """A request with the method's options given by name among the others."""
        options = options_class(method)
        mine = {name: values.pop(name) for name in options.names() if name in values}
        return cls(method, **values, options=options(**mine))

    def with_options(self, **changes) -> PlanRequest:
        """The same request with some of the method's options changed."""
        return replace(self, options=replace(self.options, **changes))


@dataclass
class Component:
    name: str
    gpu_bytes: int = 0
    host_bytes: int = 0
    note: str = ""


@dataclass(frozen=True)
class Execution:
    """How the plan cuts and runs a step. A job resumed on another machine plans it again; what
    trains (``Plan.method_options``) it keeps."""

    micro_batch_size: int
    gradient_checkpointing: bool
    gradient_accumulation: int  # micro-batches per optimizer step, on each rank
    batch_size: int  # examples per optimizer step, over every rank
    ranks: int = 1
    # units whose frozen weights live in host memory, copied in to compute (None: the method
    # never streams)
    streamed_units: int | None = None

    def settings(self) -> dict:
        """The flat form `plan` prints after the method's own choices."""
        streamed = {} if self.streamed_units is None else {"streamed_units": self.streamed_units}
        return {
            **streamed,
            "micro_batch_size": self.micro_batch_size,
            "gradient_checkpointing": self.gradient_checkpointing,
            "gradient_accumulation": self.gradient_accumulation,
            "batch_size": self.batch_size,
            **({"ranks": self.ranks} if self.ranks > 1 else {}),
        }


@dataclass
class MethodPlan:
    """What a method's own planner (its package's plan.py) chose, for ``make_plan`` to total."""

    estimate: Estimate  # its best configuration's bytes (or, where none fits, its smallest)
    chosen: dict  # values for the method's planned options (option name: value); make_plan fills
    # those the user left open into Plan.method_options
    execution: Execution  # how a step is cut and run
    load_bytes: int  # host bytes that loading the model takes
    notes: list[str] = field(default_factory=list)
    derived: dict = field(default_factory=dict)  # what the choices come to, shown after them
    # (HiFT's number of groups and resident units); nothing reads them back


@dataclass
class Plan:
    fits: bool
    method: str
    device: str  # "cuda" or "cpu"
    # Every choice, flat: the method's own (MethodPlan's ``chosen`` and ``derived``), then
    # ``execution``'s. What `plan` prints and plan.json's "settings"; the recipe reads the two typed
    # views below.
    settings: dict
    execution: Execution
    # The method's options with what the planner chose for those left open (None) filled in
    method_options: MethodOptions
    components: list[Component]
    gpu_budget_bytes: int
    gpu_peak_bytes: int
    host_budget_bytes: int
    host_peak_bytes: int
    trainable_params: int
    total_params: int
    traffic_bytes_per_step: int
    link_bytes_per_s: float
    stream_seconds_per_micro_batch: float | None = None  # copying the streamed layers in
    compute_seconds_per_micro_batch: float | None = None  # at ASSUMED_FLOPS
    shortfall: str | None = None
    notes: list[str] = field(default_factory=list)
    peak_phase: str = ""  # where in the step the GPU peak is, e.g. "end of forward, HiFT group embed"
    ranks: int = 1  # --nproc: GPU bytes are one rank's, host bytes the node's (every rank's process)
    # Data-parallel ranks that load the model at the same time (host copies at once); the others
    # wait their turn. All of them where loading needs no turns (Fitter.loads_at_once).
    loads_at_once: int = 1

    @property
    def thin_spare_note(self) -> str | None:
        """A plan that fits with under THIN_SPARE_BYTES of the GPU to spare is a bet on constants
        not measured on this GPU; said after the plan, and in its JSON notes."""
        if (
            not self.fits
            or self.device != "cuda"
            or self.gpu_budget_bytes - self.gpu_peak_bytes >= THIN_SPARE_BYTES
        ):
            return None
        return (
            f"under {THIN_SPARE_BYTES // 2**20} MiB to spare on the GPU: a bet on the CUDA context and the "
            "allocator's fragmentation (run checks the real context before step 1)"
        )

    def to_json(self) -> dict:
        data = asdict(self)
        data["notes"] = self.notes + ([self.thin_spare_note] if self.thin_spare_note else [])
        data["gpu"] = {"budget_bytes": self.gpu_budget_bytes, "peak_bytes": self.gpu_peak_bytes}
        data["host"] = {"budget_bytes": self.host_budget_bytes, "peak_bytes": self.host_peak_bytes}
        for key in ("gpu_budget_bytes", "gpu_peak_bytes", "host_budget_bytes", "host_peak_bytes"):
            del data[key]
        return data


# -- accounting per method ------------------------------------------------------------------------
@dataclass
class Estimate:
    components: list[Component]
    persistent: int  # on the compute device for the whole step
    activations: int
    loss_transient: int
    logits_grad: int
    grads: int
    backward_extra: int  # autocast copies and a rebuilt layer at the end of backward
    traffic: int = 0
    trainable: int = 0
    streamed_per_micro_batch: int = 0  # bytes of streamed weights copied in per micro-batch
    end_step_extra: int = 0  # temporaries of the end of the step (gradients are freed by then)
    made_by_update: int = 0  # made by the optimizer step and alive to the end of it (HiFT drop)
    selection: int = 0  # SIFT: device bytes while the selection window is scored (0: no selection)
    label: str = ""  # which configuration this is (HiFT: the group), for the peak's description
    # Several micro-batches per step: from the second on, the gradients summed so far are alive
    # through its forward and backward.
    accumulating: bool = False
    # HiFT, a group that trains the LM head: bytes beside the activations (and any summed gradients)
    # when the head's weight gradient is made, at the very start of backward (0: no such moment).
    head_gradient: int = 0
    # What of ``grads`` is summed across micro-batches (None: all of it). Sharded, the gradients a
    # layer makes in full are reduce-scattered into the shards, which alone carry the sum.
    summed_grads: int | None = None
    # Between steps, evaluation's forwards (no gradients) beside what persists, and state made by the
    # update: the loss's vocabulary-sized tensors (accounting.evaluation_bytes). 0: not counted.
    evaluation: int = 0
    # Several ranks: at the start of each forward, the root's all-gather buffer beside its gathered
    # weights (planner/sharding.py), and the gradients summed so far. 0: no such moment.
    root_regather: int = 0
    # Several ranks: ``persistent`` holds the root's weights (``gathered_root``) and two decoder
    # layers' (``gathered_layer`` each) gathered beside the shards, which some moments have fewer of
    # (sharding.GATHERED_BY_MOMENT).
    gathered_root: int = 0
    gathered_layer: int = 0
    # Several ranks: while the backward runs through the decoder layers, what is alive beside what
    # persists and the summed gradients (sharding.layers_backward_bytes). 0: no such moment.
    layers_backward: int = 0
    # ... and while the forward runs through them, the top layer's weights gathered beside the
    # layer below's all-gather buffer (sharding.layers_forward_bytes). 0: no such moment.
    layers_forward: int = 0

    def moments(self) -> dict[str, int]:
        """Device bytes at the moments of a step that can be its peak."""
        moments = self._moments()
        if self.gathered_root or self.gathered_layer:
            for moment, (root, layers) in GATHERED_BY_MOMENT.items():
                if moment in moments:
                    moments[moment] -= (1 - root) * self.gathered_root + (2 - layers) * self.gathered_layer
        return moments

    def _moments(self) -> dict[str, int]:
        summed = (self.grads if self.summed_grads is None else self.summed_grads) if self.accumulating else 0
        return (
            {
                "end of forward": self.persistent + summed + self.activations + self.loss_transient,
                "start of backward": self.persistent + summed + self.activations + self.logits_grad,
                "end of backward": self.persistent + self.grads + self.backward_extra,
                # (fused AdamW, methods/optimizers.py: no scratch copies of the moments)
                "optimizer step": self.persistent + self.grads + self.made_by_update,
                "end of step": self.persistent + self.end_step_extra + self.made_by_update,
            }
            | ({"selection": self.selection} if self.selection else {})
            | (
                {"start of forward": self.persistent + summed + self.root_regather}
                if self.root_regather
                else {}
            )
            | (
                {"evaluation": self.persistent + self.made_by_update + self.evaluation}
                if self.evaluation
                else {}
            )
            | (
                {"head's gradient": self.persistent + summed + self.activations + self.head_gradient}
                if self.head_gradient
                else {}
            )
            | (
                {"decoder layers' backward": self.persistent + summed + self.layers_backward}
                if self.layers_backward
                else {}
            )
            | (
                {"decoder layers' forward": self.persistent + summed + self.layers_forward}
                if self.layers_forward
                else {}
            )
        )

    def device_peak(self) -> int:
        return max(self.moments().values())

    def peak_phase(self) -> str:
        moments = self.moments()
        moment = max(moments, key=moments.get)
        return f"{moment}, {self.label}" if self.label else moment
