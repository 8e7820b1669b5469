"""``unlearn()``: the one function the CLI, the worker and the benchmarks call."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import timm  # noqa: F401  (imported here, not inside the run: its import would count as the run's memory)
import torch

from worker.engine.adapters import attach_lora, find_target_layers, in_later_half, merge_lora
from worker.engine.config import ForgetSpec, UnlearnConfig, UnlearnInputs
from worker.engine.errors import ImageSourceError
from worker.engine.evidence import EvidenceConfig, features, parent_and_new
from worker.engine.head import classifier, reset_class_rows, row_cosines, rows_to_reset
from worker.engine.duplicates import any_near, distinct_count, first_copies, groups, near, thumbnails
from worker.engine.halves import AUDIT, SELECTION, split_halves
from worker.engine.images import ImageReader, ImageSet, normalise, set_digest
from worker.engine.loop import (ForgetData, LabelledData, LoopOutcome, Progress, UnlearningLoop, forget_set_accuracy,
                                forget_source_accuracy)
from worker.engine.metrics import forget_retain_accuracy, per_class_accuracy, predict
from worker.engine.package import InputSpec, ModelCard, build_model, load_package, write_package
from worker.engine.runtime import PeakMemory, Runtime, pick_runtime
from worker.engine.timings import Timings


WHOLE = "whole"  # the evaluation set uncut (no halves)


@dataclass(frozen=True)
class EvaluationReport:
    """Accuracy on the labelled held-out split, before and after (percentages)."""

    images: int
    acc_f_before: float
    acc_f_after: float
    acc_r_before: float
    acc_r_after: float
    per_class_before: dict[str, float | None]
    per_class_after: dict[str, float | None]
    half: str = WHOLE  # AUDIT when the set was cut in halves (config.eval_halves; halves.py)
    # Images of each class in the set the figures come from: one image of 18 is 5.6 points, so a
    # reader (and a gate) needs the count beside each class's accuracy.
    per_class_images: dict[str, int] = field(default_factory=dict)
    # Acc_f of the trained network before the forgotten classes' head rows were reset
    # (config.reset_head_rows): what the gate judges, the reset alone putting acc_f_after at 0.
    # None: no reset, acc_f_after is that figure.
    acc_f_trained: float | None = None
    per_class_trained: dict[str, float | None] | None = None  # each class's, likewise


@dataclass(frozen=True)
class HoldoutReport:
    """The generalisation check: forget sets cut into ``folds`` folds; for each fold run, a fresh
    copy of the model forgot the rest and was scored on the held-back images it never trained on."""

    folds: int  # the folds each forget set was cut into
    folds_run: int  # fewer when enough images were held back early (config.holdout_images)
    held_back: dict[str, int]  # per class: held-back images scored (those the original model recognised)
    forget_acc: dict[str, float | None]  # per class: % of those still recognised; None: none to score
    not_recognised: dict[str, int]  # per class: held-back images the original did not recognise either (not scored)
    steps: list[int]  # per fold run
    seconds: float
    seed: int = 0  # the folds' and fold trainings' seed


@dataclass(frozen=True)
class UnlearnReport:
    """What a run did and measured; ``to_dict()`` is the JSON report."""

    method: str
    config: dict[str, Any]
    classes: list[str]
    forget_set_size: dict[str, int]
    skipped_images: dict[str, list[str]]  # per source ("forget:<class>", "eval", "retain"), when skipping
    forget_duplicates: dict[str, int]  # per class: exact copies of another forget image, dropped before training
    forget_set_sha256: dict[str, str]  # per class: images.set_digest of the files it was given
    steps: int
    steps_run: int
    seconds: float  # adapters attached -> merged: the unlearning itself
    total_seconds: float  # including loading, decoding and evaluation
    trainable_parameters: int
    optimizer_state_bytes: int
    peak_memory_bytes: int | None
    device: str
    precision: str
    forget_acc_before: dict[str, float]
    forget_acc_after: dict[str, float]
    # Per class: the forget set's accuracy on the trained network before the head rows were reset
    # (config.reset_head_rows; the same as forget_acc_after without it). The target is judged on it:
    # the reset alone puts every forget set at 0 %, features that still hold the class or not.
    forget_acc_trained: dict[str, float]
    # ... and per source of each class (ForgetSpec.sources, in that order): each request's own set
    # when several requests forget one class, judged apart by the service's gate.
    forget_source_acc_trained: dict[str, list[float]]
    target_forget_acc: float
    target_met: bool  # every forget set's (trained) accuracy at or below the target
    stop_rule_met: bool  # and the stop rule's views and probability bound too, when it has them
    parent_sha256: str
    evaluation: EvaluationReport | None
    holdout: HoldoutReport | None  # the generalisation check, when config.holdout_folds asks for it
    # per class: probe, loss-MIA and relearning on the original ("before") and the new model ("after"),
    # measured on the evaluation set's audit half (or the whole set without halves); config.evidence
    residual_knowledge: dict[str, dict[str, Any]] | None
    anchor_images: int  # images in the anchor source (0: none)
    synthetic_anchor_images: int  # inputs synthesised as the anchor (config.synthetic_anchor, no anchor source)
    # With config.feature_weight: whether the feature term ran, and with head-row prototypes each
    # forgotten class's row cosine with its forget images' mean feature, which decides it
    # (config.head_template_cosine). None without the term.
    feature_term: dict[str, Any] | None
    # With config.erase_weight: the selection half's images it trained on (``half``: never the audit
    # half's) and, on the weights trained, each class's squared gap between its mean feature and the
    # kept classes' on them, over the original's (the stop rule's figure). None without it.
    erasure: dict[str, Any] | None
    selection: dict[str, Any] | None
    history: list[dict[str, Any]]
    # Where total_seconds went: {phase: {"seconds", "count"}}, each phase's seconds without those
    # nested in it (timings.py); the caller's own phases too when it passed its Timings.
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UnlearnResult:
    """The report, and the merged model as a new package's contents (not written yet)."""

    report: UnlearnReport
    card: dict[str, Any]  # the input card with one more lineage entry
    state_dict: dict[str, torch.Tensor]  # same keys and shapes as the input; no adapter tensors

    @property
    def target_met(self) -> bool:
        return self.report.target_met

    def save(self, out_dir: str) -> str:
        """Write the new model package atomically; returns the weights' sha256."""
        return write_package(out_dir, self.card, self.state_dict)


