"""Fine-tuning strategies: which parameters train, at which learning rate, in which epochs.

A network splits into its *head* (the modules it lists in ``head_modules``, such as a multi-task
network's classifier and decoder; else torchvision's ``fc``, ``classifier`` or ``heads``, our
composites' ``head``, else the last ``nn.Linear``) and its *backbone*, everything else, cut into
blocks in forward order (a ResNet's stem and residual blocks, a DenseNet's dense blocks and
transitions...). A strategy is a list of phases; each phase trains some blocks with
its own optimiser and a fresh warm-up + cosine schedule over the phase's epochs.

- ``full``: everything at ``lr`` for all epochs.
- ``frozen``: the head only, at ``lr``.
- ``two-stage``: the head only for ``freeze_epochs`` at ``head_lr``, then everything at ``lr``.
- ``lld`` (layer-wise learning-rate decay): everything; the head at ``lr``, the k-th backbone
  block from the top at ``lr * layer_decay**k``. With ``lld_unit = "stage"`` the unit is a
  stage instead of a block: each stack of blocks (a ResNet's ``layer1``...``layer4``, a
  DenseNet's dense blocks) with the layers that follow it up to the next stack (a transition),
  and the stem before the first stack; so ``layer4`` trains at ``lr * layer_decay``,
  ``layer3`` at ``lr * layer_decay**2``..., as seed 002's per-stage rates do. ``lld_rates``
  gives the units' rates from the top instead of a decay (seed 002 trains ``layer2`` and
  ``layer1`` both at 1e-6); units beyond the list do not train, as parameters left out of a
  hand-written optimiser's groups do not (seed 002's stem).
- ``gradual``: the head only, then at each epoch of ``unfreeze_at`` the next slice of backbone
  blocks from the top joins (the last slice is the rest), all at ``lr``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import StrEnum

from torch import nn

from dicomai.errors import DatasetError

_HEAD_NAMES = ("fc", "classifier", "heads", "head")


class Strategy(StrEnum):
    FULL = "full"
    FROZEN = "frozen"
    TWO_STAGE = "two-stage"
    LLD = "lld"
    GRADUAL = "gradual"


class DecayUnit(StrEnum):
    """What one step of layer-wise decay spans (see the module's docstring)."""

    BLOCK = "block"
    STAGE = "stage"


@dataclass(frozen=True)
class StrategySettings:
    """The strategy and its knobs (see the module's docstring)."""

    strategy: Strategy = Strategy.FULL
    lr: float = 1e-4
    head_lr: float = 3e-4
    freeze_epochs: int = 5
    layer_decay: float = 0.75
    unfreeze_at: tuple[int, ...] = ()
    lld_unit: DecayUnit = DecayUnit.BLOCK
    lld_rates: tuple[float, ...] = ()


@dataclass(frozen=True)
class Phase:
    """Epochs ``[start, stop)`` training the given parameter groups (parameters, lr)."""

    start: int
    stop: int
    groups: tuple[tuple[tuple[nn.Parameter, ...], float], ...]

    @property
    def epochs(self) -> int:
        return self.stop - self.start

    def parameters(self) -> set[int]:
        return {id(p) for params, _ in self.groups for p in params}


def find_head(model: nn.Module) -> nn.Module:
    """The task heads: those the network names in ``head_modules`` (a multi-task network's
    classifier *and* segmentation decoder, both new on a pretrained encoder), else a named
    head holding a Linear, else the last Linear."""
    declared = getattr(model, "head_modules", ())
    if declared:
        return nn.ModuleList(_as_module(getattr(model, name)) for name in declared)
    for name in _HEAD_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and any(
            isinstance(m, nn.Linear) for m in module.modules()
        ):
            return module
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DatasetError(f"{type(model).__name__}: no Linear classification head to train")
    return linears[-1]


def _as_module(part: nn.Module | nn.Parameter) -> nn.Module:
    """A declared head part; a bare parameter (a class token) in a holder of its own."""
    if isinstance(part, nn.Parameter):
        holder = nn.Module()
        holder.register_parameter("value", part)
        return holder
    return part


def backbone_blocks(model: nn.Module) -> list[tuple[nn.Parameter, ...]]:
    """The backbone's parameters in blocks, input side first; the head's are left out."""
    head = {id(p) for p in find_head(model).parameters()}
    blocks = [block for block in _blocks(_backbone_root(model, head), head) if block]
    return _merged(blocks, MAX_BLOCKS)


def backbone_stages(model: nn.Module) -> list[tuple[nn.Parameter, ...]]:
    """The backbone's parameters in stages, input side first (see the module's docstring);
    the head's are left out."""
    head = {id(p) for p in find_head(model).parameters()}
    return [stage for stage in _stages(_backbone_root(model, head), head) if stage]


def _backbone_root(model: nn.Module, head: set[int]) -> nn.Module:
    """The innermost module that holds the whole backbone (a DenseNet's ``features``)."""
    module = model
    while True:
        holders = [c for c in module.children() if _own(c, head)]
        if len(holders) != 1 or list(module.parameters(recurse=False)):
            return module
        module = holders[0]


def _stages(module: nn.Module, head: set[int]) -> list[tuple[nn.Parameter, ...]]:
    """One stage per stack of blocks, the layers after a stack joining it, those before the
    first one (the stem) a stage of their own."""
    stages = [[p for p in module.parameters(recurse=False) if id(p) not in head]]
    for child in module.children():
        if _is_stack(child):
            stages.append(list(_own(child, head)))
        elif any(_is_stack(inner) for inner in child.modules()):
            stages += [list(stage) for stage in _stages(child, head)]
        else:
            stages[-1] += _own(child, head)
    return [tuple(stage) for stage in stages]


# Layer-wise decay and gradual unfreezing count depth in blocks: DenseNet-121's 58 dense
# layers, one block each, left its stem a learning rate 0.75^64 of the head's (frozen in all
# but name). Consecutive blocks are merged down to this many.
MAX_BLOCKS = 16


def _blocks(module: nn.Module, head: set[int]) -> list[tuple[nn.Parameter, ...]]:
    """One block per child, a repeated layer of a container one each (a ResNet stage's
    bottlenecks, a ViT encoder's layers, found where they are nested: ``encoder.layers``)."""
    blocks = [tuple(p for p in module.parameters(recurse=False) if id(p) not in head)]
    for child in module.children():
        if _is_stack(child):
            blocks += [_own(part, head) for part in child.children()]
        elif any(_is_stack(inner) for inner in child.modules()):
            blocks += _blocks(child, head)
        else:
            blocks.append(_own(child, head))
    return blocks


def _is_stack(module: nn.Module) -> bool:
    parts = list(module.children())
    return isinstance(module, nn.Sequential | nn.ModuleList | nn.ModuleDict) and any(
        list(part.children()) for part in parts
    )


def _merged(blocks: list[tuple[nn.Parameter, ...]], most: int) -> list[tuple[nn.Parameter, ...]]:
    """`blocks` with consecutive ones joined into at most `most`, as even as they divide."""
    if len(blocks) <= most:
        return blocks
    edges = [round(i * len(blocks) / most) for i in range(most + 1)]
    return [
        tuple(p for block in blocks[start:stop] for p in block)
        for start, stop in itertools.pairwise(edges)
    ]


def _own(module: nn.Module, head: set[int]) -> tuple[nn.Parameter, ...]:
    return tuple(p for p in module.parameters() if id(p) not in head)


def plan(model: nn.Module, settings: StrategySettings, epochs: int) -> list[Phase]:
    """The phases of `settings.strategy` over `epochs` epochs for this network; parameters the
    network froze when it was built train in none.

    Raises
    ------
    DatasetError
        If the strategy's epochs do not fit in `epochs` (the message says which).
    """
    # Frozen by the network itself when built (DenseNet-Transformer's `frozen_blocks`): kept so
    # in every phase; the phases switched them back on, and their BatchNorm statistics moved.
    fixed = {id(p) for p in model.parameters() if not p.requires_grad}
    head = tuple(p for p in find_head(model).parameters() if id(p) not in fixed)
    blocks = _trainable(backbone_blocks(model), fixed)
    everything = tuple(p for block in blocks for p in block) + head
    lr = settings.lr
    match settings.strategy:
        case Strategy.FULL:
            return [Phase(0, epochs, ((everything, lr),))]
        case Strategy.FROZEN:
            return [Phase(0, epochs, ((head, lr),))]
        case Strategy.TWO_STAGE:
            first = settings.freeze_epochs
            if not 0 < first < epochs:
                raise DatasetError(
                    f"two-stage: --freeze-epochs {first} must leave epochs for the second stage "
                    f"(1 to {epochs - 1} of --epochs {epochs})"
                    if epochs > 1
                    else "two-stage needs --epochs 2 or more (one stage frozen, one not)"
                )
            return [
                Phase(0, first, ((head, settings.head_lr),)),
                Phase(first, epochs, ((everything, lr),)),
            ]
        case Strategy.LLD:
            units = blocks
            if DecayUnit(settings.lld_unit) is DecayUnit.STAGE:
                units = _trainable(backbone_stages(model), fixed)
            top_first = list(reversed(units))
            rates = settings.lld_rates or tuple(
                lr * settings.layer_decay**depth for depth in range(1, len(units) + 1)
            )
            if len(rates) > len(top_first):
                unit = DecayUnit(settings.lld_unit).value
                raise DatasetError(
                    f"lld: --lld-rates gives {len(rates)} rates, the network has "
                    f"{len(top_first)} backbone {unit}{'' if len(top_first) == 1 else 's'}"
                )
            groups = [(head, lr), *zip(top_first, rates, strict=False)]
            return [Phase(0, epochs, tuple(groups))]
        case Strategy.GRADUAL:
            return _gradual(head, blocks, settings, epochs)
    raise DatasetError(f"unknown strategy {settings.strategy!r}")


def _trainable(
    parts: list[tuple[nn.Parameter, ...]], fixed: set[int]
) -> list[tuple[nn.Parameter, ...]]:
    """`parts` without the parameters in `fixed`, empty parts dropped."""
    kept = (tuple(p for p in part if id(p) not in fixed) for part in parts)
    return [part for part in kept if part]


def _gradual(
    head: tuple[nn.Parameter, ...],
    blocks: list[tuple[nn.Parameter, ...]],
    settings: StrategySettings,
    epochs: int,
) -> list[Phase]:
    points = sorted(set(settings.unfreeze_at))
    if not points or points[0] <= 0 or points[-1] >= epochs:
        raise DatasetError(
            f"gradual: --unfreeze-at epochs must be 1 to {epochs - 1} of --epochs {epochs}"
            if epochs > 1
            else "gradual unfreezing needs --epochs 2 or more"
        )
    top_first = list(reversed(blocks))
    # Slice k of the backbone (from the top) joins at points[k]; the last slice is the rest.
    size = max(1, len(top_first) // len(points))
    trainable = head
    phases = [Phase(0, points[0], ((trainable, settings.lr),))]
    for k, start in enumerate(points):
        stop = points[k + 1] if k + 1 < len(points) else epochs
        chunk = (
            top_first[k * size :] if k + 1 == len(points) else top_first[k * size : (k + 1) * size]
        )
        trainable = trainable + tuple(p for block in chunk for p in block)
        phases.append(Phase(start, stop, ((trainable, settings.lr),)))
    return phases


def phase_index(phases: list[Phase], epoch: int) -> int:
    """Which phase epoch `epoch` (0-based) belongs to."""
    for index, phase in enumerate(phases):
        if phase.start <= epoch < phase.stop:
            return index
    return len(phases) - 1


def set_trainable(model: nn.Module, phase: Phase) -> None:
    """Gradients on for the phase's parameters only; frozen BatchNorm layers kept in eval mode.

    Call after ``model.train()``: a frozen block's BatchNorm must not keep updating its running
    statistics, or the backbone drifts even though none of its weights train.
    """
    keep = phase.parameters()
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in keep)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = list(module.parameters())
            if own and not any(p.requires_grad for p in own):
                module.eval()
