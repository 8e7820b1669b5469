"""Residual knowledge: what a model still knows of a class its head no longer predicts.

An unlearned model can score 0 % on a class and still hold it: in features a linear probe reads
back, in losses that tell the images trained on from unseen ones, or in weights a few steps of
fine-tuning on a handful of images restore ("An Illusion of Unlearning?", ForgetGate). Auditors
ask for three measures, per forgotten class, on the parent version and on the new one:

- ``probe_accuracy``: a linear probe, cross-validated on a labelled audit set, scored on the class;
- ``loss_mia``: the NeurIPS 2023 unlearning kit's loss-based membership attack, forget images
  against unseen images of the class;
- ``relearn_accuracy``: the class's accuracy after k-shot fine-tuning of a copy of the model.

The audit set is labelled images of every class that no version of the model trained on (a
held-out split); the forget images are the class's forget set, which the parent trained on. Each
figure means most next to the same figure of a model that never saw the class (a retrained
oracle): features trained on the other classes separate a new class too.

Every forward pass runs in fp32 and eval mode; every figure is the same for the same seed on the CPU.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from worker.engine.errors import ConfigError, ImageSourceError
from worker.engine.metrics import accuracy, eval_logits, predict
from worker.engine.runtime import Runtime

PROBE_C = 1.0  # the probe's inverse L2 strength on standardised features: scikit-learn's default
PROBE_MAX_ITER = 1000  # lbfgs iterations; a probe that stops short is still the same probe for the same seed
Z_95 = 1.959964  # the normal quantile of a two-sided 95 % interval
LOSS_FLOOR = 1e-12  # losses below it (margins beyond ~28 nats) count as equally certain: log(0) is -inf


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class EvidenceConfig:
    """How the three measures are taken. Defaults follow the papers' protocols at their smallest."""

    probe_folds: int = 5  # at most; fewer when the audit set's smallest class has fewer images
    mia_folds: int = 10  # at most (the kit's 10); fewer when a side has fewer images
    relearn_k: int = 10  # forget images fine-tuned on (ForgetGate's smallest k), and as many of other classes
    # Ten full-batch Adam steps at 2e-4 on every weight: enough for a model that still holds the
    # class to give it back, too little to teach it to a model that never saw it. Measured on the
    # digits ViT (class 3, k = 10, two seeds): models unlearned by lora-bounded / lora-kl go from 0 %
    # to 73-81 / 86 %, the original with the class's head row zeroed to 49-81 %, and models trained
    # without the class (10-40 epochs) stay at 0-3 %. At 1e-4 the unlearned models reach only
    # 38-65 %; at 3e-4 an under-trained never-seen model is taught 14-46 %; at 1e-3 all reach ~97 %.
    # A larger ViT moves further per step: check against a retrained model there before trusting it.
    # A head muted outright (a bias of -100 on the class) stays at 0 % within this budget, though its
    # features hold the class whole: a low figure here is read with the probe's, not alone.
    relearn_steps: int = 10
    relearn_lr: float = 2e-4
    relearn_batch_size: int = 64  # images per forward pass; gradients add up to one full-batch step
    eval_batch_size: int = 512  # images per forward pass when measuring

    def __post_init__(self) -> None:
        checks = [
            (_is_int(self.probe_folds) and self.probe_folds >= 2, "probe_folds must be an integer of at least 2"),
            (_is_int(self.mia_folds) and self.mia_folds >= 2, "mia_folds must be an integer of at least 2"),
            (_is_int(self.relearn_k) and self.relearn_k >= 1, "relearn_k must be an integer of at least 1"),
            (_is_int(self.relearn_steps) and self.relearn_steps >= 1, "relearn_steps must be an integer of at least 1"),
            (isinstance(self.relearn_lr, (int, float)) and math.isfinite(self.relearn_lr) and self.relearn_lr > 0,
             "relearn_lr must be a positive number"),
            (_is_int(self.relearn_batch_size) and self.relearn_batch_size >= 1,
             "relearn_batch_size must be an integer of at least 1"),
            (_is_int(self.eval_batch_size) and self.eval_batch_size >= 1,
             "eval_batch_size must be an integer of at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class ProbeResult:
    """A linear probe on the model's features, trained on the audit set's other folds."""

    accuracy: float  # % of the class's audit images the probe assigns to the class (its recall)
    others_accuracy: float  # % of the other classes' audit images it gets right: what the features carry at all
    n: int  # audit images of the class
    folds: int
    seed: int
    # 95 % Wilson interval on ``accuracy`` over the class's n images, in %: with a person's few photos
    # it spans most of the scale. It treats cross-validated guesses as independent, as the MIA's does.
    interval: tuple[float, float]


@dataclass(frozen=True)
class MiaResult:
    """The loss-based membership attack: forget images (members) against unseen images of the class."""

    accuracy: float | None  # % of cross-validated guesses right; ~50: the attacker cannot tell; None: too few images
    interval: tuple[float, float] | None  # 95 % Wilson interval on ``accuracy``, in %
    n: int  # images per side, after the larger side was subsampled to the smaller
    folds: int  # 0 when the attack could not run
    seed: int
    members: int  # forget images given
    non_members: int  # unseen images of the class given


@dataclass(frozen=True)
class RelearnResult:
    """The class's accuracy on its audit images before and after k-shot fine-tuning of a copy."""

    k: int  # forget images fine-tuned on
    others: int  # audit images of other classes fine-tuned on with them
    steps: int
    lr: float
    seed: int
    n: int  # audit images of the class scored (none of them fine-tuned on)
    accuracy_before: float | None  # None: no audit image of the class to score
    accuracy_after: float | None


@dataclass(frozen=True)
class ResidualKnowledge:
    """The three measures of one class on one model; ``to_dict()`` is their JSON record."""

    class_name: str
    class_index: int
    probe: ProbeResult
    mia: MiaResult
    relearn: RelearnResult

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def residual_knowledge(model: torch.nn.Module, *, forget_images: torch.Tensor, audit_pixels: torch.Tensor,
                       audit_labels: torch.Tensor, class_index: int, class_name: str, seed: int,
                       config: EvidenceConfig = EvidenceConfig()) -> ResidualKnowledge:
    """Probe accuracy, loss-MIA and k-shot relearning of one class on one model. ``model`` is left
    as it was (its weights and its train/eval mode).

    Args:
        model: a timm classifier (``forward_features`` / ``forward_head``), on the inputs' device.
        forget_images: the class's forget set, normalised: (N_f, C, H, W) float.
        audit_pixels: labelled images of every class the model never trained on, normalised:
            (N_a, C, H, W) float. At least 2 images of each class present (the probe's folds).
        audit_labels: (N_a,) long class indices.
        class_index: the class's logit.
        class_name: the class's name, for the record.
        seed: every random choice (folds, subsamples, fine-tuning images) is drawn from it.
        config: folds, fine-tuning budget and batch sizes.
    """
    if audit_pixels.shape[0] != audit_labels.shape[0]:
        raise ValueError("one label per audit image")
    audit_labels = audit_labels.cpu()
    of_class = audit_pixels[(audit_labels == class_index).to(audit_pixels.device)]
    probe = probe_accuracy(model, audit_pixels, audit_labels, class_index, seed=seed,
                           max_folds=config.probe_folds, batch_size=config.eval_batch_size)
    mia = loss_mia(model, forget_images, of_class, class_index, seed=seed, max_folds=config.mia_folds,
                   batch_size=config.eval_batch_size)
    relearn = relearn_accuracy(model, forget_images, audit_pixels, audit_labels, class_index, seed=seed,
                               k=config.relearn_k, steps=config.relearn_steps, lr=config.relearn_lr,
                               batch_size=config.relearn_batch_size, eval_batch_size=config.eval_batch_size)
    return ResidualKnowledge(class_name=class_name, class_index=class_index, probe=probe, mia=mia, relearn=relearn)


# --- features and losses ---------------------------------------------------------------------

@torch.no_grad()
def features(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's pre-logit features (what its head reads), fp32 in eval mode, on the CPU:
    (N, C, H, W) -> (N, D)."""
    was_training = model.training
    model.eval()
    try:
        batches = [model.forward_head(model.forward_features(batch), pre_logits=True).float().cpu()
                   for batch in pixels.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(batches)


def per_image_loss(model: torch.nn.Module, images: torch.Tensor, class_index: int, batch_size: int) -> torch.Tensor:
    """Cross-entropy of each image against ``class_index``, in eval mode: (N, C, H, W) -> (N,) float64 on the CPU.

    Taken in float64 from the fp32 logits: in fp32 every loss below ~6e-8 (a margin of ~17 nats)
    is 0, and a confident model's forget images would all tie there.
    """
    def loss(logits: torch.Tensor) -> torch.Tensor:
        target = torch.full((logits.shape[0],), class_index, device=logits.device)
        return F.cross_entropy(logits.double(), target, reduction="none").cpu()
    return eval_logits(model, images, _fp32(images), batch_size, each=loss)


# --- the linear probe ------------------------------------------------------------------------

def probe_accuracy(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, class_index: int, *,
                   seed: int, max_folds: int = 5, batch_size: int = 512) -> ProbeResult:
    """A linear probe on the model's pre-logit features of the audit set, scored on the class.

    A model whose head was changed but whose features still separate the class gives a high
    probe accuracy; a model whose features carry nothing of it gives chance.

    Args:
        model: a timm classifier, on the pixels' device.
        pixels: the audit images, normalised: (N, C, H, W) float.
        labels: (N,) long class indices; every class present needs at least 2 images.
        class_index: the class scored.
        seed: the folds' shuffle.
        max_folds: folds of the cross-validation, at most (fewer when a class has fewer images).
        batch_size: images per forward pass.
    """
    return probe_on_features(features(model, pixels, batch_size), labels, class_index, seed=seed, max_folds=max_folds)


def probe_on_features(x: torch.Tensor, labels: torch.Tensor, class_index: int, *, seed: int,
                      max_folds: int = 5) -> ProbeResult:
    """``probe_accuracy`` on features already computed: (N, D), (N,) -> the class's probe accuracy.

    Each image is predicted by a probe trained on the other folds only (stratified, shuffled by
    the seed): a probe scored on images it was fitted to would find classes in noise.
    """
    y = labels.cpu().numpy()
    classes, counts = np.unique(y, return_counts=True)
    n = int((y == class_index).sum())
    if n < 2:
        raise ImageSourceError(f"the audit set has {n} image(s) of class index {class_index}; "
                               "the probe needs at least 2")
    scarce = [int(c) for c, count in zip(classes, counts) if count < 2]
    if scarce:
        raise ImageSourceError(f"the audit set has a single image of class index(es) {scarce}; the probe's "
                               "folds need at least 2 of every class present")
    if len(classes) < 2:
        raise ImageSourceError("the audit set holds one class only; the probe needs others to tell it from")
    folds = min(max_folds, int(counts.min()))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER))
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=_sklearn_seed(seed))
    # One BLAS thread: on a few hundred features BLAS's own threads, beside torch's OpenMP pool,
    # spin against it. A 500-image probe of the CIFAR-10 ViT's features took 3.0 s with two, 0.23 s
    # with one, on a 2-core machine, with the same predictions (benchmarks/request_latency.py).
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)  # see PROBE_MAX_ITER
        predicted = cross_val_predict(probe, x.double().numpy(), y, cv=splits)
    mine = y == class_index
    found = int((predicted[mine] == class_index).sum())
    return ProbeResult(
        accuracy=_percent(predicted[mine] == class_index),
        others_accuracy=_percent(predicted[~mine] == y[~mine]),
        n=n, folds=folds, seed=seed, interval=wilson_interval(found, n),
    )


# --- the loss-based membership attack --------------------------------------------------------

def loss_mia(model: torch.nn.Module, members: torch.Tensor, non_members: torch.Tensor, class_index: int, *,
             seed: int, max_folds: int = 10, batch_size: int = 512) -> MiaResult:
    """The NeurIPS 2023 unlearning kit's attack: a logistic regression on each image's loss
    (against ``class_index``; on its log, see below) guesses whether the model trained on it.

    The larger side is subsampled (seeded) to the smaller, so 50 % is what guessing gets; the
    accuracy is cross-validated (stratified k-fold, k = min(``max_folds``, n)). With nothing to
    find, cross-validation lands at or a little below 50 % (each held-out fold pulls its training
    folds the other way): read anything up to the interval's reach above 50 as "cannot tell".
    The 95 % interval is Wilson's over the 2n guesses, which treats cross-validated guesses as
    independent: an approximation (they share fitted attackers). With fewer than 2 images on a
    side the attack cannot run and the result says so (accuracy None).

    Args:
        model: a timm classifier, on the images' device.
        members: images the model trained on (the forget set), normalised: (N_m, C, H, W).
        non_members: unseen images of the class (from the audit set), normalised: (N_u, C, H, W).
        class_index: the label the losses are taken against.
        seed: the subsample and the folds' shuffle.
        max_folds: folds, at most.
        batch_size: images per forward pass.
    """
    n = min(members.shape[0], non_members.shape[0])
    given = {"members": int(members.shape[0]), "non_members": int(non_members.shape[0])}
    if n < 2:
        return MiaResult(accuracy=None, interval=None, n=n, folds=0, seed=seed, **given)
    generator = torch.Generator().manual_seed(seed)
    members, non_members = _subsample(members, n, generator), _subsample(non_members, n, generator)
    losses = torch.cat([per_image_loss(model, members, class_index, batch_size),
                        per_image_loss(model, non_members, class_index, batch_size)])
    is_member = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    folds = min(max_folds, n)
    # On the log of the loss, where the kit takes the loss itself: the same attacks (a threshold on
    # the loss; the log keeps the order), but a few unseen images with losses of 5-10 no longer drag
    # the fitted threshold away from the small losses where members and non-members differ.
    # Measured on an over-fitted tiny ViT: 87 % found instead of 82 % (the best threshold: 97 %).
    log_loss = np.log(np.maximum(losses.numpy(), LOSS_FLOOR))[:, None]
    # Standardised inside each fold, so that the regularisation does not depend on the losses' scale.
    attacker = make_pipeline(StandardScaler(), LogisticRegression())
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=_sklearn_seed(seed))
    guessed = cross_val_predict(attacker, log_loss, is_member, cv=splits)
    correct = int((guessed == is_member).sum())
    return MiaResult(accuracy=100.0 * correct / (2 * n), interval=wilson_interval(correct, 2 * n),
                     n=n, folds=folds, seed=seed, **given)


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a proportion, in %: unlike the normal one it stays inside
    [0, 100] and does not collapse to a point at 0 or all successes."""
    if trials < 1:
        raise ValueError("an interval needs at least one trial")
    p = successes / trials
    shrink = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / shrink
    half = z * math.sqrt(p * (1.0 - p) / trials + z * z / (4 * trials * trials)) / shrink
    # At 0 or all successes one end is exactly the observed figure; rounding must not leave it outside.
    low = 0.0 if successes == 0 else 100.0 * max(0.0, centre - half)
    high = 100.0 if successes == trials else 100.0 * min(1.0, centre + half)
    return low, high


# --- k-shot relearning -----------------------------------------------------------------------

def relearn_accuracy(model: torch.nn.Module, forget_images: torch.Tensor, audit_pixels: torch.Tensor,
                     audit_labels: torch.Tensor, class_index: int, *, seed: int, k: int = 10, steps: int = 10,
                     lr: float = 2e-4, batch_size: int = 64, eval_batch_size: int = 512) -> RelearnResult:
    """The class's accuracy on its audit images after a copy of the model is fine-tuned on k of its
    forget images; ``model`` itself is not touched.

    The copy trains every weight, not the head alone: knowledge an unlearning left in any layer
    (LoRA changes the attention, not the head) can come back, as it would for an attacker holding
    the weights. The step budget is what keeps this a test of what is left rather than of how fast
    a ViT learns: see ``EvidenceConfig``. As many audit images of other classes as forget images
    train with them, so that the cheapest way down the loss is not to predict the class everywhere.
    The copy trains in eval mode (no dropout or drop-path), as the engine's unlearning does.

    Args:
        model: a timm classifier, on the images' device.
        forget_images: the class's forget set, normalised: (N_f, C, H, W) float.
        audit_pixels: labelled unseen images, normalised: (N_a, C, H, W) float.
        audit_labels: (N_a,) long class indices.
        class_index: the class relearned and scored.
        seed: which forget and other-class images are fine-tuned on.
        k: forget images fine-tuned on, at most.
        steps: full-batch Adam steps.
        lr: Adam's learning rate.
        batch_size: images per forward pass while fine-tuning (gradients add up over the batch).
        eval_batch_size: images per forward pass when scoring.
    """
    audit_labels = audit_labels.cpu()
    mine = audit_labels == class_index
    scored = audit_pixels[mine.to(audit_pixels.device)]
    runtime = _fp32(audit_pixels)
    before = _class_accuracy(model, scored, class_index, runtime, eval_batch_size)
    generator = torch.Generator().manual_seed(seed)
    k = min(k, forget_images.shape[0])
    chosen = forget_images[torch.randperm(forget_images.shape[0], generator=generator)[:k].to(forget_images.device)]
    other_index = (~mine).nonzero().flatten()
    other_index = other_index[torch.randperm(other_index.numel(), generator=generator)[:k]]
    others = audit_pixels[other_index.to(audit_pixels.device)]
    inputs = torch.cat([chosen, others])
    targets = torch.cat([torch.full((k,), class_index, dtype=torch.long), audit_labels[other_index]])
    after = None
    if k and scored.shape[0]:
        tuned = fine_tune(model, inputs, targets.to(inputs.device), steps=steps, lr=lr, batch_size=batch_size)
        after = _class_accuracy(tuned, scored, class_index, runtime, eval_batch_size)
        del tuned
    return RelearnResult(k=k, others=int(other_index.numel()), steps=steps, lr=lr, seed=seed,
                         n=int(scored.shape[0]), accuracy_before=before, accuracy_after=after)


def fine_tune(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, steps: int, lr: float,
              batch_size: int) -> torch.nn.Module:
    """A copy of ``model`` after ``steps`` full-batch Adam steps of cross-entropy on every weight,
    in eval mode: (N, C, H, W), (N,) -> a new module."""
    tuned = copy.deepcopy(model)
    tuned.eval()
    for p in tuned.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(tuned.parameters(), lr=lr)
    with torch.enable_grad():  # a caller measuring under no_grad still gets its fine-tuning
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            for start in range(0, inputs.shape[0], batch_size):
                logits = tuned(inputs[start:start + batch_size]).float()
                loss = F.cross_entropy(logits, targets[start:start + batch_size], reduction="sum") / inputs.shape[0]
                loss.backward()
            optimizer.step()
    for p in tuned.parameters():
        p.requires_grad_(False)
    return tuned


# --- helpers ---------------------------------------------------------------------------------

def _class_accuracy(model: torch.nn.Module, images: torch.Tensor, class_index: int, runtime: Runtime,
                    batch_size: int) -> float | None:
    if images.shape[0] == 0:
        return None
    predictions = predict(model, images, runtime, batch_size)
    return accuracy(predictions, torch.full_like(predictions, class_index))


def _subsample(images: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` of the images, drawn from ``generator`` (all of them, in order, when there are ``n``)."""
    if images.shape[0] == n:
        return images
    return images[torch.randperm(images.shape[0], generator=generator)[:n].to(images.device)]


def _fp32(images: torch.Tensor) -> Runtime:
    """The measures run in fp32 on the images' device: small passes, where bf16 would only add noise."""
    return Runtime(device=images.device, autocast_dtype=None)


def _sklearn_seed(seed: int) -> int:
    """scikit-learn takes seeds below 2**32; the engine's go up to 2**63."""
    return seed % 2**32


def _percent(hits: np.ndarray) -> float:
    return 100.0 * float(hits.mean()) if hits.size else 0.0



# --- the report: parent and new model side by side -------------------------------------------

def parent_and_new(parent: torch.nn.Module, new: torch.nn.Module, *, forget_images: torch.Tensor,
                   audit_pixels: torch.Tensor, audit_labels: torch.Tensor, class_index: int, seed: int,
                   config: EvidenceConfig = EvidenceConfig()) -> dict[str, Any]:
    """Each measure of one class on the parent model and on the new one, with its inputs: the form
    a run's report, a request's evidence and a certificate carry.

    The probe is trained on the audit classes with at least 2 images (its folds need 2 of each); a
    forgotten class with fewer cannot be probed, and says so, as the MIA does when a side is short.
    """
    labels = audit_labels.cpu()
    classes, counts = labels.unique(return_counts=True)
    probe_classes = classes[counts >= 2]
    usable = torch.isin(labels, probe_classes)
    probe_pixels, probe_labels = audit_pixels[usable.to(audit_pixels.device)], labels[usable]
    of_class = audit_pixels[(labels == class_index).to(audit_pixels.device)]
    report: dict[str, Any] = {}
    try:
        probes = [probe_accuracy(m, probe_pixels, probe_labels, class_index, seed=seed, max_folds=config.probe_folds,
                                 batch_size=config.eval_batch_size) for m in (parent, new)]
        report["probe"] = {"before": probes[0].accuracy, "after": probes[1].accuracy, "images": probes[0].n,
                           "before_interval": probes[0].interval, "after_interval": probes[1].interval,
                           "others_before": probes[0].others_accuracy, "others_after": probes[1].others_accuracy,
                           "folds": probes[0].folds, "seed": seed}
    except ImageSourceError as exc:
        report["probe"] = {"before": None, "after": None, "images": int((labels == class_index).sum()),
                           "not_measured": str(exc)}
    attacks = [loss_mia(m, forget_images, of_class, class_index, seed=seed, max_folds=config.mia_folds,
                        batch_size=config.eval_batch_size) for m in (parent, new)]
    report["mia"] = {"before": attacks[0].accuracy, "after": attacks[1].accuracy,
                     "before_interval": attacks[0].interval, "after_interval": attacks[1].interval,
                     "images_per_side": attacks[0].n, "forget_images": attacks[0].members,
                     "unseen_images": attacks[0].non_members, "folds": attacks[0].folds, "seed": seed}
    relearned = [relearn_accuracy(m, forget_images, audit_pixels, labels, class_index, seed=seed, k=config.relearn_k,
                                  steps=config.relearn_steps, lr=config.relearn_lr,
                                  batch_size=config.relearn_batch_size, eval_batch_size=config.eval_batch_size)
                 for m in (parent, new)]
    report["relearn"] = {"before": relearned[0].accuracy_after, "after": relearned[1].accuracy_after,
                         "accuracy_without_fine_tuning": relearned[1].accuracy_before,
                         "k": relearned[0].k, "other_images": relearned[0].others, "steps": relearned[0].steps,
                         "lr": relearned[0].lr, "images_scored": relearned[0].n, "seed": seed}
    return report
