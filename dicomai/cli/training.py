"""`dicomai train`, `dicomai evaluate` and `dicomai train-demo`: making and judging model packages.

torch is imported inside the commands: the CLI's other commands stay fast.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from dicomai.cli.params import SEED
from dicomai.errors import DicomaiError
from dicomai.models.manifest import EXPLANATION_METHODS, NAME_PATTERN, VERSION_PATTERN

if TYPE_CHECKING:
    from dicomai.training.runs import RunSettings

STRATEGIES = ("full", "frozen", "two-stage", "lld", "gradual")
# Ranges checked before minutes of training: a negative rate trained and wrote a package.
_PROBABILITY = click.FloatRange(0, 1, max_open=True)
_RATE = click.FloatRange(min=0, min_open=True)
_POSITIVE_INT = click.IntRange(min=1)
# PS3.5 6.2, CS: capitals, digits, space and underscore, at most 16.
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")


def _code_strings(
    _context: click.Context, parameter: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    """Values of a repeatable CS option, commas splitting them too; "DX,CR" had been kept as
    one modality that no image has."""
    split = [part.strip().upper() for value in values for part in value.split(",")]
    for value in split:
        if not _CODE_STRING.fullmatch(value):
            raise click.BadParameter(
                f"{value!r} is not a DICOM code string (capitals, digits, _ and space, at most "
                "16), e.g. DX or CHEST",
                param=parameter,
            )
    return tuple(dict.fromkeys(split))


def _checked_name(_context: click.Context, _param: click.Parameter, value: str) -> str:
    # Checked before training, not when `models register` refuses the package after it.
    if not NAME_PATTERN.fullmatch(value):
        raise click.BadParameter("a name of letters, digits, '.', '_' or '-' (up to 64)")
    return value


def _checked_version(_context: click.Context, _param: click.Parameter, value: str) -> str:
    if not VERSION_PATTERN.fullmatch(value):
        raise click.BadParameter("a semantic version x.y.z")
    return value


@click.command("train-demo")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, type=SEED)
def train_demo(out: Path, seed: int) -> None:
    """Train the demo model on synthetic images and write its package to OUT (not for diagnosis)."""
    from dicomai.training.demo import build_demo_package

    _output_folder(out)
    out.mkdir(parents=True, exist_ok=True)  # no data to check first: fail now, not after
    manifest = build_demo_package(out, seed=seed)
    click.echo(f"wrote {manifest.name} {manifest.version} to {out}")


def _output_folder(path: Path) -> None:
    """Refuse, before minutes of training, an output path that cannot become a folder; write
    nothing yet (the data are checked first)."""
    if path.exists() and not path.is_dir():
        raise DicomaiError(f"{path} exists and is not a folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DicomaiError(f"{path}: cannot write in {existing}")


def _option_value(text: str) -> Any:
    """An architecture option's value as TOML would type it: bool, int, float or string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _architecture_options(pairs: tuple[str, ...], dropout: float | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--option")
        options[key.strip()] = _option_value(value)
    if dropout is not None:
        options["dropout"] = dropout
    return options


def _window(
    _context: click.Context, parameter: click.Parameter, value: str | None
) -> str | tuple[float, float]:
    """`--window`: a preset name or CENTER,WIDTH, checked before training as the package's
    [input] window will be."""
    from dicomai.errors import ModelPackageError
    from dicomai.imaging.spec import STORED_WINDOW, InputSpec

    if value is None:
        return STORED_WINDOW
    window: str | tuple[float, float] = value.strip().lower()
    if "," in value:
        try:
            center, width = (float(part) for part in value.split(","))
        except ValueError as error:
            message = f"{value!r}: a preset or CENTER,WIDTH"
            raise click.BadParameter(message, param=parameter) from error
        window = (center, width)
    try:
        return InputSpec(window=window).window
    except ModelPackageError as error:
        message = str(error).removeprefix("input spec: ")
        raise click.BadParameter(message, param=parameter) from error


def _erasing_area(
    _context: click.Context, parameter: click.Parameter, value: str
) -> tuple[float, float]:
    """`--erasing-area MIN,MAX`: the erased share of the image, 0 < MIN <= MAX < 1."""
    try:
        low, high = (float(part) for part in value.split(","))
    except ValueError as error:
        raise click.BadParameter(f"{value!r}: MIN,MAX, e.g. 0.02,0.33", param=parameter) from error
    if not 0 < low <= high < 1:
        raise click.BadParameter(
            f"{value!r}: the shares must satisfy 0 < MIN <= MAX < 1", param=parameter
        )
    return low, high


