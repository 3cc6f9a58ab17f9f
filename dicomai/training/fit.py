"""The training loop: phases of a strategy, AMP on CUDA, clipping, early stopping, checkpoints.

Early stopping counts epochs without improvement of the monitored metric within a phase: the
count starts afresh when a phase begins, and only the last phase may stop the run, so a
two-stage or gradual run always reaches the backbone it was asked to fine-tune.

Every epoch reseeds torch from (seed, epoch), shuffles with a generator seeded the same way and
augments each image from (seed, epoch, index); with the checkpoint holding the weights and the
optimiser and schedule states, a run resumed after epoch k trains epochs k+1... exactly as an
uninterrupted run does (bit for bit on the CPU; CUDA kernels may differ in the last bits).

With lesion masks (datasets yielding ``(input, target, mask)``), the network's
``forward_multitask`` gives class and mask logits, the objective takes both, and validation adds
``val_dice``: the mean Dice of the predicted masks over the images with a lesion.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dicomai.errors import DatasetError, TrainingError
from dicomai.evaluation.metrics import compute_metrics
from dicomai.inference.device import resolve_device as inference_device
from dicomai.training.batches import ImageDataset
from dicomai.training.checkpoints import BEST, LAST, load_checkpoint, save_checkpoint
from dicomai.training.datasets import Task
from dicomai.training.losses import dice_scores
from dicomai.training.objectives import MultitaskObjective, Objective
from dicomai.training.package_writer import write_history
from dicomai.training.schedules import WarmupPlateau, warmup_cosine
from dicomai.training.strategies import Phase, phase_index, set_trainable

Log = Callable[[str], None]
SCHEDULES = ("cosine", "plateau", "constant")
MONITORS = {
    "loss": "val_loss",
    "accuracy": "val_accuracy",
    "auc": "val_auc",
    "f1": "val_f1",
    "dice": "val_dice",
}
OPTIMIZERS = ("adamw", "adam")


@dataclass(frozen=True)
class FitSettings:
    """Optimisation settings of a run; a resumed run must be given the same."""

    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    monitor: str = "auc"
    patience: int = 0
    # "cosine": warm-up, then cosine to 1 % in each phase; "plateau": warm-up, then the rate
    # cut by `plateau_factor` after `plateau_patience` epochs without a better monitored
    # value, down to `min_lr` (model document 003); "constant": warm-up, then the rate as
    # given (model document 001).
    schedule: str = "cosine"
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    min_lr: float = 1e-6
    seed: int = 0
    amp: bool = True
    num_workers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """Per-epoch history, the epoch whose weights the model holds, and why it stopped."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


@dataclass
class _Progress:
    """What the checkpoint carries besides the tensors."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False
    # The best epoch's validation loss: it breaks a tie of the monitored metric.
    best_loss: float | None = None


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA GPU if there is one, else the CPU (`dicomai.inference.device`)."""
    return torch.device(inference_device(name))


