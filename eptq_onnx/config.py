"""The one configuration object of a quantization run, and of calibration-data reading."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple

from eptq_onnx.errors import UsageError
from eptq_onnx.plan.overrides import Override, parse_overrides
from eptq_onnx.plan.targets import ACT_TYPE_NAMES, DEFAULT_TARGET, get_target

CalibMethod = Literal["minmax", "percentile", "mse"]
WeightInit = Literal["output-mse", "mse", "minmax"]
WeightRounding = Literal["gptq", "nearest"]
Weighting = Literal["lfh", "uniform"]
HessianDistribution = Literal["gaussian", "rademacher"]
HessianTrace = Literal["channel", "element"]
RoundingStart = Literal["init", "float"]
WeightStorage = Literal["native", "int8"]
Layout = Literal["nchw", "nhwc"]
SensitivityMetric = Literal["lfh", "output"]
BitSearch = Literal["ilp", "lfh-rank"]

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
SUPPORTED_ACT_BITS = (8, 16)


@dataclass(frozen=True)
class ImageOptions:
    """How image files of a calibration folder become input tensors.

    pixel -> (pixel * scale - mean) / std, per channel, resized to ``size`` (H, W).
    """

    size: Optional[Tuple[int, int]] = None
    mean: Tuple[float, ...] = (0.0, 0.0, 0.0)
    std: Tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    layout: Layout = "nchw"
    bgr: bool = False


@dataclass(frozen=True)
class CalibOptions:
    """Where calibration samples come from and how many are used."""

    num_samples: Optional[int] = None  # None: every sample in the folder, at most DEFAULT_MAX_SAMPLES
    batch_size: int = 16
    image: ImageOptions = field(default_factory=ImageOptions)


DEFAULT_MAX_SAMPLES = 1024


@dataclass(frozen=True)
class OptimizeOptions:
    """Settings of the EPTQ optimization (defaults: the paper's, Appendix A.2, where they fit).

    ``iters`` 0 skips the optimization (the MSE-initialized model); None picks as many steps as
    fit ``time_budget_min`` (at most ``max_iters``): minutes for the whole run, counted from its
    start, 10% kept for validation and writing. ``weighting``: ``lfh`` (Label-Free Hessian,
    the paper) or ``uniform`` (Table 1 ablation). ``hessian_trace``: ``channel`` sums the Hutchinson
    gradient over each tensor's position axes before squaring (errors equal across a channel's
    positions, as rounded weights make them; our deviation, docs/design.md) or ``element`` (the paper's
    trace: independent errors). ``rounding_start``: ``init`` starts every rounding variable next to the
    initialized codes (GPTQ's, or the nearest), our deviation (docs/design.md), or ``float`` from the
    fractional part of w / s (the paper).
    """

    iters: Optional[int] = None  # None: as many as fit time_budget_min, at most max_iters
    time_budget_min: float = 15.0  # the whole run (issue: a ~10 MB CNN in about 15 min on 2 cores)
    max_iters: int = 20000  # the paper's lower end (20K-80K)
    batch_size: int = 32  # lowered where a step at this batch would not fit max_memory_gb (eptq/memory.py)
    max_memory_gb: Optional[float] = None  # what a training step may hold; None: eptq/memory.fit_batch's default
    lr_rounding: float = 3e-2
    lr_bias: float = 1e-3
    lr_scale: float = 1e-3
    # The regularizer is averaged over each layer's rounding variables, then over the layers, and
    # the reconstruction divided by its initial value, so lambda does not depend on model size;
    # 1000 decides every rounding variable within 2000 steps on the bench models (paper: 0.01 on
    # sums, 20K+ steps), and within 500 with the settle phase below (the report warns where some are left).
    reg_lambda: float = 1000.0
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    # beta reaches beta_end settle_steps before the last step (but not before anneal_end of the
    # steps) and stays there while the rounding settles: AdaRound anneals to the last step, which
    # in 500-step runs left 10% of the demo's rounding variables undecided at W3 and the written
    # model below the MSE init; RAdam moves V by ~lr per step, so settling takes ~100 steps (docs/design.md)
    settle_steps: int = 100
    anneal_end: float = 0.8
    rounding_start: RoundingStart = "init"  # deviation from the paper ("float"): docs/design.md
    learn_weight_scales: bool = False  # learned step multipliers hurt in short runs (docs/design.md)
    learn_act_scales: bool = False
    learn_biases: bool = True
    # discard the optimized state when its outputs score below the initialized model's on the
    # check samples (calibration files held out of the optimization; short runs can end there), with a FALLBACK warning
    discard_if_worse: bool = True
    checkpoint_dir: Optional[str] = None  # save / resume the optimization here (--checkpoint)
    checkpoint_every_s: float = 300.0
    device: str = "cpu"
    seed: int = 0
    weighting: Weighting = "lfh"
    hessian_samples: int = 16
    hessian_draws: int = 50
    hessian_distribution: HessianDistribution = "gaussian"
    hessian_trace: HessianTrace = "channel"  # deviation from the paper ("element"): docs/design.md


@dataclass(frozen=True)
class MixedPrecisionOptions:
    """Bit-width search over ``bit_options`` under one weight-memory budget (paper Appendix D).

    Budget: ``weight_memory`` (bytes, or "NN%" of the float32 weight bytes) or ``avg_weight_bits``.
    ``metric``: sensitivity as the LFH-weighted activation distance or the plain output distance,
    on ``samples`` calibration samples. ``pairwise``: add the interaction terms of neighbouring
    layers to the ILP. ``search``: ``ilp`` (paper) or ``lfh-rank`` (widest bits to the layers of
    largest Label-Free Hessian first; a baseline).
    """

    bit_options: Tuple[int, ...] = (2, 4, 8)
    weight_memory: Optional[str] = None
    avg_weight_bits: Optional[float] = None
    metric: SensitivityMetric = "lfh"
    samples: int = 32
    pairwise: bool = False
    time_limit_s: float = 60.0
    search: BitSearch = "ilp"

    def __post_init__(self) -> None:
        bad = [b for b in self.bit_options if b not in SUPPORTED_WEIGHT_BITS]
        if bad or len(set(self.bit_options)) < 2:
            raise UsageError(
                f"--bit-options {','.join(map(str, self.bit_options))}: give at least two distinct widths from "
                f"{', '.join(map(str, SUPPORTED_WEIGHT_BITS))}, e.g. 2,4,8"
            )
        if (self.weight_memory is None) == (self.avg_weight_bits is None):
            raise UsageError("--mixed-precision needs exactly one budget: --weight-memory BYTES|NN% or --avg-weight-bits B")
        if self.samples < 1 or self.time_limit_s <= 0:
            raise UsageError("--sensitivity-samples must be at least 1 and --ilp-time-limit positive")


@dataclass(frozen=True)
class QuantConfig:
    """Every setting of a quantization run (the CLI options map onto these fields one to one)."""

    weight_bits: int = 4
    act_bits: int = 8
    act_symmetric: bool = False
    calib_method: CalibMethod = "mse"
    weight_init: WeightInit = "output-mse"
    weight_rounding: WeightRounding = "gptq"  # codes at the init's steps: GPTQ on the layer inputs, or nearest
    # 8-bit activation points whose grid leaves a reading layer's output below this SQNR (dB) take 16 bits
    # where the target reads them (calib/wide_acts.py); 0: never
    act16_below: float = 30.0
    # depthwise Convs whose input channels span ranges far apart read them rescaled to one range, exact in
    # float (graph/equalize.py)
    equalize: bool = True
    # 8-bit weights whose codes leave a reading layer's output below this SQNR (dB) stay float, with their
    # readers (init/float_weights.py); 0: never
    float_weights_below: float = 36.0
    percentile: float = 99.99
    weight_storage: WeightStorage = "native"
    quantize_outputs: bool = False
    quantize_bias: bool = True
    bias_correction: bool = True  # empirical bias correction after weight init (init/bias_correction.py)
    calib: CalibOptions = field(default_factory=CalibOptions)
    validation_samples: int = 64
    measure_latency: bool = True  # onnxruntime CPU latency of the float and the written model, in the report
    optimize: OptimizeOptions = field(default_factory=OptimizeOptions)
    mixed: Optional[MixedPrecisionOptions] = None  # None: every weight at weight_bits
    target: str = DEFAULT_TARGET  # deployment profile (targets.py): ort-cpu, trt, qnn, generic
    # the target's 7-bit range for 8-bit U8S8 weights (targets.with_reduce_range); None: where
    # onnxruntime on this machine needs it (plan/u8s8_probe.py)
    reduce_range: Optional[bool] = None
    # nodes kept float (plan/exclusions.py): node or output tensor names, regexes over them, op:TYPE
    exclude: Tuple[str, ...] = ()
    # per-tensor or per-node settings of the user (plan/overrides.py, --overrides FILE)
    overrides: Tuple[Override, ...] = ()
    # fidelity target (fidelity/target.py): the held-out output SQNR (dB) that nodes are left float for
    min_sqnr: Optional[float] = None
    strict: bool = False  # a fidelity target not reached is an error (exit 6, no model written)

    def __post_init__(self) -> None:
        if self.weight_bits not in SUPPORTED_WEIGHT_BITS:
            raise UsageError(
                f"--weight-bits {self.weight_bits} is not supported: choose one of "
                f"{', '.join(map(str, SUPPORTED_WEIGHT_BITS))}"
            )
        if self.act_bits not in SUPPORTED_ACT_BITS:
            raise UsageError(
                f"--act-bits {self.act_bits} is not supported: choose one of "
                f"{', '.join(map(str, SUPPORTED_ACT_BITS))}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"--percentile {self.percentile} must lie in (50, 100]")
        if self.optimize.iters is not None and self.optimize.iters < 0:
            raise UsageError(f"--iters {self.optimize.iters} must be 0 (no optimization) or more")
        if self.optimize.time_budget_min <= 0:
            raise UsageError(f"--time-budget {self.optimize.time_budget_min} must be positive (minutes)")
        if not 0.0 <= self.optimize.warmup < self.optimize.anneal_end <= 1.0 or self.optimize.settle_steps < 0:
            raise UsageError(f"OptimizeOptions: need 0 <= warmup ({self.optimize.warmup}) < anneal_end "
                             f"({self.optimize.anneal_end}) <= 1 and settle_steps ({self.optimize.settle_steps}) >= 0")
        if self.optimize.hessian_samples < 1 or self.optimize.hessian_draws < 1:
            raise UsageError("--hessian-samples and --hessian-draws must be at least 1")
        if self.optimize.rounding_start not in ("init", "float"):
            raise UsageError(f"--rounding-start {self.optimize.rounding_start!r}: choose init or float")
        if self.optimize.hessian_trace not in ("channel", "element"):
            raise UsageError(f"--hessian-trace {self.optimize.hessian_trace!r}: choose channel or element")
        if self.calib.num_samples is not None and self.calib.num_samples < 1:
            raise UsageError(f"--num-calib {self.calib.num_samples} must be at least 1")
        if not 0.0 <= self.act16_below < 200.0:
            raise UsageError(f"--act16-below {self.act16_below}: give a layer-output SQNR in dB (e.g. 25), or 0 for never")
        if not 0.0 <= self.float_weights_below < 200.0:
            raise UsageError(f"--float-weights-below {self.float_weights_below}: give a layer-output SQNR in dB "
                             "(e.g. 25), or 0 for never")
        if self.min_sqnr is not None and not -100.0 < self.min_sqnr < 200.0:
            raise UsageError(f"--min-sqnr {self.min_sqnr}: give the output SQNR target in dB, e.g. 30")
        if self.strict and self.min_sqnr is None:
            raise UsageError("--strict makes a missed --min-sqnr target an error: give --min-sqnr DB too")
        self._check_target()
        self._check_exclude()

    def _check_exclude(self) -> None:
        """``exclude`` as a tuple of non-empty strings (a list or one string is accepted)."""
        patterns = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        if not all(isinstance(p, str) and p for p in patterns):
            raise UsageError(f"--exclude {list(patterns)!r}: give non-empty names, regular expressions or op:TYPE")
        object.__setattr__(self, "exclude", patterns)  # frozen dataclass
        if isinstance(self.overrides, dict):  # the Python API may give the file's JSON object as it is
            object.__setattr__(self, "overrides", parse_overrides(self.overrides))
        object.__setattr__(self, "overrides", tuple(self.overrides))

    def _check_target(self) -> None:
        """The activation coding and options must be ones the target reads; a target with only
        signed activations (trt) makes them symmetric."""
        target = get_target(self.target)
        wanted = (self.act_bits, self.act_symmetric)
        if wanted not in target.act_types and (self.act_bits, True) in target.act_types and not self.act_symmetric:
            object.__setattr__(self, "act_symmetric", True)  # frozen dataclass: the target's coding
        elif wanted not in target.act_types:
            names = ", ".join(ACT_TYPE_NAMES[t] for t in target.act_types)
            raise UsageError(
                f"--target {target.name} reads activations as {names}, not {ACT_TYPE_NAMES[wanted]}: "
                "change --act-bits/--act-symmetric or choose --target generic"
            )
        if target.per_channel_ops is not None and self.optimize.learn_weight_scales:
            raise UsageError(
                f"--learn-weight-scales learns per-channel steps, but --target {target.name} needs per-tensor "
                "MatMul/Gemm weights: drop --learn-weight-scales or choose another target"
            )