def _epochs(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise click.BadParameter(f"{text!r}: comma-separated epoch numbers") from error


def _rates(text: str, strategy: str) -> tuple[float, ...]:
    if text.strip() and strategy != "lld":
        # Recorded in the package though unused, it would say the run trained as it did not.
        raise click.BadParameter(
            f"takes effect with --strategy lld only, not {strategy}", param_hint="--lld-rates"
        )
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise click.BadParameter(
            f"{text!r}: comma-separated learning rates", param_hint="--lld-rates"
        ) from error
    if not all(0 < rate < 1 for rate in rates):
        raise click.BadParameter(
            f"{text!r}: each rate must be above 0 and below 1", param_hint="--lld-rates"
        )
    return rates


@click.command("train")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(path_type=Path),
    help="train/<class>/ folders (optional val/, test/), or images with --labels.",
)
@click.option(
    "--labels",
    "labels_csv",
    type=click.Path(path_type=Path),
    help="Labels CSV: file,label or ChestX-ray14's Image Index,Finding Labels.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder: package/, training_log.csv, curves.png, checkpoints/.",
)
@click.option("--name", required=True, callback=_checked_name, help="Model name in the package.")
@click.option(
    "--version", "model_version", default="1.0.0", show_default=True, callback=_checked_version
)
@click.option("--description", default="", help="Model card text.")
@click.option("--architecture", default="tinycnn", show_default=True)
@click.option("--dropout", type=_PROBABILITY, help="Dropout before the head.")
@click.option(
    "--option",
    "architecture_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Architecture option (repeatable), e.g. tiny=true; kept in the manifest.",
)
@click.option(
    "--size", default=224, type=_POSITIVE_INT, show_default=True, help="Input rows and columns."
)
@click.option(
    "--normalize",
    type=click.Choice(["imagenet", "mid-grey"]),
    default="imagenet",
    show_default=True,
    help="Input normalisation (imagenet for pretrained weights).",
)
@click.option(
    "--window",
    callback=_window,
    metavar="NAME|CENTER,WIDTH",
    help="VOI window of DICOM images, in place of their own and kept in the package's "
    "[input] table: stored (the image's own, the default), a CT preset (lung, mediastinum, "
    "abdomen, bone, brain) or CENTER,WIDTH in modality units, e.g. --window=-600,1500.",
)
@click.option(
    "--equalize",
    type=click.Choice(["none", "hist", "clahe"]),
    default="none",
    show_default=True,
    help="Contrast equalisation before resizing, in training and kept in the package's "
    "[input] table for the daemon: hist (global histogram equalisation) or clahe.",
)
@click.option(
    "--clahe-clip",
    type=_RATE,
    help="CLAHE contrast limit (with --equalize clahe)  [default: 2.0]",
)
@click.option(
    "--color",
    type=click.Choice(["grey", "rgb"]),
    default="grey",
    show_default=True,
    help="What the model sees of colour images, in training and kept in the package's "
    "[input] table: grey (their luminance, as radiographs) or rgb (their three channels, for "
    "findings that are in colour: dermatology, pathology).",
)
@click.option(
    "--init",
    "initial_weights",
    type=click.Path(path_type=Path),
    help="Pretrained backbone weights (local file; nothing is downloaded).",
)
@click.option("--init-kind", type=click.Choice(["torchvision", "chexnet"]), default="torchvision")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="full", show_default=True)
@click.option(
    "--lr", default=1e-4, type=_RATE, show_default=True, help="Learning rate (of the head)."
)
@click.option(
    "--head-lr", default=3e-4, type=_RATE, show_default=True, help="two-stage: first-stage rate."
)
@click.option(
    "--freeze-epochs",
    default=5,
    type=click.IntRange(min=0),
    show_default=True,
    help="two-stage: frozen epochs.",
)
@click.option(
    "--layer-decay",
    default=0.75,
    type=click.FloatRange(0, 1, min_open=True),
    show_default=True,
    help="lld: factor per block (or stage, --lld-unit).",
)
@click.option(
    "--lld-unit",
    type=click.Choice(["block", "stage"]),
    default="block",
    show_default=True,
    help="lld: decay per residual block, or per stage (a ResNet's layer1-4, as seed 002: "
    "layer4 at lr*decay, layer3 at lr*decay^2, ...).",
)
@click.option(
    "--lld-rates",
    default="",
    help="lld: each unit's rate from the top instead of --layer-decay, e.g. 1e-4,1e-5,1e-6,1e-6 "
    "(seed 002's layer4 to layer1); units beyond the list do not train.",
)
@click.option("--unfreeze-at", default="", help="gradual: epochs, e.g. 2,4,6.")
@click.option("--epochs", default=20, type=_POSITIVE_INT, show_default=True)
@click.option("--batch-size", default=32, type=_POSITIVE_INT, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "adam"]), default="adamw")
@click.option("--weight-decay", default=1e-4, type=click.FloatRange(min=0), show_default=True)
@click.option("--warmup-epochs", default=1.0, type=click.FloatRange(min=0), show_default=True)
@click.option(
    "--grad-clip",
    default=1.0,
    type=click.FloatRange(min=0),
    show_default=True,
    help="Max gradient norm; 0: off.",
)
@click.option(
    "--loss",
    type=click.Choice(["auto", "ce", "focal", "bce", "multitask"]),
    default="auto",
    show_default=True,
    help="auto: multitask (a segmenting network on masks), ce (single-label) or bce (multi-label).",
)
@click.option(
    "--multitask-alpha",
    default=0.7,
    show_default=True,
    help="multitask: weight of classification against segmentation.",
)
@click.option(
    "--no-masks",
    is_flag=True,
    help="A segmenting network (resnet50_multitask) trains its classification only, no masks.",
)
@click.option("--label-smoothing", default=0.1, type=_PROBABILITY, show_default=True)
@click.option("--class-weights", type=click.Choice(["none", "balanced"]), default="none")
@click.option("--focal-gamma", default=2.0, type=click.FloatRange(min=0), show_default=True)
@click.option(
    "--monitor",
    type=click.Choice(["auc", "loss", "accuracy", "f1", "dice"]),
    default="auc",
    show_default=True,
    help="Validation metric for early stopping, the best epoch and the plateau schedule.",
)
@click.option(
    "--schedule",
    type=click.Choice(["cosine", "plateau", "constant"]),
    default="cosine",
    show_default=True,
    help="After the warm-up: cosine down to 1 % of the rate in each phase; or the rate cut by "
    "--plateau-factor whenever the monitored metric has not improved for --plateau-patience "
    "epochs (ReduceLROnPlateau, model document 003); or the rate unchanged (document 001).",
)
@click.option(
    "--plateau-patience", default=2, type=click.IntRange(0), show_default=True,
    help="Epochs without improvement before a plateau cut.",
)  # fmt: skip
@click.option(
    "--plateau-factor", default=0.5, type=click.FloatRange(0, 1, min_open=True, max_open=True),
    show_default=True, help="What a plateau cut multiplies the rate by.",
)  # fmt: skip
@click.option(
    "--min-lr", default=1e-6, type=click.FloatRange(0), show_default=True,
    help="No plateau cut goes below this rate.",
)  # fmt: skip
@click.option(
    "--patience",
    default=0,
    type=click.IntRange(min=0),
    show_default=True,
    help="Early-stopping patience; 0: off.",
)
@click.option(
    "--val-fraction",
    default=0.2,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    show_default=True,
)
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option(
    "--rotation",
    default=7.0,
    type=click.FloatRange(0, 180),
    show_default=True,
    help="Max rotation, degrees.",
)
@click.option(
    "--scale",
    default=0.05,
    type=click.FloatRange(0, 1, max_open=True),
    show_default=True,
    help="Max zoom in or out, a fraction; 0: off.",
)
@click.option(
    "--shift",
    default=0.04,
    type=click.FloatRange(0, 1, max_open=True),
    show_default=True,
    help="Max shift, a fraction of the side; 0: off.",
)
@click.option("--hflip/--no-hflip", default=False, show_default=True)
@click.option(
    "--jitter",
    default=0.1,
    # Below 1: at 1 the factor 1 - jitter reaches 0, a blank image (above it, once, inverted).
    type=click.FloatRange(0, 1, max_open=True),
    show_default=True,
    help="Brightness and contrast jitter J: each a factor from [1-J, 1+J], as torchvision's "
    "ColorJitter(brightness=J, contrast=J).",
)
@click.option(
    "--random-erasing",
    default=0.0,
    type=click.FloatRange(0, 1),
    show_default=True,
    help="Probability.",
)
@click.option(
    "--erasing-area",
    default="0.01,0.04",
    callback=_erasing_area,
    metavar="MIN,MAX",
    show_default=True,
    help="Share of the image one random erasing covers, drawn from [MIN, MAX] (torchvision's "
    "RandomErasing scale; model document 004 uses 0.02,0.33). The default's small patches "
    "rarely hide a whole lesion whose label is kept.",
)
@click.option("--no-augment", is_flag=True, help="No augmentation at all.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda:N.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision (CUDA).")
@click.option(
    "--workers",
    default=0,
    type=click.IntRange(min=0),
    show_default=True,
    help="Data-loading processes.",
)
@click.option(
    "--codes",
    "codes_csv",
    type=click.Path(path_type=Path),
    help="CSV name,value,scheme,meaning[,is_finding] coding the classes.",
)
@click.option(
    "--modality",
    "modalities",
    multiple=True,
    callback=_code_strings,
    help="Applies to (repeatable, or comma-separated: DX,CR).",
)
@click.option(
    "--body-part",
    "body_parts",
    multiple=True,
    callback=_code_strings,
    help="Applies to (repeatable, or comma-separated).",
)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the run (package, log, checkpoints) already in OUT; without it, or "
    "--resume, such an OUT is refused.",
)
@click.option(
    "--explanation",
    type=click.Choice(EXPLANATION_METHODS),
    help="Heat-map method kept in the package (default: the architecture's own).",
)
@click.option(
    "--mc-dropout",
    "mc_passes",
    type=click.IntRange(2, 200),
    help="Estimate each prediction's uncertainty from this many passes with dropout on "
    "(MC dropout); the network needs dropout (--dropout). Default: one deterministic pass.",
)
def train(**options: Any) -> None:
    """Train a classifier on labelled images and write a model package the daemon runs."""
    from dicomai.training.runs import train_package

    settings = _run_settings(options)
    _output_folder(options["out"])
    manifest = train_package(settings, log=click.echo)
    click.echo(f"{manifest.name} {manifest.version}: {options['out']}/package")


