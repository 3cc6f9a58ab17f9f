"""Inference benchmark: dicomai's Classifier against plain torch on the same tensors.

For each architecture, at batch 1 and 8 (224², CPU threads as given): forward time through
`Classifier.predict` (a package without finding classes, so no heat map) against
``model(x)`` under ``torch.inference_mode()``; forward + Grad-CAM through `Classifier.predict`
against a textbook Grad-CAM (hooks on the same target layer, a full backward from the class
score, channel weights = mean gradients, ReLU, bilinear upsampling, scaled to the maximum).
Architectures whose heat maps are another method by default (the ViTs' attention relevance,
the DenseNet-Transformer's LayerCAM) are timed with Grad-CAM for that comparison, and with
their own method in the last column, against the same textbook Grad-CAM. A network that also
segments (``resnet50_multitask``) runs both branches in plain torch too (``forward_multitask``),
since the Classifier delivers its mask.
Prints a Markdown table of medians and ratios (dicomai ÷ plain: below 1 is faster); the four
measurements of a row take turns, round after round.

    .venv/bin/python bench/inference.py                # all but vit_l_16 and efficientnet_b7
    .venv/bin/python bench/inference.py --include-huge # those two as well
    .venv/bin/python bench/inference.py --models resnet50 densenet121
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dicomai.explain import default_method, find_target_layer
from dicomai.explain.gradcam import token_grid
from dicomai.imaging.spec import InputSpec
from dicomai.inference.runner import Classifier
from dicomai.inference.types import Code
from dicomai.models.architectures import ARCHITECTURES, build
from dicomai.models.package import ClassSpec, LoadedModel, Manifest

HUGE = ("vit_l_16", "efficientnet_b7")
SIZE = 224
CLASSES = (
    ClassSpec("normal", Code("17621005", "SCT", "Normal"), 0.5, False),
    ClassSpec("nodule", Code("27925004", "SCT", "Nodule"), 0.5, True),
)


def timed(runs: dict[str, Callable[[], object]], budget_s: float, most: int) -> dict[str, float]:
    """Median seconds of each of `runs` after one warm-up each, the runs taking turns, so
    that a change of the machine's load falls on all of them alike; as many rounds as fit
    `budget_s` per run (1..most)."""
    firsts = []
    for run in runs.values():
        started = time.perf_counter()
        run()
        firsts.append(time.perf_counter() - started)
    rounds = max(1, min(most, int(budget_s / max(max(firsts), 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def textbook_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Grad-CAM as the paper writes it, full backward, for class 1 of every image."""
    saved: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.register_hook(lambda grad: saved.__setitem__("grad", grad))
        saved["activation"] = output

    handle = layer.register_forward_hook(keep)
    try:
        model.zero_grad(set_to_none=True)
        logits = both_branches(model)(x)[0] if segments(model) else model(x)
        logits[:, 1].sum().backward()
    finally:
        handle.remove()
    activation, grad = token_grid(saved["activation"]), token_grid(saved["grad"])
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (cam / peak[:, None, None]).detach().cpu().numpy()


def segments(model: nn.Module) -> bool:
    return hasattr(model, "forward_multitask")


def both_branches(model: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    return model.forward_multitask  # type: ignore[no-any-return]


def classifier(model: nn.Module, findings: bool, method: str = "gradcam") -> Classifier:
    classes = (
        CLASSES
        if findings
        else tuple(ClassSpec(c.name, c.code, c.threshold, False) for c in CLASSES)
    )
    manifest = Manifest(
        name="bench",
        version="0.0.1",
        architecture="bench",
        classes=classes,
        input=InputSpec(size=(SIZE, SIZE)),
    )
    return Classifier(LoadedModel(manifest, model), batch_size=8, cam_method=method)


def bench_one(name: str, batch: int, budget_s: float) -> dict[str, float]:
    torch.manual_seed(0)
    model = build(name, 2).eval()
    # Classifier moves its network to channels_last in place: plain torch keeps its own copy
    # in torch's default layout, as a user's script would have it.
    ours = copy.deepcopy(model)
    x = torch.randn(batch, 3, SIZE, SIZE)
    images = [(str(i), x[i].numpy()) for i in range(batch)]
    layer = find_target_layer(model, x)

    def plain_forward() -> None:
        with torch.inference_mode():
            both_branches(model)(x) if segments(model) else model(x)

    # Built before the clock starts: building one runs its warm-up pass.
    forward_only, with_cam = classifier(ours, False), classifier(ours, True)
    runs: dict[str, Callable[[], object]] = {
        "plain_fwd": plain_forward,
        "ours_fwd": lambda: forward_only.predict(images),
        "plain_cam": lambda: textbook_gradcam(model, layer, x),
        "ours_cam": lambda: with_cam.predict(images),
    }
    own = default_method(model)
    if own != "gradcam":
        own_method = classifier(ours, True, own)
        runs["ours_own"] = lambda: own_method.predict(images)
    return timed(runs, budget_s, 5 if batch == 1 else 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="architectures (default: all but the huge)")
    parser.add_argument("--include-huge", action="store_true", help=f"also {', '.join(HUGE)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per measurement")
    args = parser.parse_args()
    names = args.models or [
        n for n in ARCHITECTURES if n != "tinycnn" and (args.include_huge or n not in HUGE)
    ]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {SIZE}², medians in ms")
    print(
        "| architecture | batch | plain fwd | dicomai fwd | ratio | plain fwd+CAM "
        "| dicomai fwd+CAM | ratio | dicomai fwd+own method (÷ plain fwd+CAM) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in names:
        for batch in (1, 8):
            r = {k: v * 1000 for k, v in bench_one(name, batch, args.budget).items()}
            own = (
                f"{r['ours_own']:.0f} ({r['ours_own'] / r['plain_cam']:.2f})"
                if "ours_own" in r
                else "same"
            )
            print(
                f"| {name} | {batch} | {r['plain_fwd']:.0f} | {r['ours_fwd']:.0f} | "
                f"{r['ours_fwd'] / r['plain_fwd']:.2f} | {r['plain_cam']:.0f} | "
                f"{r['ours_cam']:.0f} | {r['ours_cam'] / r['plain_cam']:.2f} | {own} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