def unlearn(inputs: UnlearnInputs, config: UnlearnConfig = UnlearnConfig(), *,
            on_progress: Callable[[Progress], None] | None = None,
            should_cancel: Callable[[], bool] | None = None, timings: Timings | None = None) -> UnlearnResult:
    """Forget one or more classes of a model package.

    Every input is read and checked before training starts: the package, each forget set, the
    evaluation and retain sources. Nothing is written; call ``result.save(out_dir)``.

    Args:
        inputs: the model package and the image sources.
        config: hyper-parameters; see ``UnlearnConfig``.
        on_progress: called after every step (``Progress.phase`` tells the generalisation
            check's fold runs from the run itself).
        should_cancel: polled before every step; when it returns True the run raises
            ``UnlearningCancelled``.
        timings: where the run's phases are timed (the caller's, to time its own phases around
            this one); the report's ``timings`` holds them either way.
    """
    config.check_inputs(inputs)
    timings = timings if timings is not None else Timings()
    runtime = pick_runtime(config.device, config.precision)
    started = time.perf_counter()
    with PeakMemory(runtime.device) as memory, timings.phase("engine"):
        with timings.phase("load package"):
            package = load_package(inputs.model)
        card = package.card
        class_indices = tuple(card.class_index(f.class_name) for f in inputs.forget)
        reset_rows = _rows_to_reset(card, class_indices) if config.reset_head_rows else ()
        reader = ImageReader(inputs.read_limits, config.skip_bad_images, should_cancel)
        with timings.phase("read forget sets"):
            forget_sets = [read_forget_set(f, card.input, reader) for f in inputs.forget]
        skipped = {f"forget:{f.class_name}": list(s.skipped) for f, s in zip(inputs.forget, forget_sets) if s.skipped}
        with timings.phase("read evaluation set"):
            eval_data = (_labelled(inputs.eval_source, "eval", card, reader, runtime, skipped)
                         if inputs.eval_source else None)
        # With halves, the checkpoint is selected on one half and judged on the other (halves.py).
        selection_data = eval_data
        if eval_data is not None and config.eval_halves:
            halves = split_halves([card.classes[i] for i in eval_data.labels.tolist()], eval_data.sha256)
            selection_data, eval_data = eval_data.subset(halves.selection), eval_data.subset(halves.audit)
        retain_data = (_labelled(inputs.retain_source, "retain", card, reader, runtime, skipped)
                       if inputs.retain_source else None)
        anchor = (_anchor(inputs.anchor_source, card, reader, runtime, skipped, forget_sets)
                  if inputs.anchor_source else None)
        if eval_data is not None:
            _check_covers(inputs.eval_source, eval_data, card, class_indices)
        # The erasure trains on the selection half (select_on_eval is refused with it: nothing selects on it).
        if config.erase_weight > 0:
            selection_data = _erasure_data(inputs.eval_source, selection_data, eval_data, card, class_indices)
        if retain_data is not None and torch.isin(retain_data.labels, torch.tensor(class_indices)).any():
            raise ImageSourceError(f"{inputs.retain_source}: the retain source holds images of a class being forgotten")

        with timings.phase("build model"):
            model = build_model(card, package.state_dict).to(runtime.device)
        if reset_rows:
            classifier(model)  # a head it cannot reset is refused before any training, not after
        forget = ForgetData(
            class_names=tuple(f.class_name for f in inputs.forget),
            class_indices=class_indices,
            images=tuple(normalise(s.pixels.to(runtime.device), card.input) for s in forget_sets),
            members=tuple(s.members for s in forget_sets),
        )
        with timings.phase("measure before"):
            eval_before = _predict_labelled(model, eval_data, card, config, runtime)
            forget_before = forget_set_accuracy(model, forget, runtime, config.eval_batch_size)
        training = Training(config, card.input, runtime, retain_data, anchor, should_cancel, timings)
        with timings.phase("generalisation check"):
            holdout = (holdout_check(training, lambda: build_model(card, package.state_dict).to(runtime.device),
                                     forget, on_progress, selection_data) if config.holdout_folds else None)

        unlearning_started = time.perf_counter()
        with timings.phase("unlearn"):
            trained, loop, outcome = training.run(model, forget, forget_before, selection_data, on_progress)
        # The stop rule's own measure (its views and probability bound) on the trained weights. It is
        # reported apart from the target: a run can forget its images (the target) without reaching
        # the margin it was asked to train for within max_steps (measured: 2 of 7 CIFAR-10 runs of 20
        # images); whether that forgetting generalises is the generalisation check's to say.
        if loop.erase is not None and loop.erase.weights_moved != 0:  # a stop rule met on a fresh aim needs none
            loop.aim_erasure()
        stop_rule_met = loop.meets_target(loop.forget_accuracy()) and loop.erasure_met()
        erasure = ({"half": SELECTION, "images": int(loop.erase.labels.numel()),
                    "gap": {c: round(g, 4) for c, g in zip(forget.class_names, loop.erase.gaps_now)}}
                   if loop.erase is not None else None)
        trainable_parameters = sum(p.numel() for p in loop.trainable)
        with timings.phase("merge adapters"):
            merged = merge_lora(trained) if config.method_spec.adapters else trained
        merged.eval()
        seconds = time.perf_counter() - unlearning_started

        state_dict = _in_input_dtypes(merged, package.state_dict)
        with timings.phase("measure after"):
            trained_sources = forget_source_accuracy(merged, forget, runtime, config.eval_batch_size)
            forget_after = [max(per_source) for per_source in trained_sources]
            eval_after = _predict_labelled(merged, eval_data, card, config, runtime)
        forget_trained, eval_trained = forget_after, None
        if reset_rows:
            reset_class_rows(merged, reset_rows)
            state_dict = _in_input_dtypes(merged, package.state_dict)
            eval_trained = eval_after
            with timings.phase("measure after"):
                forget_after = forget_set_accuracy(merged, forget, runtime, config.eval_batch_size)
                eval_after = _predict_labelled(merged, eval_data, card, config, runtime)
        with timings.phase("residual knowledge"):
            residual = (_residual_knowledge(lambda: build_model(card, package.state_dict).to(runtime.device), merged,
                                            forget, eval_data, card, config) if config.evidence else None)

    report = UnlearnReport(
        method=config.method,
        config=config.to_record(),
        classes=list(forget.class_names),
        forget_set_size={f.class_name: len(s) for f, s in zip(inputs.forget, forget_sets)},
        skipped_images=skipped,
        forget_duplicates={f.class_name: s.duplicates for f, s in zip(inputs.forget, forget_sets)},
        forget_set_sha256={f.class_name: s.digest for f, s in zip(inputs.forget, forget_sets)},
        steps=outcome.steps,
        steps_run=outcome.steps_run,
        seconds=round(seconds, 3),
        total_seconds=round(time.perf_counter() - started, 3),
        trainable_parameters=trainable_parameters,
        optimizer_state_bytes=outcome.optimizer_state_bytes,
        peak_memory_bytes=memory.peak_bytes,
        device=str(runtime.device),
        precision=runtime.precision,
        forget_acc_before=dict(zip(forget.class_names, forget_before)),
        forget_acc_after=dict(zip(forget.class_names, forget_after)),
        forget_acc_trained=dict(zip(forget.class_names, forget_trained)),
        forget_source_acc_trained=dict(zip(forget.class_names, trained_sources)),
        target_forget_acc=config.target_forget_acc,
        target_met=loop.meets_target(forget_trained),  # judged on the weights trained, however the run ended
        stop_rule_met=stop_rule_met,
        parent_sha256=package.weights_sha256,
        evaluation=_evaluation_report(eval_data, eval_before, eval_after, card, class_indices,
                                      half=AUDIT if config.eval_halves else WHOLE, trained=eval_trained),
        holdout=holdout,
        residual_knowledge=residual,
        anchor_images=0 if anchor is None else int(anchor.shape[0]),
        synthetic_anchor_images=(0 if anchor is not None or loop.anchor_inputs is None
                                 else int(loop.anchor_inputs.shape[0])),
        feature_term=({"applied": loop.feature_term, "prototypes": config.feature_prototypes,
                       "head_row_cosine": loop.head_row_cosine} if config.feature_weight > 0 else None),
        erasure=erasure,
        selection=({"best": outcome.best_evaluation, "selected_by": outcome.selected_by, "evaluations": outcome.evaluations,
                    "half": SELECTION if config.eval_halves else WHOLE, "images": int(selection_data.labels.numel())}
                   if config.select_on_eval else None),
        history=outcome.history,
        timings=timings.to_dict(),
    )
    lineage = {
        "parent_sha256": package.weights_sha256,
        "method": config.method,
        "config": report.config,
        "classes_forgotten": report.classes,
        "steps": report.steps,
        "seconds": report.seconds,
        "target_met": report.target_met,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return UnlearnResult(report=report, card=card.with_lineage(lineage), state_dict=state_dict)


@dataclass(frozen=True)
class ForgetSetFacts:
    """What a service checks of a forget set under a model, from one read of it."""

    accuracy: float  # % of its images the model predicts as the class
    images: int  # its images, exact copies counted once
    distinct: int  # its different photos, near-copies counted once: what size rules count
    digest: str  # images.set_digest of its files: what a requester checks their photos against
    # Its head row's cosine with its images' mean pre-logit feature: whether the model's rows are its
    # classes' templates, which decides whether head-row prototypes can stand for them
    # (UnlearnConfig.head_template_cosine; the service's setting for such models). None unless asked
    # for (``with_row_cosine``): it costs a second pass over the set.
    row_cosine: float | None


def forget_set_facts(model: str, forget: tuple[ForgetSpec, ...], *, device: str = "auto",
                     batch_size: int = 512, reader: ImageReader = ImageReader(),
                     with_row_cosine: bool = False) -> dict[str, ForgetSetFacts]:
    """Each class's forget set under a model package, in eval mode: its accuracy (already forgotten?
    still forgotten on a later version?) and how many images and different photos it holds.

    Args:
        model: model package folder.
        forget: the classes and their image sources.
        device: "auto", "cpu" or "cuda".
        batch_size: images per forward pass.
        reader: the limits the sources must keep, and what stops a long read.
        with_row_cosine: also each class's head-row cosine (a second pass; what a run's setting needs).
    """
    runtime = pick_runtime(device, "auto")
    package = load_package(model)
    card = package.card
    indices = tuple(card.class_index(f.class_name) for f in forget)
    sets = [read_forget_set(f, card.input, reader) for f in forget]
    images = tuple(normalise(s.pixels.to(runtime.device), card.input) for s in sets)
    network = build_model(card, package.state_dict).to(runtime.device)
    data = ForgetData(class_names=tuple(f.class_name for f in forget), class_indices=indices, images=images)
    accuracies = forget_set_accuracy(network, data, runtime, batch_size)
    cosines: list[float | None] = [None] * len(sets)
    if with_row_cosine:
        with torch.no_grad(), runtime.autocast():
            cosines = row_cosines(classifier(network).weight.detach(), indices,
                                  [features(network, x, batch_size) for x in images])
    return {f.class_name: ForgetSetFacts(acc, len(s), distinct_count(s.pixels), s.digest, cosine)
            for f, s, acc, cosine in zip(forget, sets, accuracies, cosines)}


def forget_set_accuracies(model: str, forget: tuple[ForgetSpec, ...], **options) -> dict[str, float]:
    """Each class's accuracy (%) on its forget set under a model package (see ``forget_set_facts``)."""
    return {c: facts.accuracy for c, facts in forget_set_facts(model, forget, **options).items()}


def read_forget_set(forget: ForgetSpec, spec: InputSpec, reader: ImageReader = ImageReader()) -> ImageSet:
    """A class's images from every source it was given, as one set, each image once: an exact copy
    (same decoded pixels) of another is dropped and counted in ``duplicates``."""
    sets = [reader.read(source, spec) for source in forget.sources]
    pixels = torch.cat([s.pixels for s in sets])
    labels = tuple(label for s in sets for label in s.labels)
    first = first_copies(pixels)
    keep = first == torch.arange(pixels.shape[0])
    members = None
    if len(sets) > 1:
        position = torch.cumsum(keep, 0) - 1  # where each kept image lands in the set
        members = torch.zeros(len(sets), int(keep.sum()), dtype=torch.bool)
        offset = 0
        for row, part in enumerate(sets):
            members[row, position[first[offset:offset + len(part)]]] = True
            offset += len(part)
    hashes = [h for s in sets for h in s.sha256]
    return ImageSet(source=" + ".join(s.source for s in sets), pixels=pixels[keep],
                    labels=tuple(label for label, k in zip(labels, keep.tolist()) if k),
                    skipped=tuple(name for s in sets for name in s.skipped), duplicates=int((~keep).sum()),
                    members=members, sha256=tuple(h for h, k in zip(hashes, keep.tolist()) if k),
                    digest=set_digest(hashes))


@dataclass(frozen=True)
class Training:
    """What every training of a run shares: the run itself and each fold of its generalisation check."""

    config: UnlearnConfig
    spec: InputSpec
    runtime: Runtime
    retain_data: LabelledData | None
    anchor: torch.Tensor | None
    should_cancel: Callable[[], bool] | None
    timings: Timings = field(default_factory=Timings)

    def run(self, model: torch.nn.Module, forget: ForgetData, forget_before: list[float],
            eval_data: LabelledData | None = None, on_progress: Callable[[Progress], None] | None = None,
            config: UnlearnConfig | None = None) -> tuple[torch.nn.Module, UnlearningLoop, LoopOutcome]:
        """Attach adapters to ``model`` (or unfreeze it) and train it on ``forget``; nothing to do
        when ``forget_before`` already meets the target."""
        config = config or self.config
        generator = torch.Generator().manual_seed(config.seed)
        with torch.random.fork_rng(devices=[]):  # PEFT draws A from the global generator; leave the caller's alone
            torch.manual_seed(config.seed)
            trained = _prepare_trainable(model, config)
        with self.timings.phase("set-up"):
            loop = UnlearningLoop(trained, config, forget, self.spec, self.runtime, generator, eval_data,
                                  self.retain_data, self.anchor, timings=self.timings)
        # Nothing left to forget, by the stop rule's own measure (its views and probability bound).
        if loop.meets_target(forget_before) and (loop.confirm_views is None and config.max_forget_prob >= 1.0
                                                 or loop.meets_target(loop.forget_accuracy())) and loop.erasure_met():
            return trained, loop, LoopOutcome(steps=0, steps_run=0, target_met=True)
        return trained, loop, loop.run(on_progress, self.should_cancel)


def holdout_check(training: Training, fresh_model: Callable[[], torch.nn.Module], forget: ForgetData,
                  on_progress: Callable[[Progress], None] | None = None,
                  selection_data: LabelledData | None = None) -> HoldoutReport:
    """Does the forgetting generalise beyond the images trained on? Cut each forget set into
    folds (by a permutation drawn from the seed); per fold, a fresh model forgets the other folds
    with the run's own stop rule (selection on an evaluation set is the run's, not the check's),
    and the fold's images, never trained on, are scored. A class of one image cannot be checked:
    it is trained on in every fold and reported as None.

    Args:
        training: the run's settings and shared data.
        fresh_model: builds an untouched copy of the original model on the run's device.
        forget: the run's forget sets.
        on_progress: gets each fold's steps, with ``phase`` "holdout i/k".
        selection_data: the evaluation set's selection half, which the erasure trains on (each fold's
            run as the run's own); no fold selects a checkpoint on it.
    """
    started, config = time.perf_counter(), training.config
    seed = config.seed if config.check_seed is None else config.check_seed
    generator = torch.Generator().manual_seed(seed)
    # Near-duplicates (one photo re-encoded, resized...) share a fold: a copy of a held-back image
    # in the training folds would make the held-back image seen.
    folds = [_group_folds(_pixels(x, training.spec), config.holdout_folds, generator) for x in forget.images]
    # Only held-back images the original recognises as the class can show anything: an image it
    # never recognised (another person's photo, padding) would count as "forgotten" for free.
    original = fresh_model()
    known = [predict(original, x, training.runtime, config.eval_batch_size) == i
             for x, i in zip(forget.images, forget.class_indices)]
    del original
    held = [0] * len(forget.images)
    unknown = [0] * len(forget.images)
    recognised = [0] * len(forget.images)
    steps: list[int] = []
    fold_config = dataclasses.replace(config, select_on_eval=False, seed=seed)
    for j in range(config.holdout_folds):
        if all(f is None or j >= len(f) or n >= config.holdout_images for f, n in zip(folds, held)):
            break
        parts = [_fold(x, f, j) for x, f in zip(forget.images, folds)]
        scoring = [_fold(k, f, j)[1] for k, f in zip(known, folds)]
        # The check scores a class's held-back images together, so its folds train on the union too.
        fold_forget = dataclasses.replace(forget, images=tuple(train for train, _ in parts), members=())
        model = fresh_model()
        before = forget_set_accuracy(model, fold_forget, training.runtime, config.eval_batch_size)
        phase = f"holdout {j + 1}/{config.holdout_folds}"
        report_progress = (lambda p: on_progress(dataclasses.replace(p, phase=phase))) if on_progress else None
        trained, _, outcome = training.run(model, fold_forget, before, selection_data, report_progress, fold_config)
        for c, ((_, held_out), mask) in enumerate(zip(parts, scoring)):
            scored = held_out[mask]
            unknown[c] += int((~mask).sum())
            if scored.shape[0]:
                predictions = predict(trained, scored, training.runtime, config.eval_batch_size)
                recognised[c] += int((predictions == forget.class_indices[c]).sum())
                held[c] += scored.shape[0]
        steps.append(outcome.steps)
    return HoldoutReport(
        folds=config.holdout_folds, folds_run=len(steps),
        held_back=dict(zip(forget.class_names, held)),
        forget_acc={name: (100.0 * r / n if f is not None and n else None)
                    for name, f, r, n in zip(forget.class_names, folds, recognised, held)},
        not_recognised=dict(zip(forget.class_names, unknown)),
        steps=steps, seconds=round(time.perf_counter() - started, 3), seed=seed,
    )


def _pixels(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Normalised inputs back in [0, 1]."""
    mean = torch.tensor(spec.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, -1, 1, 1)
    return (images * std + mean).cpu()


def _group_folds(images: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, ...] | None:
    """Up to ``k`` folds of image indices, near-duplicates always in the same fold (groups in an order
    drawn from ``generator``); None when the set holds fewer than two different photos."""
    group_of = groups(images)
    count = int(group_of.max()) + 1 if len(group_of) else 0
    if count < 2:
        return None
    order = torch.randperm(count, generator=generator).tensor_split(min(k, count))
    return tuple(torch.isin(group_of, members).nonzero().flatten() for members in order)


def _fold(images: torch.Tensor, folds: tuple[torch.Tensor, ...] | None, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images trained on, images held back) of fold ``j``; every image is trained on when the set
    cannot be checked or has fewer folds than ``j``."""
    if folds is None or j >= len(folds):
        return images, images[:0]
    keep = torch.ones(images.shape[0], dtype=torch.bool)
    keep[folds[j]] = False
    keep = keep.to(images.device)
    return images[keep], images[~keep]


def _prepare_trainable(model: torch.nn.Module, config: UnlearnConfig) -> torch.nn.Module:
    """Attach adapters (only they train), or unfreeze every weight for the full-model methods."""
    if config.method_spec.adapters:
        layers = find_target_layers(model, config.targets)
        if config.adapter_blocks == "later-half":
            layers = in_later_half(model, layers)
        return attach_lora(model, layers, config.rank)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _labelled(source: str, role: str, card: ModelCard, reader: ImageReader, runtime: Runtime,
              skipped: dict[str, list[str]]) -> LabelledData:
    images: ImageSet = reader.read(source, card.input)
    labels = images.label_indices(card.classes)
    if images.skipped:
        skipped[role] = list(images.skipped)
    return LabelledData(pixels=images.pixels.to(runtime.device), labels=labels, sha256=images.sha256)


def _anchor(source: str, card: ModelCard, reader: ImageReader, runtime: Runtime,
            skipped: dict[str, list[str]], forget_sets: list[ImageSet]) -> torch.Tensor:
    """The anchor images normalised on the device, once checked apart from the forget sets; their
    labels (folder names) mean nothing here."""
    images = reader.read(source, card.input)
    if images.skipped:
        skipped["anchor"] = list(images.skipped)
    _check_anchor_apart(source, forget_sets, images.pixels)
    return normalise(images.pixels.to(runtime.device), card.input)


def _check_anchor_apart(source: str, forget_sets: list[ImageSet], anchor_pixels: torch.Tensor) -> None:
    """An anchor holding a forget image would hold the original's output on it in place, against the
    forgetting, and would show every fold of the generalisation check the images it holds back."""
    if any(any_near(anchor_pixels, s.pixels) for s in forget_sets):  # a copy, re-encoded or touched up, too
        raise ImageSourceError(f"{source}: the anchor source holds images of a forget set (or near-copies of them)")


def _in_input_dtypes(merged: torch.nn.Module, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged weights in the input's dtypes (an fp16 package stays fp16), loaded back into
    ``merged`` so that what is measured afterwards is what gets written."""
    state = merged.state_dict()
    if state.keys() != original.keys():
        raise RuntimeError("merged model's keys differ from the input's")  # a bug, not bad input
    cast = {k: v.detach().to("cpu", dtype=original[k].dtype).contiguous() for k, v in state.items()}
    if any(v.dtype != state[k].dtype for k, v in cast.items()):
        merged.load_state_dict(cast)
    return cast


def _residual_knowledge(original: Callable[[], torch.nn.Module], merged: torch.nn.Module, forget: ForgetData,
                        audit: LabelledData, card: ModelCard, config: UnlearnConfig) -> dict[str, dict[str, Any]]:
    """evidence.parent_and_new for each forgotten class, on the audit images (never trained on)."""
    parent = original()
    audit_pixels = normalise(audit.pixels, card.input)
    seed = config.seed if config.check_seed is None else config.check_seed
    measured_on = AUDIT if config.eval_halves else WHOLE
    found = {name: {**parent_and_new(parent, merged, forget_images=images, audit_pixels=audit_pixels,
                                     audit_labels=audit.labels, class_index=index, seed=seed,
                                     config=EvidenceConfig(eval_batch_size=config.eval_batch_size)),
                    "measured_on": measured_on}
             for name, index, images in zip(forget.class_names, forget.class_indices, forget.images)}
    del parent
    return found


def _rows_to_reset(card: ModelCard, class_indices: tuple[int, ...]) -> tuple[int, ...]:
    """The head rows ``reset_head_rows`` sets: this run's classes and every class the card's lineage
    says an earlier version forgot (their rows are reset again, to the mean of today's kept rows);
    checked here so that a model it cannot serve is refused before any training."""
    earlier = tuple(card.class_index(c) for c in card.forgotten_classes if c in card.classes)
    return rows_to_reset(len(card.classes), class_indices + earlier)


def _erasure_data(source: str, selection: LabelledData, audit: LabelledData, card: ModelCard,
                  forgotten: tuple[int, ...]) -> LabelledData:
    """The selection half's images the erasure trains on: none a near-copy of an audit-half image (the
    halves keep exact copies together, not a photo re-encoded), with images of every forgotten class
    and of a kept one among them."""
    apart = ~near(thumbnails(selection.pixels), thumbnails(audit.pixels)).any(1)
    data = selection.subset(apart.to(selection.labels.device))
    for index in forgotten:
        if not (data.labels == index).any():
            raise ImageSourceError(f"{source}: erase_weight: the selection half holds no image of "
                                   f"{card.classes[index]!r} apart from the audit half's (a class needs two "
                                   "different photos to have one in each half)")
    if torch.isin(data.labels, torch.tensor(forgotten)).all():
        raise ImageSourceError(f"{source}: erase_weight: the selection half holds no image of a class kept")
    return data


def _check_covers(source: str, data: LabelledData, card: ModelCard, forgotten: tuple[int, ...]) -> None:
    """An evaluation split must hold images of every class being forgotten and of some other class,
    or Acc_f / Acc_r would be reported for nothing."""
    present = set(data.labels.tolist())
    missing = [card.classes[i] for i in forgotten if i not in present]
    if missing:
        raise ImageSourceError(f"{source}: the evaluation source has no images of {', '.join(missing)}")
    if not present - set(forgotten):
        raise ImageSourceError(f"{source}: the evaluation source has no images of the classes kept")


def _predict_labelled(model: torch.nn.Module, data: LabelledData | None, card: ModelCard, config: UnlearnConfig,
                      runtime: Runtime) -> torch.Tensor | None:
    if data is None:
        return None
    return predict(model, data.pixels, runtime, config.eval_batch_size, card.input)


def _evaluation_report(data: LabelledData | None, before: torch.Tensor | None, after: torch.Tensor | None,
                       card: ModelCard, forgotten: tuple[int, ...], half: str,
                       trained: torch.Tensor | None = None) -> EvaluationReport | None:
    if data is None:
        return None
    acc_f_trained = None if trained is None else forget_retain_accuracy(trained, data.labels, list(forgotten))[0]
    acc_f_before, acc_r_before = forget_retain_accuracy(before, data.labels, list(forgotten))
    acc_f_after, acc_r_after = forget_retain_accuracy(after, data.labels, list(forgotten))
    return EvaluationReport(
        images=int(data.labels.numel()),
        acc_f_before=acc_f_before, acc_f_after=acc_f_after,
        acc_r_before=acc_r_before, acc_r_after=acc_r_after,
        per_class_before=per_class_accuracy(before, data.labels, card.classes),
        per_class_after=per_class_accuracy(after, data.labels, card.classes),
        half=half,
        per_class_images={name: int((data.labels == i).sum()) for i, name in enumerate(card.classes)},
        acc_f_trained=acc_f_trained,
        per_class_trained=None if trained is None else per_class_accuracy(trained, data.labels, card.classes),
    )