def _run_settings(o: dict[str, Any]) -> RunSettings:
    from dicomai.imaging.spec import InputSpec
    from dicomai.models.manifest import AppliesTo, UncertaintySpec
    from dicomai.training.augment import NO_AUGMENTATION, Augmentation
    from dicomai.training.fit import FitSettings
    from dicomai.training.objectives import LossSettings
    from dicomai.training.runs import RunSettings
    from dicomai.training.strategies import DecayUnit, Strategy, StrategySettings

    size = int(o["size"])
    if o["clahe_clip"] is not None and o["equalize"] != "clahe":
        raise click.BadParameter("only with --equalize clahe", param_hint="--clahe-clip")
    spec = InputSpec(
        size=(size, size),
        window=o["window"],
        equalize=o["equalize"],
        clahe_clip=2.0 if o["clahe_clip"] is None else float(o["clahe_clip"]),
        color=o["color"],
    )
    if o["normalize"] == "mid-grey":
        spec = replace(spec, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    jitter = float(o["jitter"])
    augmentation = (
        NO_AUGMENTATION
        if o["no_augment"]
        else Augmentation(
            rotation_degrees=float(o["rotation"]),
            scale=float(o["scale"]),
            shift=float(o["shift"]),
            hflip=bool(o["hflip"]),
            brightness=jitter,
            contrast=jitter,
            erase_probability=float(o["random_erasing"]),
            erase_area=o["erasing_area"],
        )
    )
    loss = str(o["loss"])
    return RunSettings(
        data=o["data"],
        out=o["out"],
        name=str(o["name"]),
        version=str(o["model_version"]),
        labels_csv=o["labels_csv"],
        val_fraction=float(o["val_fraction"]),
        architecture=str(o["architecture"]),
        options=_architecture_options(tuple(o["architecture_options"]), o["dropout"]),
        spec=spec,
        initial_weights=o["initial_weights"],
        initial_kind=str(o["init_kind"]),
        strategy=StrategySettings(
            strategy=Strategy(str(o["strategy"])),
            lr=float(o["lr"]),
            head_lr=float(o["head_lr"]),
            freeze_epochs=int(o["freeze_epochs"]),
            layer_decay=float(o["layer_decay"]),
            unfreeze_at=_epochs(str(o["unfreeze_at"])),
            lld_unit=DecayUnit(str(o["lld_unit"])),
            lld_rates=_rates(str(o["lld_rates"]), str(o["strategy"])),
        ),
        loss=LossSettings(
            name=loss,
            label_smoothing=float(o["label_smoothing"]),
            class_weights=str(o["class_weights"]),
            focal_gamma=float(o["focal_gamma"]),
            multitask_alpha=float(o["multitask_alpha"]),
        ),
        fit=FitSettings(
            epochs=int(o["epochs"]),
            batch_size=int(o["batch_size"]),
            optimizer=str(o["optimizer"]),
            weight_decay=float(o["weight_decay"]),
            warmup_epochs=float(o["warmup_epochs"]),
            grad_clip=float(o["grad_clip"]),
            monitor=str(o["monitor"]),
            patience=int(o["patience"]),
            schedule=str(o["schedule"]),
            plateau_patience=int(o["plateau_patience"]),
            plateau_factor=float(o["plateau_factor"]),
            min_lr=float(o["min_lr"]),
            seed=int(o["seed"]),
            amp=bool(o["amp"]),
            num_workers=int(o["workers"]),
        ),
        augmentation=augmentation,
        codes_csv=o["codes_csv"],
        applies_to=AppliesTo(
            modalities=tuple(o["modalities"]),
            body_parts=tuple(o["body_parts"]),
        ),
        description=str(o["description"]),
        device=str(o["device"]),
        resume=bool(o["resume"]),
        overwrite=bool(o["overwrite"]),
        masks=not o["no_masks"],
        explanation=o["explanation"] or "",
        uncertainty=(
            UncertaintySpec("mc_dropout", passes=int(o["mc_passes"]))
            if o["mc_passes"]
            else UncertaintySpec()
        ),
    )


F = TypeVar("F", bound=Callable[..., Any])


def labelled_images(split: str, use: str) -> Callable[[F], F]:
    """The options naming labelled images, as `evaluate` and `ensemble` read them: --data,
    --labels and --split (default `split`, a set of the layout "to `use`")."""
    options = (
        click.option(
            "--data",
            required=True,
            type=click.Path(path_type=Path),
            help=f"{split}/<class>/ (or <class>/) folders, or images with --labels.",
        ),
        click.option("--labels", "labels_csv", type=click.Path(path_type=Path), help="Labels CSV."),
        click.option(
            "--split",
            type=click.Choice(["train", "val", "test"]),
            default=split,
            show_default=True,
            help=f"Set of the layout to {use}.",
        ),
    )

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@click.command("evaluate")
@click.argument("package", type=click.Path(path_type=Path))
@labelled_images("test", "use")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Report folder [PACKAGE-evaluation]; not inside the package. One that holds an "
    "earlier report or other files is refused without --overwrite.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the report already in OUT, or write it among OUT's other files.",
)
def evaluate(
    package: Path,
    data: Path,
    labels_csv: Path | None,
    split: str,
    out: Path | None,
    overwrite: bool,
) -> None:
    """Evaluate a model package (folder or .tar) on labelled images: metrics, figures and a
    report. How far a set of 100 images or more is read and evaluated goes to stderr."""
    from dicomai.evaluation.report import evaluate_package
    from dicomai.rollout.registry import package_folder

    # "." has no name of its own to put the report beside.
    package = package.resolve()
    name = package.name.removesuffix(".tar")
    target = out if out is not None else package.with_name(f"{name}-evaluation")
    with package_folder(package) as folder:
        evaluate_package(
            folder,
            data,
            target,
            labels_csv,
            split,
            log=click.echo,
            progress=lambda line: click.echo(line, err=True),
            overwrite=overwrite,
        )


def register(group: click.Group) -> None:
    group.add_command(train_demo)
    group.add_command(train)
    group.add_command(evaluate)
