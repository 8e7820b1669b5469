"""The unlearning loop: train until every forget set is forgotten, or select on a held-out split."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from worker.engine.adapters import merged_view
from worker.engine.augment import DEFAULT_AUGMENTATION
from worker.engine.config import UnlearnConfig
from worker.engine.errors import ConfigError, NumericalError, UnlearningCancelled
from worker.engine.head import classifier, row_cosines, row_prototypes
from worker.engine.images import normalise
from worker.engine.losses import (adversarial_neighbours, class_direction, direction_erasure_loss, feature_match_loss,
                                  invert_classes, masked_kl_loss, masked_teacher)
from worker.engine.metrics import eval_logits, forget_retain_accuracy, predict, selection_score
from worker.engine.package import InputSpec
from worker.engine.prefix import base_network, split_frozen_prefix
from worker.engine.runtime import Runtime
from worker.engine.timings import Timings

# The selection set's frozen-front tokens are kept for the run when they take at most this much
# memory (10,000 CIFAR-sized images on ViT-Tiny/4: 500 MB); a larger set runs the whole model at
# each evaluation instead.
MAX_CACHED_EVAL_TOKEN_BYTES = 1024**3
# Selection first measures this many images of each forget set: when they alone hold more recognised
# images than the target allows, the checkpoint misses it whatever the rest say (see _lower_bounds).
EARLY_CHECK_IMAGES = 64
CONFIRM_VIEWS_SEED_OFFSET = 0x5EED  # the stop rule's views: seed + this (any constant apart from the seed)
# Unscored fallback checkpoints (_Candidates) are kept up to this much memory: LoRA's adapters on
# ViT-Tiny are kilobytes a checkpoint and never reach it; a method training every weight scores
# them in groups, keeping only the best.
MAX_UNSCORED_CHECKPOINT_BYTES = 256 * 1024**2
# The fallback scores at most this many of its checkpoints, evenly spaced over them, the last one
# included: a CIFAR-10 run of 20 images that never reached the margin had 82 that forgot, and scoring
# every one took 64 s of an 84-s run (benchmarks/selection_fallback.py).
MAX_SCORED_FALLBACKS = 10
# What a selected checkpoint met (LoopOutcome.selected_by): the stop rule's own measure (its margin
# and views), or only the target on the forget images themselves, which the report's target_met judges.
STOP_RULE, TARGET = "stop rule", "target"
SYNTHESISED_PER_CLASS = 16  # inputs synthesised per class: the feature term's prototypes, the synthetic anchor


@dataclass(frozen=True)
class Progress:
    """One step of a run, as reported to the progress callback."""

    step: int
    max_steps: int
    loss: float
    forget_acc: dict[str, float]  # per forgotten class: the step's running estimate, or the confirmed value
    confirmed: bool  # forget_acc comes from an eval-mode pass over the whole forget sets
    phase: str = "run"  # "run", or "holdout i/k" for a fold of the generalisation check


@dataclass(frozen=True)
class ForgetData:
    """The forget sets, prepared once: normalised on the device, one tensor per forgotten class."""

    class_names: tuple[str, ...]
    class_indices: tuple[int, ...]
    images: tuple[torch.Tensor, ...]  # each (N_c, C, H, W) float
    # Per class, bool (S, N_c) when its images came from several sources (requests), else None; ()
    # for none at all. A class's accuracy is then its worst source's: each request's set must meet the
    # target on its own, as each is verified on its own before it completes.
    members: tuple[torch.Tensor | None, ...] = ()


@dataclass(frozen=True)
class LabelledData:
    """A labelled image set kept as uint8 (normalised batch by batch): evaluation or retain images."""

    pixels: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) long, on the CPU
    sha256: tuple[str, ...] = ()  # each image's file digest (what evaluation halves are cut by)

    def subset(self, keep: torch.Tensor) -> LabelledData:
        """The images where ``keep`` (N,) bool is True."""
        digests = tuple(h for h, k in zip(self.sha256, keep.tolist()) if k)
        return LabelledData(self.pixels[keep.to(self.pixels.device)], self.labels[keep], digests)


@dataclass(frozen=True)
class StepResult:
    loss: float
    estimate: list[float]  # per forgotten class: accuracy on this step's training logits
    forget_acc: list[float] | None  # per forgotten class, over the whole forget set, when checked
    updated: bool  # False: the target was confirmed and the weights were left as they are


@dataclass
class LoopOutcome:
    steps: int  # updates that produced the returned weights
    steps_run: int  # updates applied in all
    target_met: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # select-on-eval checkpoints
    best_evaluation: dict[str, Any] | None = None
    # What the selected checkpoint met: STOP_RULE, or TARGET when no checkpoint reached the stop
    # rule's margin (see UnlearningLoop.run); None when nothing was selected.
    selected_by: str | None = None
    optimizer_state_bytes: int = 0


@dataclass
class _Candidates:
    """Checkpoints that forgot their images (the target) while none has met the stop rule's measure,
    kept unscored: most selection runs reach the margin later, and scoring each would cost a
    held-out evaluation for nothing (digits, 8-10 images: 5-35 a run). Scored when the run ends
    without one at the margin, or when they hold MAX_UNSCORED_CHECKPOINT_BYTES."""

    pending: list[tuple[list[torch.Tensor], dict[str, Any]]] = field(default_factory=list)
    best: tuple[list[torch.Tensor], dict[str, Any]] | None = None  # the best scored so far

    def pending_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for state, _ in self.pending for t in state)


@dataclass
class _Erasure:
    """The class-direction erasure's data (UnlearnConfig.erase_weight): the selection half, prepared
    once, and each forgotten class's direction on the current weights, aimed every few steps."""

    inputs: torch.Tensor  # (S, ...) what the network takes: the half's images (their frozen front's tokens)
    labels: torch.Tensor  # (S,) long, on the device
    kept: torch.Tensor  # (S,) bool: images of a kept class, whose original outputs are held
    teacher: torch.Tensor  # (S, K) the original's masked softmax on them
    sampler: CyclingSampler
    scales: list[torch.Tensor]  # per forgotten class: the original's erasure term (the loss's unit)
    gaps: list[torch.Tensor]  # per forgotten class: the original's squared gap between the means (the stop rule's unit)
    directions: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per class: (direction, level)
    gaps_now: list[float] = field(default_factory=list)  # per class: its gap over the original's, on the weights aimed at
    weights_moved: int | None = None  # updates since the last aim; None: never aimed

    @property
    def value(self) -> float:
        """The worst class's gap over the original's: the stop rule's figure."""
        return max(self.gaps_now)


