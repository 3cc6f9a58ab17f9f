"""The demo model package: tinycnn trained on synthetic chest images to flag painted nodules."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from dicomai.imaging.spec import InputSpec
from dicomai.inference.types import Code
from dicomai.models.manifest import AppliesTo, ClassSpec, Manifest
from dicomai.models.package import write_package
from dicomai.training.synthetic import synthesize
from dicomai.training.trainer import Log, model_inputs, predict_logits, train_classifier

DEMO_NAME = "demo-chest-nodule"
DEMO_VERSION = "1.0.0"
DEMO_SIZE = (128, 128)
# The synthetic images are grey levels in [0, 1], not photographs: centre them on mid-grey
# rather than on ImageNet's statistics.
DEMO_SPEC = InputSpec(size=DEMO_SIZE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
DEMO_CLASSES = (
    # Codes as DICOM's own code dictionary holds them (pydicom.sr.codedict: SCT Normal, Nodule).
    ClassSpec("normal", Code("17621005", "SCT", "Normal"), threshold=0.5, is_finding=False),
    ClassSpec("nodule", Code("27925004", "SCT", "Nodule"), threshold=0.5, is_finding=True),
)
DEMO_DESCRIPTION = (
    "DEMO: trained on synthetic images, not for diagnosis. Flags a bright round blob painted "
    "into a lung field of a synthetic chest-like image; it has never seen a real radiograph."
)


def build_demo_package(
    out_dir: Path,
    n_images: int = 800,
    seed: int = 0,
    epochs: int = 12,
    log: Log = print,
) -> Manifest:
    """Train the demo model on synthetic images and write its package.

    Parameters
    ----------
    out_dir
        The package folder to write (model.toml and weights.safetensors).
    n_images
        Number of synthetic images, 20 % of them held out for validation.
    seed
        Seed of the images, the split and the training.
    epochs
        Training epochs.
    log
        Receives the progress lines.

    Returns
    -------
    Manifest
        The manifest written, with the training summary and validation metrics.
    """
    images = synthesize(n_images, size=DEMO_SIZE[0], seed=seed)
    model, metrics = train_classifier(
        "tinycnn",
        images.images,
        images.labels,
        DEMO_SPEC,
        epochs=epochs,
        lr=3e-3,
        seed=seed,
        batch_size=32,
        options={"dropout": 0.2},
        log=log,
    )
    temperature = float(metrics.pop("temperature"))
    metrics.update(_test_metrics(model, temperature, n_images // 2, seed + 1))
    seconds = metrics.pop("seconds")
    settings = {
        key: metrics.pop(key)
        for key in ("epochs", "lr", "batch_size", "seed", "weight_decay", "n_train", "n_val")
    }
    manifest = Manifest(
        name=DEMO_NAME,
        version=DEMO_VERSION,
        architecture="tinycnn",
        classes=DEMO_CLASSES,
        options={"dropout": 0.2},
        description=DEMO_DESCRIPTION,
        input=DEMO_SPEC,
        temperature=temperature,
        applies_to=AppliesTo(modalities=("CR", "DX")),
        training=_training_summary(n_images, seed, seconds, settings),
        metrics=metrics,
    )
    # `make demo-model` rebuilds the demo package where the last one was.
    written = write_package(out_dir, manifest, model.state_dict(), overwrite=True)
    log(
        f"{DEMO_NAME} {DEMO_VERSION}: validation accuracy {metrics['val_accuracy']:.3f}, "
        f"temperature {temperature:.3f}, trained in {seconds:.0f} s"
    )
    return written


def _test_metrics(
    model: torch.nn.Module, temperature: float, n: int, seed: int
) -> dict[str, float]:
    """Sensitivity and specificity at the 0.5 threshold on fresh images (a seed not trained on)."""
    test = synthesize(n, size=DEMO_SIZE[0], seed=seed)
    logits = predict_logits(model, model_inputs(test.images, DEMO_SPEC))
    nodule = torch.softmax(logits / temperature, dim=1)[:, 1].numpy()
    flagged = nodule >= DEMO_CLASSES[1].threshold
    positive = test.labels == 1
    return {
        "test_images": n,
        "test_seed": seed,
        "test_accuracy": round(float((flagged == positive).mean()), 4),
        "test_sensitivity": round(float(flagged[positive].mean()), 4),
        "test_specificity": round(float((~flagged[~positive]).mean()), 4),
    }


def _training_summary(
    n_images: int, seed: int, seconds: float, settings: dict[str, object]
) -> dict[str, object]:
    return {
        "data": "synthetic chest-like images (dicomai.training.synthetic), "
        f"{n_images} images of {DEMO_SIZE[0]}x{DEMO_SIZE[1]}, about half with a painted nodule",
        "data_seed": seed,
        "validation": "stratified hold-out of 20 %; it also fitted the temperature",
        "optimizer": "AdamW, one-cycle learning rate, cross-entropy with label smoothing 0.1, "
        "random horizontal flips",
        "seconds": seconds,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        **settings,
    }
