"""What an unlearning run is asked to do: its inputs and its hyper-parameters."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from worker.engine.errors import ConfigError
from worker.engine.images import ReadLimits
from worker.engine.methods import METHODS, Method

DEVICES = ("auto", "cpu", "cuda")
ADAPTER_BLOCKS = ("all", "later-half")
FEATURE_PROTOTYPES = ("synthetic", "head")
PRECISIONS = ("auto", "fp32", "bf16")
MAX_ANCHOR_WEIGHT = 1e3  # the anchor term against the forget term: beyond this it only overflows the loss
MAX_CONFIRM_VIEWS = 64  # views are kept for the whole run: N times the forget set's tokens


@dataclass(frozen=True)
class ForgetSpec:
    """One class to forget and the images of it (its forget set)."""

    class_name: str
    source: str  # path or file:// URI of a directory, archive or manifest
    # Further sets of the same class (several requests to forget one person): trained on together,
    # each image counted once per set that holds it.
    more_sources: tuple[str, ...] = ()

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source, *self.more_sources)


@dataclass(frozen=True)
class UnlearnInputs:
    """Where the run reads from. Kept apart from the config so that lineage records no local paths."""

    model: str  # model package folder
    forget: tuple[ForgetSpec, ...]
    eval_source: str | None = None  # labelled held-out validation split (not training data)
    retain_source: str | None = None  # labelled retain images, for the methods that use them
    # Unlabelled images of none of the model's classes (e.g. CIFAR-10 for a face model): the run
    # holds the original's outputs on them in place. Not retain data: nothing of the training set.
    anchor_source: str | None = None
    read_limits: ReadLimits = ReadLimits()  # what each source may hold

    def __post_init__(self) -> None:
        if not self.forget:
            raise ConfigError("give at least one class to forget")
        names = [f.class_name for f in self.forget]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"class given more than once: {', '.join(duplicates)}")


@dataclass(frozen=True)
class UnlearnConfig:
    """Hyper-parameters of one run. Defaults are the paper's (ViT-Tiny)."""

    method: str = "lora-bounded"
    seed: int = 0
    lr: float | None = None  # None: the method's default (METHODS[...].default_lr)
    l1_weight: float = 1e-3  # lambda on the L1 regulariser
    rank: int = 8  # LoRA rank r; alpha = r, so the merged update is exactly B @ A
    targets: tuple[str, ...] = ("qkv",)  # layers that get adapters: a last name ("qkv") or a full one ("blocks.5.attn.qkv")
    adapter_blocks: str = "all"  # "later-half": only the targets in the later half of the blocks (any depth)
    batch_size: int = 256  # per forgotten class, or the whole forget set when smaller
    max_steps: int = 100  # give up here; the report then says the target was not met
    target_forget_acc: float = 1.0  # percent; stop when every forget set is at or below it
    select_on_eval: bool = False  # the paper's early stopping on a held-out split
    # Cut the evaluation set in two by its images' content (halves.py): the checkpoint is selected on
    # one half, reported (and gated) on the other. False: the paper's set-up, one set for both.
    eval_halves: bool = False
    eval_every: int = 1  # steps between evaluations when selecting on the eval split
    patience: int = 5  # evaluations without improvement (after the first that meets the target)
    skip_bad_images: bool = False  # skip and count undecodable files instead of failing
    device: str = "auto"  # auto: CUDA when present
    precision: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32
    # Generalising from few images (benchmarks/README.md, the face and few-image tables):
    augment: bool = False  # train on a random view (crop, mirror, exposure) of each forget image at every step
    confirm_views: int = 0  # stop rule: this many fixed random views of each forget image must be forgotten too
    max_forget_prob: float = 1.0  # stop rule: an image is forgotten when not predicted and its class's probability is at most this
    # The masked-KL target's temperature on the forget images (and lora-adv's neighbours of them; the
    # anchor's target stays the original's own): 1, the original's distribution over the kept classes;
    # below 1, sharper toward the class it ranks next. Below 0.01 the target is the argmax already.
    # Measured, not a default (benchmarks/README.md, the oracle table).
    target_temperature: float = 1.0
    anchor_weight: float = 1.0  # weight of the KL to the original on the anchor images (inputs.anchor_source)
    # A retain-free feature term (0: off; benchmarks/README.md, the oracle table): each forget
    # image's pre-logit feature pulled toward the class the original ranks first after the forgotten
    # ones, that class's prototype being the original's mean feature of inputs synthesised from the
    # original alone (model inversion). It aims at what a logit-level loss leaves in the features:
    # a linear probe still finds the class, and fine-tuning gives it back.
    feature_weight: float = 0.0
    # Where the feature term's prototypes come from: "synthetic", the original's features of inputs
    # synthesised from it (model inversion, 200 Adam steps through the whole model); "head", the
    # class's head row at the image's own feature norm, nothing synthesised: as good as its rows are
    # templates of their classes (benchmarks/README.md, the oracle table: on the digits, not CIFAR-10).
    feature_prototypes: str = "synthetic"
    # With "head": the rows stand for their classes only where they are their classes' templates,
    # checked on the one class whose images a run has: each forgotten class's row against its forget
    # images' mean feature on the original (cosine: 0.99 on the digits model's 3, 5 and 8; 0.61-0.77 on
    # the CIFAR-10 reference's ten classes, their first 500 training images). Below this the run goes
    # without the feature term, and its report says so (feature_term). -1: the rows are trusted as they are.
    head_template_cosine: float = 0.9
    # Stop rule with the feature term: the forget sets' feature loss (relative to the original's, 1)
    # must also be at most this. 1: the forget target alone decides.
    feature_tol: float = 1.0
    # Without an anchor source: the anchor is inputs synthesised from the original alone for each
    # class kept (model inversion, as for the feature term's prototypes; no image of any class), so
    # that a run moves the kept classes as little as it can without retain data.
    synthetic_anchor: bool = False
    # With synthetic_anchor: also synthesise, for each of those inputs, one toward an even mix of its
    # class and the kept class the original ranks next for it, so that the anchor holds the kept
    # classes' boundaries with each other, where a run's drift flips real images, not only their centres.
    boundary_anchor: bool = False
    # Also hold the anchor's pre-logit features where the original has them (squared drift over their
    # squared norm, times this): the kept classes' representation, which the feature term moves
    # when it moves the forgotten class's. 0: only the outputs are held (anchor_weight).
    anchor_feature_weight: float = 0.0
    # Class-direction erasure (0: off; benchmarks/README.md, the oracle table). NOT retain-free: the
    # evaluation set's selection half (eval_halves: the audit half, which the gate and the evidence
    # read, is never trained on, nor a near-copy of its photos) trains too, and so selects nothing.
    # Every erase_aim_every steps the current model's pre-logit features of the whole half give each
    # forgotten class's direction (its mean minus the kept classes') and the kept classes' level along
    # it (losses.class_direction); the term, times this, is each image's squared component along it
    # about that level, over a batch of the half's images and the forget batch, relative to the
    # original's. The kept classes' outputs on the half's images are held where the original puts
    # them (masked KL, times anchor_weight). Erased from a model's features once, that direction took
    # a probe's reading of a class most of the way to a retrained model's (benchmarks/probe_direction.py);
    # trained in, on CIFAR-10, it removes the class's mean offset and the probe still finds the class.
    erase_weight: float = 0.0
    # Stop rule with the erasure: the squared distance between each forgotten class's mean feature and
    # the kept classes' on the selection half, over the original's, must be at most this. 1: the
    # forget target alone decides.
    erase_tol: float = 1.0
    # The erasure aims (a pass over the whole selection half: 19 s for CIFAR-10's 2,500 images on 2
    # cores, 4x a step) before every this many updates, its directions held in between; its stop rule
    # is always judged on a fresh aim. 1: before every step.
    erase_aim_every: int = 5
    # After training, set the head row of every class forgotten (by this run and, from the card's
    # lineage, earlier ones) to the mean of the kept classes' rows (head.py): the class's template
    # leaves the weights, and its logit sits where a retrained model's does. The forget-set target
    # and the held-out Acc_f are then judged on the trained network before the reset, which alone
    # would meet them. False: the paper's method, whose head is left as it was.
    reset_head_rows: bool = False
    # The generalisation check: hold back a fold of each forget set, train on the rest, score the
    # held-back images; folds run until every class has had ``holdout_images`` held back (or all
    # ran). Then the run trains on every image. 0: no check.
    holdout_folds: int = 0
    holdout_images: int = 30  # 30 held-back images already tell 0 % from 10 %; more is another training
    # The generalisation check's folds and fold trainings, and the evidence's draws, come from this
    # seed (None: ``seed``). A caller that retries failed runs with new seeds fixes it, so that a
    # retry cannot draw checks (or evidence) until one passes.
    check_seed: int | None = None
    # Residual-knowledge evidence (evidence.py) on the evaluation set (its audit half with
    # ``eval_halves``), for the original and the new model: probe, loss-MIA, k-shot relearning.
    evidence: bool = False
    eval_batch_size: int = field(default=512, repr=False)
    # Run a frozen front (adapters only in later blocks) once instead of every step: the same
    # results, faster (prefix.py). False only to measure what it saves.
    cache_frozen_prefix: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        checks = [
            (self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "lr must be a positive number"),
            (math.isfinite(self.l1_weight) and self.l1_weight >= 0, "lambda (l1_weight) must be zero or positive"),
            (0 <= self.seed < 2**63, "seed must be in [0, 2**63)"),
            (self.check_seed is None or 0 <= self.check_seed < 2**63, "check_seed must be in [0, 2**63)"),
            (self.rank >= 1, "rank must be at least 1"),
            (bool(self.targets) and all(isinstance(t, str) and t for t in self.targets), "targets must name layers"),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be at least 1"),
            (self.max_steps >= 1, "max_steps must be at least 1"),
            (0.0 <= self.target_forget_acc <= 100.0, "target_forget_acc is a percentage in [0, 100]"),
            (self.eval_every >= 1 and self.patience >= 1, "eval_every and patience must be at least 1"),
            (self.adapter_blocks in ADAPTER_BLOCKS, f"adapter_blocks must be one of {ADAPTER_BLOCKS}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (0 <= self.confirm_views <= MAX_CONFIRM_VIEWS, f"confirm_views must be in [0, {MAX_CONFIRM_VIEWS}]"),
            (math.isfinite(self.target_temperature) and 0.01 <= self.target_temperature <= 100,
             "target_temperature must be in [0.01, 100]"),
            (self.target_temperature == 1.0 or (self.method_spec.forget is not None
                                                 and self.method_spec.forget.needs_teacher),
             "target_temperature is the masked-KL target's: it needs lora-kl or lora-adv"),
            (0.0 < self.max_forget_prob <= 1.0, "max_forget_prob is a probability in (0, 1]"),
            (math.isfinite(self.anchor_weight) and 0 < self.anchor_weight <= MAX_ANCHOR_WEIGHT,
             f"anchor_weight must be in (0, {MAX_ANCHOR_WEIGHT:g}]"),
            (math.isfinite(self.feature_weight) and self.feature_weight >= 0, "feature_weight must be zero or positive"),
            (math.isfinite(self.feature_tol) and 0 < self.feature_tol <= 1, "feature_tol must be in (0, 1]"),
            (self.feature_weight == 0 or (self.method_spec.adapters and self.method_spec.forget is not None
                                           and self.method_spec.forget.needs_teacher),
             "feature_weight needs an adapter method with a teacher-based forget term (lora-kl, lora-adv)"),
            (self.feature_prototypes in FEATURE_PROTOTYPES, f"feature_prototypes must be one of {FEATURE_PROTOTYPES}"),
            (self.feature_prototypes == "synthetic" or self.feature_weight > 0,
             "feature_prototypes are the feature term's: set feature_weight too"),
            (-1.0 <= self.head_template_cosine <= 1.0, "head_template_cosine must be in [-1, 1]"),
            (math.isfinite(self.anchor_feature_weight) and 0 <= self.anchor_feature_weight <= MAX_ANCHOR_WEIGHT,
             f"anchor_feature_weight must be in [0, {MAX_ANCHOR_WEIGHT:g}]"),
            (not self.boundary_anchor or self.synthetic_anchor, "boundary_anchor extends synthetic_anchor: set both"),
            (math.isfinite(self.erase_weight) and self.erase_weight >= 0, "erase_weight must be zero or positive"),
            (math.isfinite(self.erase_tol) and 0 < self.erase_tol <= 1, "erase_tol must be in (0, 1]"),
            (self.erase_tol == 1.0 or self.erase_weight > 0, "erase_tol is the erasure's stop rule: set erase_weight too"),
            (self.erase_aim_every >= 1, "erase_aim_every must be at least 1"),
            (self.erase_weight == 0 or self.eval_halves,
             "erase_weight trains on the evaluation set's selection half: set eval_halves, so that the audit half "
             "stays untouched"),
            (self.erase_weight == 0 or not self.method_spec.uses_retain,
             f"method {self.method!r} trains on retain data; erase_weight adds the selection half to retain-free methods"),
            (self.erase_weight == 0 or not self.select_on_eval,
             "erase_weight trains on the selection half that select_on_eval chooses the checkpoint on: set one"),
            (self.holdout_folds == 0 or self.holdout_folds >= 2,
             "holdout_folds must be 0 (no generalisation check) or at least 2"),
            (self.holdout_images >= 1, "holdout_images must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def method_spec(self) -> Method:
        return METHODS[self.method]

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else self.method_spec.default_lr

    def check_inputs(self, inputs: UnlearnInputs) -> None:
        """Refuse input combinations the method cannot use, before anything is loaded."""
        if self.method_spec.uses_retain and not inputs.retain_source:
            raise ConfigError(f"method {self.method!r} needs a retain source")
        if not self.method_spec.uses_retain and inputs.retain_source:
            raise ConfigError(f"method {self.method!r} uses no retain data; drop the retain source")
        if inputs.anchor_source and self.method_spec.uses_retain:
            raise ConfigError(f"method {self.method!r} trains on retain data; an anchor source is for retain-free methods")
        if self.synthetic_anchor and self.method_spec.uses_retain:
            raise ConfigError(f"method {self.method!r} trains on retain data; synthetic_anchor is for retain-free methods")
        if self.anchor_feature_weight > 0 and not (inputs.anchor_source or self.synthetic_anchor):
            raise ConfigError("anchor_feature_weight holds an anchor's features: give an anchor source or synthetic_anchor")
        if self.select_on_eval and not inputs.eval_source:
            raise ConfigError("select_on_eval needs a labelled evaluation source")
        if self.eval_halves and not inputs.eval_source:
            raise ConfigError("eval_halves needs a labelled evaluation source")
        if self.evidence and not inputs.eval_source:
            raise ConfigError("evidence needs a labelled evaluation source (images no version trained on)")

    def to_record(self) -> dict[str, Any]:
        """The config as recorded in reports and lineage, with the learning rate resolved."""
        record = dataclasses.asdict(self)
        record["lr"] = self.effective_lr
        record["targets"] = list(self.targets)
        return record