def fit(
    model: nn.Module,
    train: ImageDataset,
    val: ImageDataset,
    objective: Objective | MultitaskObjective,
    phases: list[Phase],
    settings: FitSettings,
    *,
    task: Task,
    classes: tuple[str, ...],
    checkpoint_dir: Path,
    device: torch.device,
    fingerprint: dict[str, Any],
    resume: bool = False,
    log: Log = print,
    history_file: Path | None = None,
) -> FitResult:
    """Train `model` in place through `phases`; leave it holding the best validation epoch.

    Parameters
    ----------
    model
        The network (moved to `device`).
    train, val
        Training (augmented) and validation images, both with masks or both without.
    objective
        The loss; a `MultitaskObjective` with masks.
    phases
        From `dicomai.training.strategies.plan`.
    settings
        Optimisation settings.
    task, classes
        What is predicted, for the validation metrics.
    checkpoint_dir
        Receives ``last.pt`` after every epoch and ``best.pt`` at every improvement.
    device
        Where to train; CUDA adds AMP (if ``settings.amp``) and channels_last.
    fingerprint
        Everything that must match for `resume` to continue this run (settings, data, model).
    resume
        Continue from ``checkpoint_dir/last.pt``.
    log
        Receives one line per epoch, and one more if the run stops early.
    history_file
        Rewritten with every epoch's row as the epoch ends (`write_history`), so that a
        killed run keeps its log.

    Raises
    ------
    DatasetError
        On `resume` without a matching checkpoint, an unknown optimiser or monitor, or the
        ``dice`` monitor without masks.
    """
    started = time.perf_counter()
    _check(settings, val.masks)
    model.to(device).to(memory_format=torch.channels_last)
    objective.to(device)
    progress, saved = _Progress(), None
    if resume:
        saved = load_checkpoint(checkpoint_dir)
        if saved["fingerprint"] != fingerprint:
            raise DatasetError(
                f"{checkpoint_dir / LAST}: written by a run with other settings"
                + _differences(saved["fingerprint"], fingerprint)
            )
        model.load_state_dict(saved["model"])
        progress = _Progress(**saved["progress"])
        log(f"resuming after epoch {progress.epoch}")
    use_amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    steps = len(_loader(train, settings, 0))
    current, optimizer, schedule = -1, None, None
    for epoch in range(progress.epoch, settings.epochs):
        if progress.stopped:
            break
        index = phase_index(phases, epoch)
        if index != current:
            if epoch == phases[index].start:
                progress.bad_epochs = 0
            optimizer, schedule = _optimiser(phases[index], settings, steps)
            if saved is not None and saved["phase"] == index:
                optimizer.load_state_dict(saved["optimizer"])
                schedule.load_state_dict(saved["schedule"])
                scaler.load_state_dict(saved["scaler"])
            current = index
        assert optimizer is not None and schedule is not None
        torch.manual_seed(_epoch_seed(settings.seed, epoch))
        train.set_epoch(epoch)
        model.train()
        set_trainable(model, phases[index])
        loss = _train_epoch(
            model, _loader(train, settings, epoch), objective, optimizer, schedule, scaler,
            settings, device, f"epoch {epoch + 1}/{settings.epochs}",
        )  # fmt: skip
        row = {"epoch": epoch + 1, "phase": index + 1, "lr": float(schedule.get_last_lr()[0])}
        row |= {"train_loss": loss, **validate(model, val, objective, task, classes, device)}
        if isinstance(schedule, WarmupPlateau):
            schedule.epoch_end(row[MONITORS[settings.monitor]])
        _record(progress, row, settings, model, checkpoint_dir, index == len(phases) - 1)
        save_checkpoint(
            checkpoint_dir,
            LAST,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(),
                "phase": index,
                "progress": asdict(progress),
                "fingerprint": fingerprint,
            },
        )
        if history_file is not None:
            write_history(history_file, progress.history)
        log(_epoch_line(row, settings))
        if progress.stopped:
            log(
                f"stopped early at epoch {progress.epoch}: no better "
                f"{MONITORS[settings.monitor].replace('_', ' ')} for {progress.bad_epochs} "
                f"epoch{'s' * (progress.bad_epochs != 1)} (--patience {settings.patience}); "
                f"best epoch {progress.best_epoch}"
            )
    best = load_checkpoint(checkpoint_dir, BEST)
    model.load_state_dict(best["model"])
    return FitResult(
        history=progress.history,
        best_epoch=progress.best_epoch,
        stopped_early=progress.stopped,
        seconds=round(time.perf_counter() - started, 1),
    )


def _check(settings: FitSettings, masks: bool) -> None:
    if settings.optimizer not in OPTIMIZERS:
        raise DatasetError(f"optimizer {settings.optimizer!r}: use {' or '.join(OPTIMIZERS)}")
    if settings.monitor not in MONITORS:
        raise DatasetError(f"monitor {settings.monitor!r}: use one of {', '.join(MONITORS)}")
    if settings.monitor == "dice" and not masks:
        raise DatasetError("monitor dice needs lesion masks and a network that segments")
    if settings.schedule not in SCHEDULES:
        raise DatasetError(f"schedule {settings.schedule!r}: use {' or '.join(SCHEDULES)}")
    if settings.epochs < 1 or settings.batch_size < 1:
        raise DatasetError("epochs and batch size must be at least 1")


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def _loader(dataset: ImageDataset, settings: FitSettings, epoch: int) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(_epoch_seed(settings.seed, epoch))
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=settings.num_workers,
        # A last batch of one image breaks BatchNorm's training statistics.
        drop_last=len(dataset) % settings.batch_size == 1,
    )


def _optimiser(
    phase: Phase, settings: FitSettings, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR | WarmupPlateau]:
    groups = [{"params": list(params), "lr": lr} for params, lr in phase.groups]
    kind = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    optimizer = kind(groups, weight_decay=settings.weight_decay)
    warmup = round(settings.warmup_epochs * steps_per_epoch)
    if settings.schedule == "plateau":
        return optimizer, WarmupPlateau(
            optimizer,
            warmup_steps=warmup,
            higher_is_better=settings.monitor != "loss",
            patience=settings.plateau_patience,
            factor=settings.plateau_factor,
            min_lr=settings.min_lr,
        )
    schedule = warmup_cosine(
        optimizer,
        total_steps=phase.epochs * steps_per_epoch,
        warmup_steps=warmup,
        # A cosine whose floor is its peak: the rate stays where the warm-up left it.
        floor=1.0 if settings.schedule == "constant" else 0.01,
    )
    return optimizer, schedule