class CyclingSampler:
    """Batches of distinct indices, reshuffled after every pass; a pass's remainder smaller than a
    batch is dropped (the next pass covers those images again)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.size, self.generator = n, min(batch_size, n), generator
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if self.order.numel() < self.size:
            self.order = torch.randperm(self.n, generator=self.generator)
        batch, self.order = self.order[: self.size], self.order[self.size:]
        return batch


class UnlearningLoop:
    """Trains ``model`` (adapters already attached, or every weight) against the forget sets.

    Args:
        model: the network to train, on the runtime's device, with requires_grad set on exactly
            the parameters to train.
        config: the run's hyper-parameters (method, lr, lambda, stop rule, selection).
        forget: the prepared forget sets.
        spec: the card's input specification, to normalise evaluation and retain batches.
        runtime: device and autocast precision.
        generator: seeded CPU generator for sampling, random labels and random views.
        eval_data: the labelled held-out split, for selection on it.
        retain_data: labelled retain images, for the methods that use them.
        anchor: normalised unlabelled images of none of the model's classes, whose original
            (masked) outputs every step holds in place.
        timings: where the steps, the stop rule's checks and the selection's evaluations are timed.
    """

    def __init__(self, model: torch.nn.Module, config: UnlearnConfig, forget: ForgetData, spec: InputSpec,
                 runtime: Runtime, generator: torch.Generator, eval_data: LabelledData | None = None,
                 retain_data: LabelledData | None = None, anchor: torch.Tensor | None = None,
                 timings: Timings | None = None) -> None:
        self.model, self.config, self.forget, self.spec, self.runtime = model, config, forget, spec, runtime
        self.timings = timings if timings is not None else Timings()
        self.eval_data, self.retain_data, self.generator = eval_data, retain_data, generator
        self.method = config.method_spec
        self.augmentation = DEFAULT_AUGMENTATION if config.augment else None
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.trainable, lr=config.effective_lr)
        self.penalty = self.method.regulariser.bind(model, self.trainable) if self.method.regulariser else None
        self.forget_samplers = [CyclingSampler(x.shape[0], config.batch_size, generator) for x in forget.images]
        self.retain_sampler = (CyclingSampler(retain_data.labels.numel(), config.batch_size, generator)
                               if retain_data is not None else None)
        # With adapters only in later blocks, the frozen front runs once here; the teachers below,
        # training steps and forget-set checks run the rest of the network on its tokens (prefix.py).
        # The front and back together give the whole model's logits bit for bit, so each image
        # passes the front once instead of once for its tokens and once more for its teacher.
        self.prefix = split_frozen_prefix(model) if config.cache_frozen_prefix else None
        self.network = self.prefix.back if self.prefix else model
        self.inputs = replace(forget, images=tuple(self._front(x) for x in forget.images))
        # masked-kl: the original model's targets, computed once (the adapters start at zero, so the
        # model is still the original here); rows follow the forget sets' order.
        self.teachers = ([self._teacher(x, config.target_temperature) for x in self.inputs.images]
                         if self.method.forget is not None and self.method.forget.needs_teacher else [])
        # neighbours: adversarial neighbours of every forget image on the original model, and the
        # original's masked softmax on them, computed once for the same reason.
        self.neighbours = ([self._neighbours(x, t) for x, t in zip(forget.images, self.teachers)]
                           if self.method.neighbours else [])
        self.neighbour_inputs = [self._front(x) for x in self.neighbours]
        self.neighbour_teachers = [self._teacher(n, config.target_temperature) for n in self.neighbour_inputs]
        # feature term: per forget image, the original's pre-logit feature of the class it ranks
        # first after the forgotten ones (a prototype: by model inversion, or that class's head row),
        # and the original's own distance to it; computed once.
        synthetic = (self._synthesised() if (config.feature_weight > 0 and config.feature_prototypes == "synthetic")
                     or (config.synthetic_anchor and anchor is None) else None)
        # With head rows as prototypes, each forgotten class's row is first checked against its forget
        # images' mean feature (the one class whose images a run has): rows that are not their classes'
        # templates would pull the features where no image of the next class lies, so the run goes
        # without the term (the report's feature_term says which, with the cosines).
        found = [self._parent_features(x) for x in forget.images] if config.feature_weight > 0 else []
        self.head_row_cosine = self._head_row_cosine(found) if config.feature_prototypes == "head" else {}
        self.feature_term = config.feature_weight > 0 and all(
            c >= config.head_template_cosine for c in self.head_row_cosine.values())
        self.feature_targets, self.feature_scales = (self._feature_targets(synthetic, found) if self.feature_term
                                                     else ([], []))
        if config.synthetic_anchor and anchor is None:
            # No anchor source: the synthesised inputs of the classes kept stand in for one, made
            # from the original alone (retain-free), and held where the original puts them.
            inputs, classes = synthetic
            kept = ~torch.isin(classes, torch.tensor(forget.class_indices, device=classes.device))
            anchor = inputs[kept]
            if config.boundary_anchor:
                anchor = torch.cat([anchor, self._boundaries(anchor, classes[kept])])
        self._feature_value: float | None = None  # the last step's worst relative feature loss
        # The stop rule's fixed random views, drawn once: a run stops when they are forgotten too.
        # They come from a generator of their own, so that asking for them leaves the training's
        # draws (batches, random views) as they are: the same run, only a stricter stop rule.
        views_generator = torch.Generator().manual_seed((config.seed + CONFIRM_VIEWS_SEED_OFFSET) % 2**63)
        views = [torch.cat([DEFAULT_AUGMENTATION.views(x, spec, views_generator) for _ in range(config.confirm_views)])
                 for x in forget.images] if config.confirm_views else []
        self.confirm_views = replace(forget, images=tuple(self._front(v) for v in views)) if views else None
        # anchor: the original's masked softmax on images of no class of the model; what a model
        # that never saw the forgotten classes would say about them, held at every step.
        self.anchor_inputs = self._front(anchor) if anchor is not None else None
        # ... and, with anchor_feature_weight, the original's pre-logit features on them, which hold the
        # kept classes' representation, not only the head's reading of it.
        self.anchor_features = (self._parent_features(anchor) if anchor is not None and config.anchor_feature_weight > 0
                                else None)
        self.anchor_teacher = self._teacher(self.anchor_inputs) if anchor is not None else None
        # As many anchor images per step as forget images: the anchor term weighs like the forget
        # term, and a 9-image face run does not forward 256 anchor images per step (~28x the work).
        forget_batch = sum(s.size for s in self.forget_samplers)
        self.anchor_sampler = CyclingSampler(anchor.shape[0], forget_batch, generator) if anchor is not None else None
        self._batch_indices: list[torch.Tensor] = []
        self._batch_teachers: list[torch.Tensor] = []
        self._anchor_index: torch.Tensor | None = None
        # erasure: the selection half's images, with the original's outputs and directions on them.
        self.erase = self._erasure(eval_data) if config.erase_weight > 0 else None
        self._erase_index: torch.Tensor | None = None
        self._erase_term: float | None = None  # the last step's worst erasure term, relative to the original's
        self._eval_tokens: torch.Tensor | None = None  # the selection set through the frozen front, once needed
        self._eval_tokens_decided = False  # whether they fit was judged (once: the set does not change)

    def _front(self, images: torch.Tensor) -> torch.Tensor:
        """What ``self.network`` takes: the images themselves, or the frozen front's tokens for them."""
        if self.prefix is None:
            return images
        return eval_logits(self.prefix.front, images, self.runtime, self.config.eval_batch_size)

    def _teacher(self, inputs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The original's masked softmax on what ``self.network`` takes (``_front``'s output)."""
        logits = eval_logits(self.network, inputs, self.runtime, self.config.eval_batch_size)
        return masked_teacher(logits, torch.tensor(self.forget.class_indices), temperature)

    def _neighbours(self, images: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Each forget image pushed toward the class the original ranks first after the forgotten one."""
        std = torch.tensor(self.spec.std)
        with self.runtime.autocast():
            moved = [adversarial_neighbours(self.model, images[start:start + self.config.eval_batch_size],
                                            teacher[start:start + self.config.eval_batch_size].argmax(1), std)
                     for start in range(0, images.shape[0], self.config.eval_batch_size)]
        return torch.cat(moved)

    @torch.no_grad()
    def _parent_features(self, images: torch.Tensor) -> torch.Tensor:
        """The original's pre-logit features (adapters still at zero): (N, C, H, W) -> (N, D) fp32."""
        vit, size = base_network(self.model), self.config.eval_batch_size
        self.model.eval()
        with self.runtime.autocast():
            return torch.cat([vit.forward_head(vit.forward_features(images[s:s + size]), pre_logits=True).float()
                              for s in range(0, images.shape[0], size)])

    def _feature_targets(self, synthetic: tuple[torch.Tensor, torch.Tensor] | None, features: list[torch.Tensor]
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per forget set: (N, D) target features, and the original's mean squared distance to them from
        ``features``, the original's own features of the set."""
        prototypes = self._prototypes(*synthetic) if self.config.feature_prototypes == "synthetic" else None
        targets, scales = [], []
        for found, teacher in zip(features, self.teachers):
            next_class = teacher.argmax(1)  # the teacher gives the forgotten classes 0
            target = prototypes[next_class] if prototypes is not None else self._head_prototypes(next_class, found)
            targets.append(target)
            scales.append((found - target).pow(2).sum(1).mean().clamp_min(1e-8))
        return targets, scales

    def _head_row_cosine(self, features: list[torch.Tensor]) -> dict[str, float]:
        """Per forgotten class: the cosine of its head row with the mean of ``features``, the original's
        features of its forget images."""
        rows = classifier(base_network(self.model)).weight.detach()
        return dict(zip(self.forget.class_names, row_cosines(rows, self.forget.class_indices, features)))

    def _head_prototypes(self, classes: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
        """The head rows of ``classes`` standing for their mean features, each at the norm of its image's
        own original feature ``found``: nothing synthesised. A row stands for its class as far as the
        class's mean feature points along it: on the digits their cosine is 0.99, on the CIFAR-10
        reference model 0.61-0.77 (head_template_cosine checks it)."""
        return row_prototypes(classifier(base_network(self.model)).weight.detach(), classes, found.norm(dim=1))

    def _synthesised(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, classes): ``SYNTHESISED_PER_CLASS`` inputs of each class of the model, synthesised
        from the original alone (losses.invert_classes), class after class: no image of any class is used."""
        shape = tuple(self.forget.images[0].shape[1:])
        count = eval_logits(self.model, self.forget.images[0][:1], self.runtime, 1).shape[1]
        classes = torch.arange(count, device=self.runtime.device).repeat_interleave(SYNTHESISED_PER_CLASS)
        generator = torch.Generator().manual_seed(self.config.seed)  # the run's own draws stay as they were
        self.model.eval()
        return invert_classes(self.model, classes, shape, *self._input_range(), generator), classes

    def _boundaries(self, inputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Per synthesised input of a kept class, one synthesised toward an even mix of its class and
        the kept class the original ranks next on it (losses.invert_classes with soft targets)."""
        if len(torch.unique(classes)) < 2:  # one class kept: it has no boundary with another
            return inputs[:0]
        logits = eval_logits(self.model, inputs, self.runtime, self.config.eval_batch_size).float()
        rows = torch.arange(len(classes), device=logits.device)
        logits[:, torch.tensor(self.forget.class_indices, device=logits.device)] = float("-inf")
        logits[rows, classes] = float("-inf")
        targets = torch.zeros_like(logits)
        targets[rows, classes] = 0.5
        targets[rows, logits.argmax(1)] = 0.5
        generator = torch.Generator().manual_seed(self.config.seed + 1)  # draws of their own, as _synthesised's
        self.model.eval()
        return invert_classes(self.model, targets, tuple(inputs.shape[1:]), *self._input_range(), generator)

    def _input_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid pixel range [0, 1] in normalised units, (C,) each: where synthesised inputs stay."""
        mean, std = torch.tensor(self.spec.mean), torch.tensor(self.spec.std)
        return (0 - mean) / std, (1 - mean) / std

    def _prototypes(self, inputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(K, D): each class's mean original feature over its synthesised inputs."""
        found = self._parent_features(inputs)
        return found.view(-1, SYNTHESISED_PER_CLASS, found.shape[1]).mean(1)

    def _erasure(self, data: LabelledData | None) -> _Erasure:
        """The erasure's data, with the original's terms as their units (the adapters are still at zero)."""
        if data is None:  # config.check_inputs refuses this first
            raise ConfigError("erase_weight needs the evaluation set's selection half")
        inputs = self._front(normalise(data.pixels.to(self.runtime.device), self.spec))
        labels = data.labels.to(self.runtime.device)
        forgotten = torch.tensor(self.forget.class_indices, device=labels.device)
        # As many of the half's images a step as forget images, as the anchor: a 9-image run does not
        # forward 256 of them a step.
        forget_batch = sum(s.size for s in self.forget_samplers)
        erase = _Erasure(inputs=inputs, labels=labels, kept=~torch.isin(labels, forgotten), teacher=self._teacher(inputs),
                         sampler=CyclingSampler(labels.numel(), forget_batch, self.generator), scales=[], gaps=[])
        found = self._current_features(inputs)
        for index, images in zip(self.forget.class_indices, self.inputs.images):  # unlearn() checked both are there
            direction, level, gap = class_direction(found, labels == index, erase.kept)
            union = torch.cat([found, self._current_features(images)])
            erase.scales.append(direction_erasure_loss(union, direction, level, torch.ones(())).clamp_min(1e-8))
            erase.gaps.append(gap.clamp_min(1e-12))
        return erase

    @torch.no_grad()
    def _current_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """The pre-logit features of the weights being trained (adapters live), in eval mode: (N, D) fp32."""
        with head_inputs(self.model, capture=True) as found:
            eval_logits(self.network, inputs, self.runtime, self.config.eval_batch_size)
        return torch.cat(found).float()

    def aim_erasure(self) -> float:
        """Each forgotten class's direction and level on the current weights (adapters merged), over
        the whole selection half; returns the worst class's squared gap over the original's (the stop
        rule's figure)."""
        erase = self.erase
        with merged_view(self.model):  # the weights as they would be written, as the stop rule measures them
            found = self._current_features(erase.inputs)
        aimed = [class_direction(found, erase.labels == index, erase.kept) for index in self.forget.class_indices]
        erase.directions = [(direction, level) for direction, level, _ in aimed]
        erase.gaps_now = [(gap / unit).item() for (_, _, gap), unit in zip(aimed, erase.gaps)]
        erase.weights_moved = 0
        return erase.value

    # --- one training step -------------------------------------------------------------------

    def train_step(self, stop_when_forgotten: bool) -> StepResult:
        """Forward the next batch, then one Adam step.

        With ``stop_when_forgotten``, when this batch's logits put every class at or below the
        target, the whole forget sets are checked first, on the same weights; if they confirm it,
        no update is applied: the weights that reached the target are the ones kept.

        The model stays in eval mode: the adapters learn the function the model computes when it
        serves (no dropout or drop-path a card may set, no BatchNorm statistics moved by forget
        images), so the snapshots of the adapters alone are the whole state to restore.
        """
        self.model.eval()
        if self.erase is not None and (self.erase.weights_moved is None
                                       or self.erase.weights_moved >= self.config.erase_aim_every):
            with self.timings.phase("erasure aim"):
                self.aim_erasure()
        inputs, targets, sizes = self._sample_batch()
        capture = bool(self.feature_targets) or self.anchor_features is not None or self.erase is not None
        with self.runtime.autocast(), head_inputs(self.model, capture=capture) as features:
            logits = self.network(inputs)
        chunks = logits.float().split(sizes)  # bf16 logits -> fp32 losses: forget, neighbours, anchor, erasure, retain
        forgets, neighbours = len(self.forget.images), len(self.neighbours)
        anchors = forgets + neighbours + (self.anchor_inputs is not None)
        erases = anchors + (self.erase is not None)
        forget_chunks, neighbour_chunks = chunks[:forgets], chunks[forgets:forgets + neighbours]
        anchor_chunk, erase_chunk, retain_chunk = chunks[forgets + neighbours:anchors], chunks[anchors:erases], chunks[erases:]
        feature_parts = features[0].split(sizes) if features else ()
        feature_chunks = feature_parts[:forgets] if self.feature_targets else ()
        anchor_features = feature_parts[forgets + neighbours:anchors] if self.anchor_features is not None else ()
        loss = self._loss(forget_chunks, targets, retain_chunk, neighbour_chunks, anchor_chunk, feature_chunks,
                          anchor_features)
        if erase_chunk:
            loss = loss + self._erasure_loss(erase_chunk[0], feature_parts[anchors], feature_parts[:forgets])
        estimate = [recognised(c.detach(), i, self.config.max_forget_prob) for c, i in
                    zip(forget_chunks, self.forget.class_indices)]
        if not torch.isfinite(loss):
            raise NumericalError(f"the loss became {loss.item()} at this step; lower the learning rate or lambda")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # frees the graph's activations before a confirmation pass needs the memory
        forget_acc = None
        features_met = self._feature_value is None or self._feature_value <= self.config.feature_tol
        if stop_when_forgotten and features_met and self.meets_target(estimate):
            with self.timings.phase("stop-rule check"):
                forget_acc = self.forget_accuracy()
            if self.meets_target(forget_acc) and self.erasure_met():
                return StepResult(loss.item(), estimate, forget_acc, updated=False)
        self.optimizer.step()
        if self.erase is not None:
            self.erase.weights_moved += 1
        return StepResult(loss.item(), estimate, forget_acc, updated=True)

    def erasure_met(self) -> bool:
        """The erasure's stop rule on the current weights (met without it, or at erase_tol 1): a figure
        aimed steps ago that misses it waits for the next aim; one that meets it is measured again
        first, unless aimed on these weights. Before any aim, it is aimed now."""
        if self.erase is None or self.config.erase_tol >= 1.0:
            return True
        if self.erase.weights_moved is not None and self.erase.value > self.config.erase_tol:
            return False
        if self.erase.weights_moved != 0:
            with self.timings.phase("erasure aim"):
                self.aim_erasure()
        return self.erase.value <= self.config.erase_tol

    def _sample_batch(self) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        self._batch_indices = [s.next().to(x.device) for x, s in zip(self.inputs.images, self.forget_samplers)]
        if self.augmentation is None:
            parts = [x[i] for x, i in zip(self.inputs.images, self._batch_indices)]
            self._batch_teachers = [t[i] for t, i in zip(self.teachers, self._batch_indices)]
        else:
            views = [self.augmentation.views(x[i], self.spec, self.generator)
                     for x, i in zip(self.forget.images, self._batch_indices)]
            parts = [self._front(v) for v in views]
            self._batch_teachers = [self._teacher_on_view(p) for p in parts] if self.teachers else []
        targets = [torch.full((p.shape[0],), i, device=self.runtime.device) for p, i in
                   zip(parts, self.forget.class_indices)]
        parts += [n[i] for n, i in zip(self.neighbour_inputs, self._batch_indices)]
        if self.anchor_inputs is not None:
            self._anchor_index = self.anchor_sampler.next().to(self.anchor_inputs.device)
            parts.append(self.anchor_inputs[self._anchor_index])
        if self.erase is not None:
            self._erase_index = self.erase.sampler.next().to(self.erase.inputs.device)
            parts.append(self.erase.inputs[self._erase_index])
        if self.retain_data is not None:
            index = self.retain_sampler.next()
            parts.append(self._front(normalise(self.retain_data.pixels[index].to(self.runtime.device), self.spec)))
            targets.append(self.retain_data.labels[index].to(self.runtime.device))
        return torch.cat(parts), targets, [p.shape[0] for p in parts]

    def _teacher_on_view(self, view_inputs: torch.Tensor) -> torch.Tensor:
        """The original's masked softmax on a view drawn this step: the adapters switched off (the
        frozen front has none, so its tokens are the original's)."""
        with self.model.disable_adapter():
            return self._teacher(view_inputs, self.config.target_temperature)

    def _loss(self, forget_chunks: tuple[torch.Tensor, ...], targets: list[torch.Tensor],
              retain_chunk: tuple[torch.Tensor, ...], neighbour_chunks: tuple[torch.Tensor, ...] = (),
              anchor_chunk: tuple[torch.Tensor, ...] = (), feature_chunks: tuple[torch.Tensor, ...] = (),
              anchor_features: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        loss = torch.zeros((), device=self.runtime.device)
        forget = self.method.forget
        if forget is not None:
            # The mean over classes of each class's loss, so a large forget set does not drown a small one.
            terms = [forget.loss(logits, labels, self._batch_teachers[c] if forget.needs_teacher else None,
                                 self.generator)
                     for c, (logits, labels) in enumerate(zip(forget_chunks, targets))]
            loss = loss + torch.stack(terms).mean()
        if neighbour_chunks:
            terms = [masked_kl_loss(logits, teacher[i]) for logits, teacher, i in
                     zip(neighbour_chunks, self.neighbour_teachers, self._batch_indices)]
            loss = loss + torch.stack(terms).mean()
        if anchor_chunk:
            loss = loss + self.config.anchor_weight * masked_kl_loss(anchor_chunk[0], self.anchor_teacher[self._anchor_index])
        if anchor_features:  # their squared drift from the original's, over the features' squared norm
            held = self.anchor_features[self._anchor_index]
            loss = loss + self.config.anchor_feature_weight * feature_match_loss(
                anchor_features[0], held, held.pow(2).sum(1).mean().clamp_min(1e-8))
        if feature_chunks:
            terms = torch.stack([feature_match_loss(f, t[i], scale) for f, t, scale, i in
                                 zip(feature_chunks, self.feature_targets, self.feature_scales, self._batch_indices)])
            self._feature_value = terms.max().item()
            loss = loss + self.config.feature_weight * terms.mean()
        if retain_chunk:
            loss = loss + F.cross_entropy(retain_chunk[0], targets[-1])
        if self.penalty is not None:
            loss = loss + self.config.l1_weight * self.penalty()
        return loss

    def _erasure_loss(self, logits: torch.Tensor, features: torch.Tensor, forget_features: tuple[torch.Tensor, ...]
                      ) -> torch.Tensor:
        """The erasure term on this step's selection images (``logits``, ``features``) and each class's
        forget batch (``forget_features``), plus the hold on the kept classes' outputs."""
        erase, index = self.erase, self._erase_index
        terms = torch.stack([direction_erasure_loss(torch.cat([features, own]), direction, level, scale)
                             for own, (direction, level), scale in zip(forget_features, erase.directions, erase.scales)])
        self._erase_term = terms.max().item()
        loss = self.config.erase_weight * terms.mean()
        kept = erase.kept[index]
        if kept.any():
            loss = loss + self.config.anchor_weight * masked_kl_loss(logits[kept], erase.teacher[index][kept])
        return loss

    # --- measurements ------------------------------------------------------------------------

    def forget_accuracy(self) -> list[float]:
        """Each class's accuracy over its whole forget set, or over the stop rule's views of it when
        these are higher: the target must hold on both. Measured on the weights as they would be
        written, adapters merged (adapters.merged_view)."""
        return self._with_views(self._recognised(self._forget_logits(), self.config.max_forget_prob))

    def _with_views(self, images: list[float]) -> list[float]:
        """``images`` (each class's figure on its forget images), or the stop rule's views' figure
        where that is higher."""
        if self.confirm_views is None:
            return images
        with merged_view(self.model):
            views = forget_set_accuracy(self.network, self.confirm_views, self.runtime, self.config.eval_batch_size,
                                        self.config.max_forget_prob)
        return [max(a, b) for a, b in zip(images, views)]

    def _forget_logits(self, first: int | None = None) -> list[torch.Tensor]:
        """Each class's forget-set logits (its first ``first`` images only, when given), adapters merged."""
        size = self.config.eval_batch_size
        with merged_view(self.model):
            return [eval_logits(self.network, x if first is None else x[:first], self.runtime, size)
                    for x in self.inputs.images]

    def _recognised(self, logits: list[torch.Tensor], max_prob: float) -> list[float]:
        """Each class's share of forget images still recognised (``recognised``), its worst source's."""
        members = self.forget.members or (None,) * len(logits)
        return [max(per_source(recognised_flags(x, i, max_prob), m))
                for x, i, m in zip(logits, self.forget.class_indices, members)]

    def _lower_bounds(self, first: list[torch.Tensor], max_prob: float) -> list[float]:
        """Lower bounds on each class's forget-set figure from the logits of its first images: exact,
        not an estimate (images recognised among a few are recognised among all). Most checkpoints
        of a selection run still recognise many forget images, and a few show it at an eighth of
        the pass over 500."""
        return [100.0 * int(recognised_flags(x, i, max_prob).sum()) / max(whole.shape[0], 1)
                for x, i, whole in zip(first, self.forget.class_indices, self.inputs.images)]

    def evaluate_held_out(self) -> tuple[float, float]:
        """(Acc_f, Acc_r) on the held-out split: through the later blocks only, on its frozen-front
        tokens computed at the first evaluation, when the run has a frozen front (prefix.py) and
        they fit in MAX_CACHED_EVAL_TOKEN_BYTES; otherwise through the whole model."""
        size = self.config.eval_batch_size
        if not self._eval_tokens_decided and self.prefix is not None:
            self._eval_tokens_decided = True
            pixels = self.eval_data.pixels
            one = self._front(normalise(pixels[:1].to(self.runtime.device), self.spec))
            if one.numel() * one.element_size() * pixels.shape[0] <= MAX_CACHED_EVAL_TOKEN_BYTES:
                self._eval_tokens = eval_logits(self.prefix.front, pixels, self.runtime, size, self.spec)
        with merged_view(self.model):
            if self._eval_tokens is not None:
                predictions = predict(self.network, self._eval_tokens, self.runtime, size)
            else:
                predictions = predict(self.model, self.eval_data.pixels, self.runtime, size, self.spec)
        return forget_retain_accuracy(predictions, self.eval_data.labels, list(self.forget.class_indices))

    def meets_target(self, forget_acc: list[float]) -> bool:
        return all(a <= self.config.target_forget_acc for a in forget_acc)

    # --- the run -----------------------------------------------------------------------------

    def run(self, on_progress: Callable[[Progress], None] | None = None,
            should_cancel: Callable[[], bool] | None = None) -> LoopOutcome:
        """Stop rule: when a step's running estimate reaches the target, confirm on the whole
        forget sets and stop if confirmed (see ``train_step``). With ``select_on_eval``: evaluate
        every ``eval_every`` steps and keep the best-scoring checkpoint that meets the stop rule's
        measure; when none does within ``max_steps`` (its margin can ask more than a run reaches:
        2 of 7 CIFAR-10 runs of 20 images), the best-scoring one that meets the target on the forget
        images themselves, and ``selected_by`` says which."""
        select = self.config.select_on_eval
        outcome = LoopOutcome(steps=0, steps_run=0, target_met=False)
        best_state: list[torch.Tensor] | None = None
        candidates = _Candidates()  # checkpoints that met only the target, while none met the stop rule's measure
        stale = 0
        for step in range(1, self.config.max_steps + 1):
            if should_cancel is not None and should_cancel():
                raise UnlearningCancelled(f"canceled at step {step}")
            with self.timings.phase("step"):
                result = self.train_step(stop_when_forgotten=not select)
            self._record(outcome, step, result, on_progress)
            if not result.updated:
                outcome.target_met = True
                break
            outcome.steps_run = step
            if not select or (step % self.config.eval_every and step != self.config.max_steps):
                continue
            with self.timings.phase("selection evaluation"):
                evaluation = self._checkpoint_evaluation(step, judge_target=best_state is None)
                if evaluation["meets_target"]:
                    self._score(evaluation)
            outcome.evaluations.append(evaluation)
            if evaluation["meets_target"] and (best_state is None or evaluation["score"] > outcome.best_evaluation["score"]):
                best_state, outcome.best_evaluation, stale = self._snapshot(), evaluation, 0
                candidates = _Candidates()  # never needed now: a checkpoint met the stop rule's measure
            elif best_state is not None:
                stale += 1
                if stale >= self.config.patience:
                    break
            elif evaluation.get("forgets"):
                candidates.pending.append((self._snapshot(), evaluation))
                if candidates.pending_bytes() > MAX_UNSCORED_CHECKPOINT_BYTES:
                    with self.timings.phase("selection evaluation"):
                        self._score_candidates(candidates)
        outcome.steps = outcome.steps_run
        if best_state is not None:
            outcome.selected_by = STOP_RULE
        elif candidates.pending or candidates.best:
            with self.timings.phase("selection evaluation"):
                self._score_candidates(candidates)
            (best_state, outcome.best_evaluation), outcome.selected_by = candidates.best, TARGET
        if best_state is not None:
            self._restore(best_state)
            outcome.steps, outcome.target_met = outcome.best_evaluation["step"], True
        outcome.optimizer_state_bytes = optimizer_state_bytes(self.optimizer)
        return outcome

    def _checkpoint_evaluation(self, step: int, judge_target: bool) -> dict[str, Any]:
        """The checkpoint's forget-set figures, unscored: ``meets_target`` when the stop rule's measure
        (its margin and views) meets the target. A checkpoint that still recognises its forget images
        cannot be selected, and most are told apart by their first images (_lower_bounds), so most
        of a run's checkpoints are neither measured whole nor scored (measured on CIFAR-10: 17 of 23).
        With ``judge_target`` (no checkpoint has met that measure yet) and a margin, one that misses
        it is also judged on its forget images alone (``forgets``), from the same logits: the
        fallback of ``run``."""
        names, max_prob = self.forget.class_names, self.config.max_forget_prob
        judge_target = judge_target and self.has_margin
        evaluation: dict[str, Any] = {"step": step, "acc_f": None, "acc_r": None, "score": None, "meets_target": False}
        if not any(m is not None for m in self.forget.members):  # a bound over the first images needs one source
            first = self._forget_logits(EARLY_CHECK_IMAGES)
            bounds = self._lower_bounds(first, max_prob)
            if not self.meets_target(bounds):
                evaluation["forget_acc_at_least"] = dict(zip(names, bounds))
                if not (judge_target and self.meets_target(self._lower_bounds(first, 1.0))):
                    return evaluation
                own = self._recognised(self._forget_logits(), 1.0)
                return evaluation | {"forget_acc_argmax": dict(zip(names, own)), "forgets": self.meets_target(own)}
        logits = self._forget_logits()
        forget_acc = self._with_views(self._recognised(logits, max_prob))  # as forget_accuracy, logits kept
        evaluation |= {"forget_acc": dict(zip(names, forget_acc)), "meets_target": self.meets_target(forget_acc)}
        if judge_target and not evaluation["meets_target"]:
            own = self._recognised(logits, 1.0)
            evaluation |= {"forget_acc_argmax": dict(zip(names, own)), "forgets": self.meets_target(own)}
        return evaluation

    def _score(self, evaluation: dict[str, Any]) -> None:
        """The checkpoint's held-out figures and selection score, written into its evaluation."""
        acc_f, acc_r = self.evaluate_held_out()
        evaluation.update(acc_f=acc_f, acc_r=acc_r, score=selection_score(acc_r, acc_f))

    def _score_candidates(self, candidates: _Candidates) -> None:
        """Score the pending fallback checkpoints (at most MAX_SCORED_FALLBACKS of them, evenly spaced,
        the last included; the others keep no score) in the order they were reached and keep the best
        (the earliest of equals, as selection does); the weights being trained are put back."""
        current, pending = self._snapshot(), candidates.pending
        if len(pending) > MAX_SCORED_FALLBACKS:
            stride = len(pending) / MAX_SCORED_FALLBACKS  # counted back from the last, which is always scored
            picked = sorted({len(pending) - 1 - int(k * stride) for k in range(MAX_SCORED_FALLBACKS)})
            pending = [pending[i] for i in picked]
        for state, evaluation in pending:
            self._restore(state)
            self._score(evaluation)
            if candidates.best is None or evaluation["score"] > candidates.best[1]["score"]:
                candidates.best = state, evaluation
        candidates.pending.clear()
        self._restore(current)

    @property
    def has_margin(self) -> bool:
        """Whether the stop rule asks more than the target on the forget images: a probability
        bound, or views of them that must be forgotten too."""
        return self.config.max_forget_prob < 1.0 or self.confirm_views is not None

    def _record(self, outcome: LoopOutcome, step: int, result: StepResult,
                on_progress: Callable[[Progress], None] | None) -> None:
        confirmed = result.forget_acc is not None
        shown = result.forget_acc if confirmed else result.estimate
        progress = Progress(step=step, max_steps=self.config.max_steps, loss=result.loss,
                            forget_acc=dict(zip(self.forget.class_names, shown)), confirmed=confirmed)
        outcome.history.append({"step": step, "loss": result.loss, "forget_acc": progress.forget_acc,
                                "confirmed": confirmed, "updated": result.updated,
                                **({"feature_loss": self._feature_value} if self.feature_targets else {}),
                                **({"erase_gap": self.erase.value, "erase_term": self._erase_term}
                                   if self.erase is not None else {})})
        if on_progress is not None:
            on_progress(progress)

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.trainable]

    def _restore(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, saved in zip(self.trainable, state):
                p.copy_(saved)


@contextmanager
def head_inputs(model: torch.nn.Module, capture: bool) -> Iterator[list[torch.Tensor]]:
    """With ``capture``, the list gets the classifier head's input (the pre-logit features) on each
    forward inside the block; the hook is gone after it (the model is merged and served later)."""
    found: list[torch.Tensor] = []
    if not capture:
        yield found
        return
    handle = base_network(model).head.register_forward_hook(lambda module, args, out: found.append(args[0]))
    try:
        yield found
    finally:
        handle.remove()


def forget_set_accuracy(model: torch.nn.Module, forget: ForgetData, runtime: Runtime, batch_size: int,
                        max_prob: float = 1.0) -> list[float]:
    """Each forgotten class's accuracy over its whole forget set, in eval mode; with ``max_prob`` < 1,
    the share of its images still recognised (see ``recognised``). A class read from several sources
    gets its worst source's figure."""
    return [max(per_source) for per_source in forget_source_accuracy(model, forget, runtime, batch_size, max_prob)]


def forget_source_accuracy(model: torch.nn.Module, forget: ForgetData, runtime: Runtime, batch_size: int,
                           max_prob: float = 1.0) -> list[list[float]]:
    """Per forgotten class, the accuracy on each of its sources in the order given (one figure for a
    class read from one source): what each request's own set says, apart from the others'."""
    result = []
    for c, (x, i) in enumerate(zip(forget.images, forget.class_indices)):
        if max_prob >= 1.0:
            still = predict(model, x, runtime, batch_size) == i
        else:
            still = recognised_flags(eval_logits(model, x, runtime, batch_size), i, max_prob)
        members = forget.members[c] if forget.members else None
        result.append(per_source(still, members))
    return result


def worst_source(still: torch.Tensor, members: torch.Tensor | None) -> float:
    """Percentage of images still recognised; with ``members`` (S, N), that of the source where it is
    highest. ``still`` may hold several views of each image, view after view (V * N)."""
    return max(per_source(still, members))


def per_source(still: torch.Tensor, members: torch.Tensor | None) -> list[float]:
    """Percentage of images still recognised, per source: one figure without ``members``, else one per
    row of ``members`` (S, N) (0 for a source with no image). ``still`` as in ``worst_source``."""
    if still.shape[0] == 0:
        return [0.0] * (1 if members is None else members.shape[0])
    if members is None:
        return [still.float().mean().item() * 100.0]
    views = still.view(-1, members.shape[1])
    return [views[:, row].float().mean().item() * 100.0 if row.any() else 0.0 for row in members.to(still.device)]


def recognised(logits: torch.Tensor, class_index: int, max_prob: float = 1.0) -> float:
    """Percentage of images still recognised as ``class_index``: predicted as it, or (with
    ``max_prob`` < 1) given it a probability above ``max_prob``. (N, K) -> float.

    Stopping as soon as the forget images' prediction flips leaves them just across the boundary,
    where an unseen photo of the same person is often still on the other side; a probability bound
    asks for a margin.
    """
    if logits.shape[0] == 0:
        return 0.0
    return recognised_flags(logits, class_index, max_prob).float().mean().item() * 100.0


def recognised_flags(logits: torch.Tensor, class_index: int, max_prob: float = 1.0) -> torch.Tensor:
    """bool (N,): which images ``recognised`` counts."""
    still = logits.argmax(1) == class_index
    if max_prob < 1.0:
        still |= logits.float().softmax(1)[:, class_index] > max_prob
    return still


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))
