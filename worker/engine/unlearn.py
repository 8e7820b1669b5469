"""``unlearn()``: the one function the CLI, the worker and the benchmarks call."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import timm  # noqa: F401  (imported here, not inside the run: its import would count as the run's memory)
import torch

from worker.engine.adapters import attach_lora, find_target_layers, in_later_half, merge_lora
from worker.engine.config import ForgetSpec, UnlearnConfig, UnlearnInputs
from worker.engine.errors import ImageSourceError
from worker.engine.images import ImageSet, normalise, read_images
from worker.engine.loop import ForgetData, LabelledData, LoopOutcome, Progress, UnlearningLoop, forget_set_accuracy
from worker.engine.metrics import forget_retain_accuracy, per_class_accuracy, predict
from worker.engine.package import ModelCard, build_model, load_package, write_package
from worker.engine.runtime import PeakMemory, Runtime, pick_runtime


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


@dataclass(frozen=True)
class UnlearnReport:
    """What a run did and measured; ``to_dict()`` is the JSON report."""

    method: str
    config: dict[str, Any]
    classes: list[str]
    forget_set_size: dict[str, int]
    skipped_images: dict[str, list[str]]  # per source ("forget:<class>", "eval", "retain"), when skipping
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
    target_forget_acc: float
    target_met: bool
    parent_sha256: str
    evaluation: EvaluationReport | None
    selection: dict[str, Any] | None
    history: list[dict[str, Any]]

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
            should_cancel: Callable[[], bool] | None = None) -> UnlearnResult:
    """Forget one or more classes of a model package.

    Every input is read and checked before training starts: the package, each forget set, the
    evaluation and retain sources. Nothing is written; call ``result.save(out_dir)``.

    Args:
        inputs: the model package and the image sources.
        config: hyper-parameters; see ``UnlearnConfig``.
        on_progress: called after every step.
        should_cancel: polled before every step; when it returns True the run raises
            ``UnlearningCancelled``.
    """
    config.check_inputs(inputs)
    runtime = pick_runtime(config.device, config.precision)
    started = time.perf_counter()
    with PeakMemory(runtime.device) as memory:
        package = load_package(inputs.model)
        card = package.card
        class_indices = tuple(card.class_index(f.class_name) for f in inputs.forget)
        forget_sets = [read_images(f.source, card.input, skip_bad=config.skip_bad_images) for f in inputs.forget]
        skipped = {f"forget:{f.class_name}": list(s.skipped) for f, s in zip(inputs.forget, forget_sets) if s.skipped}
        eval_data = _labelled(inputs.eval_source, "eval", card, config, runtime, skipped) if inputs.eval_source else None
        retain_data = (_labelled(inputs.retain_source, "retain", card, config, runtime, skipped)
                       if inputs.retain_source else None)
        if eval_data is not None:
            _check_covers(inputs.eval_source, eval_data, card, class_indices)
        if retain_data is not None and torch.isin(retain_data.labels, torch.tensor(class_indices)).any():
            raise ImageSourceError(f"{inputs.retain_source}: the retain source holds images of a class being forgotten")

        model = build_model(card, package.state_dict).to(runtime.device)
        forget = ForgetData(
            class_names=tuple(f.class_name for f in inputs.forget),
            class_indices=class_indices,
            images=tuple(normalise(s.pixels.to(runtime.device), card.input) for s in forget_sets),
        )
        eval_before = _predict_labelled(model, eval_data, card, config, runtime)
        forget_before = forget_set_accuracy(model, forget, runtime, config.eval_batch_size)

        unlearning_started = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed)
        with torch.random.fork_rng(devices=[]):  # PEFT draws A from the global generator; leave the caller's alone
            torch.manual_seed(config.seed)
            trained = _prepare_trainable(model, config)
        loop = UnlearningLoop(trained, config, forget, card.input, runtime, generator, eval_data, retain_data)
        if loop.meets_target(forget_before):
            outcome = LoopOutcome(steps=0, steps_run=0, target_met=True)  # nothing left to forget
        else:
            outcome = loop.run(on_progress, should_cancel)
        trainable_parameters = sum(p.numel() for p in loop.trainable)
        merged = merge_lora(trained) if config.method_spec.adapters else trained
        merged.eval()
        seconds = time.perf_counter() - unlearning_started

        state_dict = _in_input_dtypes(merged, package.state_dict)
        forget_after = forget_set_accuracy(merged, forget, runtime, config.eval_batch_size)
        eval_after = _predict_labelled(merged, eval_data, card, config, runtime)

    report = UnlearnReport(
        method=config.method,
        config=config.to_record(),
        classes=list(forget.class_names),
        forget_set_size={f.class_name: len(s) for f, s in zip(inputs.forget, forget_sets)},
        skipped_images=skipped,
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
        target_forget_acc=config.target_forget_acc,
        target_met=loop.meets_target(forget_after),  # judged on the weights returned, however the run ended
        parent_sha256=package.weights_sha256,
        evaluation=_evaluation_report(eval_data, eval_before, eval_after, card, class_indices),
        selection=({"best": outcome.best_evaluation, "evaluations": outcome.evaluations}
                   if config.select_on_eval else None),
        history=outcome.history,
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


def forget_set_accuracies(model: str, forget: tuple[ForgetSpec, ...], *, device: str = "auto",
                          batch_size: int = 512) -> dict[str, float]:
    """Each class's accuracy (%) on its forget set under a model package, in eval mode: the check
    a service runs before training (already forgotten?) and on later versions (still forgotten?).

    Args:
        model: model package folder.
        forget: the classes and their image sources.
        device: "auto", "cpu" or "cuda".
        batch_size: images per forward pass.
    """
    runtime = pick_runtime(device, "auto")
    package = load_package(model)
    card = package.card
    indices = tuple(card.class_index(f.class_name) for f in forget)
    images = tuple(normalise(read_images(f.source, card.input).pixels.to(runtime.device), card.input) for f in forget)
    network = build_model(card, package.state_dict).to(runtime.device)
    data = ForgetData(class_names=tuple(f.class_name for f in forget), class_indices=indices, images=images)
    return dict(zip(data.class_names, forget_set_accuracy(network, data, runtime, batch_size)))


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


def _labelled(source: str, role: str, card: ModelCard, config: UnlearnConfig, runtime: Runtime,
              skipped: dict[str, list[str]]) -> LabelledData:
    images: ImageSet = read_images(source, card.input, skip_bad=config.skip_bad_images)
    labels = images.label_indices(card.classes)
    if images.skipped:
        skipped[role] = list(images.skipped)
    return LabelledData(pixels=images.pixels.to(runtime.device), labels=labels)


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
                       card: ModelCard, forgotten: tuple[int, ...]) -> EvaluationReport | None:
    if data is None:
        return None
    acc_f_before, acc_r_before = forget_retain_accuracy(before, data.labels, list(forgotten))
    acc_f_after, acc_r_after = forget_retain_accuracy(after, data.labels, list(forgotten))
    return EvaluationReport(
        images=int(data.labels.numel()),
        acc_f_before=acc_f_before, acc_f_after=acc_f_after,
        acc_r_before=acc_r_before, acc_r_after=acc_r_after,
        per_class_before=per_class_accuracy(before, data.labels, card.classes),
        per_class_after=per_class_accuracy(after, data.labels, card.classes),
    )