def _on_device(batch: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """A batch's inputs (channels_last), targets and, if there, masks on `device`."""
    inputs = batch[0].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return [inputs, *(part.to(device, non_blocking=True) for part in batch[1:])]


def _outputs(model: nn.Module, inputs: torch.Tensor, masks: bool) -> tuple[torch.Tensor, ...]:
    """Class logits, and mask logits too when training on masks."""
    if masks:
        return tuple(model.forward_multitask(inputs))  # type: ignore[operator]
    return (model(inputs),)


def _differences(saved: Any, wanted: Any) -> str:
    """Which settings a checkpoint's run had otherwise, as ``(fit.epochs: 3, now 5)``."""
    if not isinstance(saved, dict) or not isinstance(wanted, dict):
        return ""
    changed = _changed(saved, wanted, "")
    more = f"; and {len(changed) - 4} more" if len(changed) > 4 else ""
    return f" ({'; '.join(changed[:4])}{more})" if changed else ""


def _changed(saved: dict[str, Any], wanted: dict[str, Any], prefix: str) -> list[str]:
    """``name: old, now new`` for each differing value, nested tables field by field."""
    changed: list[str] = []
    for key in sorted(set(saved) | set(wanted)):
        old, new = saved.get(key), wanted.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed(old, new, f"{prefix}{key}.")
        else:
            changed.append(f"{prefix}{key}: {_excerpt(old, new)}, now {_excerpt(new, old)}")
    return changed


def _excerpt(value: Any, other: Any, width: int = 40) -> str:
    """`value` (a string as it is, else its repr), cut to `width` characters around where it
    first differs from `other`: the heads of two long reprs had printed identically."""
    text, against = (item if isinstance(item, str) else repr(item) for item in (value, other))
    if len(text) <= width:
        return text
    first = next(
        (i for i, (a, b) in enumerate(zip(text, against, strict=False)) if a != b),
        min(len(text), len(against)),
    )
    start = max(0, min(first - width // 4, len(text) - width))
    head = "..." if start else ""
    tail = "..." if start + width < len(text) else ""
    return f"{head}{text[start : start + width]}{tail}"


def _train_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    objective: Objective | MultitaskObjective,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR | WarmupPlateau,
    scaler: torch.amp.GradScaler,
    settings: FitSettings,
    device: torch.device,
    label: str,
) -> float:
    total, count = 0.0, 0
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(loader, desc=label, unit="batch", leave=False, disable=None)
    for batch in bar:
        inputs, targets, *masks = _on_device(batch, device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
            logits, *mask_logits = _outputs(model, inputs, bool(masks))
            loss = objective(logits, targets, *mask_logits, *masks)
        if not torch.isfinite(loss):
            # One NaN step spreads to every weight; the run went on and wrote a package whose
            # temperature and thresholds were NaN.
            raise TrainingError(
                f"{label}: the loss became {float(loss.detach())}, training diverged "
                "(try a lower --lr)"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if settings.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        total += float(loss.detach()) * len(inputs)
        count += len(inputs)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def predict_logits(
    model: nn.Module, dataset: ImageDataset, device: torch.device, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) float64 of the network in eval mode, and the targets, in dataset order."""
    model.eval()
    logits, targets = [], []
    with torch.inference_mode():
        for inputs, target, *_ in DataLoader(dataset, batch_size=batch_size):
            batch = inputs.to(device).contiguous(memory_format=torch.channels_last)
            logits.append(model(batch).double().cpu())
            targets.append(target)
    return torch.cat(logits).numpy(), torch.cat(targets).numpy()


def predict_with_masks(
    model: nn.Module,
    dataset: ImageDataset,
    objective: MultitaskObjective,
    device: torch.device,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Logits (N, C) float64, targets, mean loss and mean Dice (images with a lesion; NaN if
    none) of a segmenting network in eval mode, on a dataset with masks, in one pass."""
    model.eval()
    logits, targets, dice, total = [], [], [], 0.0
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=batch_size):
            inputs, target, masks = _on_device(batch, device)
            class_logits, mask_logits = model.forward_multitask(inputs)  # type: ignore[operator]
            # Every term of the loss is a mean over images or over equally many pixels per
            # image, so batch means weighted by batch size give the whole set's loss.
            total += float(objective(class_logits, target, mask_logits, masks)) * len(inputs)
            logits.append(class_logits.double().cpu())
            targets.append(target.cpu())
            dice.append(dice_scores(mask_logits, masks).cpu())
    scores = torch.cat(dice).numpy()
    found = scores[~np.isnan(scores)]
    mean_dice = float(found.mean()) if len(found) else float("nan")
    return torch.cat(logits).numpy(), torch.cat(targets).numpy(), total / len(dataset), mean_dice


def to_probabilities(logits: np.ndarray, multilabel: bool, temperature: float = 1.0) -> np.ndarray:
    """Softmax rows, or per-class sigmoids for multi-label, of ``logits / temperature``."""
    scaled = torch.from_numpy(np.asarray(logits, dtype=np.float64) / temperature)
    return (torch.sigmoid(scaled) if multilabel else torch.softmax(scaled, dim=1)).numpy()


def validate(
    model: nn.Module,
    val: ImageDataset,
    objective: Objective | MultitaskObjective,
    task: Task,
    classes: tuple[str, ...],
    device: torch.device,
) -> dict[str, float]:
    """Validation loss, accuracy, macro ROC-AUC and macro F1 at 0.5 thresholds (the package's
    own thresholds are chosen after training, so its accuracy differs); with masks,
    also the mean Dice (``val_dice``)."""
    extra: dict[str, float] = {}
    if isinstance(objective, MultitaskObjective):
        logits, targets, loss, extra["val_dice"] = predict_with_masks(model, val, objective, device)
    else:
        logits, targets = predict_logits(model, val, device)
        with torch.inference_mode():
            loss = float(
                objective(torch.from_numpy(logits).to(device), torch.from_numpy(targets).to(device))
            )
    probabilities = to_probabilities(logits, task is Task.MULTILABEL)
    metrics = compute_metrics(probabilities, targets, task, classes, np.full(len(classes), 0.5))
    return {
        "val_loss": loss,
        "val_accuracy": metrics["accuracy"],
        "val_auc": metrics["auc_macro"],
        "val_f1": metrics["f1_macro"],
        **extra,
    }


def _record(
    progress: _Progress,
    row: dict[str, float],
    settings: FitSettings,
    model: nn.Module,
    checkpoint_dir: Path,
    last_phase: bool,
) -> None:
    """Append the epoch, keep its weights if they are the best so far, decide on stopping:
    only in the `last_phase`, and not after the last epoch (that is no early stop)."""
    progress.history.append(row)
    progress.epoch = int(row["epoch"])
    value = row[MONITORS[settings.monitor]]
    sign = -1.0 if settings.monitor == "loss" else 1.0
    improved = not math.isnan(value) and (
        progress.best_value is None
        or sign * value > sign * progress.best_value
        or (value == progress.best_value and _lower_loss(row, progress.best_loss))
    )
    if improved or progress.best_epoch == 0:
        progress.best_value = None if math.isnan(value) else value
        progress.best_loss = row.get("val_loss")
        progress.best_epoch = progress.epoch
        progress.bad_epochs = 0
        save_checkpoint(
            checkpoint_dir, BEST, {"model": model.state_dict(), "epoch": progress.epoch}
        )
    else:
        progress.bad_epochs += 1
    progress.stopped = (
        bool(settings.patience)
        and last_phase
        and progress.bad_epochs >= settings.patience
        and progress.epoch < settings.epochs
    )


def _lower_loss(row: dict[str, float], best_loss: float | None) -> bool:
    """Whether an epoch that ties the best monitored value has the lower validation loss: a
    validation AUC of 1.0 reached while the backbone was frozen kept that stage-1 epoch over
    every fine-tuned one that matched it, and the package shipped the frozen backbone."""
    loss = row.get("val_loss", math.nan)
    return not math.isnan(loss) and (best_loss is None or math.isnan(best_loss) or loss < best_loss)


def _epoch_line(row: dict[str, float], settings: FitSettings) -> str:
    line = (
        f"epoch {int(row['epoch'])}/{settings.epochs}  phase {int(row['phase'])}  "
        f"lr {row['lr']:.2e}  loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
        f"val acc@0.5 {row['val_accuracy']:.3f}  val auc {row['val_auc']:.3f}"
    )
    return line + (f"  val dice {row['val_dice']:.3f}" if "val_dice" in row else "")
