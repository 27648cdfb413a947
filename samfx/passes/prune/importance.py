"""Importance criteria of the ``prune`` pass, registered by name (Torch-Pruning's
``importance`` seam): each says what it needs from calibration (gradients of a
loss, input statistics) and builds a torch-pruning group criterion.

* ``magnitude``: L2 norm of the group's weights, data-free;
* ``taylor``: |w * dL/dw| with L the image embedding's energy;
* ``disturbed_taylor``: SlimSAM's L = MSE(embedding, embedding.detach() + N(0,
  sigma^2)), without which the gradient would be zero;
* ``fluctuation``: FLAP's variance of each channel where a layer reads it, times
  the squared norm of the weights reading it.

Example::

    >>> from samfx.passes.prune.importance import IMPORTANCES, get_importance
    >>> IMPORTANCES
    ('magnitude', 'taylor', 'disturbed_taylor', 'fluctuation')
    >>> get_importance("fluctuation").statistics, get_importance("taylor").loss is not None
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...capture import CapturedModel, Component
from ..base import PassContext

__all__ = ["IMPORTANCES", "Importance", "accumulate_gradients", "get_importance", "input_statistics", "reads_channels",
           "register_importance"]

#: Per layer name, the mean and variance of each input channel over the calibration inputs.
Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]
#: A loss on the encoder features whose gradients a Taylor criterion reads: (features, noise, generator).
Loss = Callable[[list[torch.Tensor], float, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Importance:
    """A registered criterion.

    Attributes:
        name: what ``PruneConfig.importance`` names.
        build: ``(statistics, layer names) -> criterion``, a torch-pruning group
            criterion (a callable on a group, scores per root channel).
        loss: for gradient criteria, the loss whose gradients fill ``.grad``.
        statistics: whether it reads input statistics from calibration.
    """

    name: str
    build: Callable[[Statistics | None, dict[nn.Module, str]], Any]
    loss: Loss | None = None
    statistics: bool = False

    @property
    def needs_data(self) -> bool:
        return self.loss is not None or self.statistics


_IMPORTANCES: dict[str, Importance] = {}


def register_importance(importance: Importance) -> Importance:
    """Register a criterion under its name (a later one with the same name replaces it)."""
    _IMPORTANCES[importance.name] = importance
    return importance


def get_importance(name: str) -> Importance:
    try:
        return _IMPORTANCES[name]
    except KeyError:
        raise ValueError(f"unknown importance {name!r}; registered: {', '.join(_IMPORTANCES)}") from None


def reads_channels(module: nn.Module) -> bool:
    """A Linear or a dense Conv: each output mixes all input channels."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def accumulate_gradients(captured: CapturedModel, component: Component, inputs: list[torch.Tensor],
                         importance: Importance, noise: float, context: PassContext) -> None:
    """Fill ``.grad`` of the component's parameters with the gradients of the
    criterion's loss on the encoder features, summed over the inputs."""
    from tqdm.auto import tqdm

    params = list(component.root.parameters())
    flags = [p.requires_grad for p in params]
    generator = torch.Generator().manual_seed(context.seed)
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for x in tqdm(inputs, desc=f"prune: {importance.name}", unit="image", disable=not context.progress):
                features = captured.adapter.encoder_features(component.root(x))
                importance.loss(features, noise, generator).backward()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def input_statistics(component: Component, inputs: list[torch.Tensor],
                      context: PassContext) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and variance of every input channel of every Linear and dense Conv,
    over all positions of the calibration inputs."""
    from tqdm.auto import tqdm

    sums: dict[str, list[Any]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().double()
            x = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else x.transpose(1, -1).reshape(-1, x.shape[1])
            entry = sums.setdefault(name, [0, 0.0, 0.0])
            entry[0] += x.shape[0]
            entry[1] = entry[1] + x.sum(0)
            entry[2] = entry[2] + x.pow(2).sum(0)
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in component.root.named_modules() if reads_channels(m)]
    try:
        with torch.no_grad():
            for x in tqdm(inputs, desc="prune: statistics", unit="image", disable=not context.progress):
                component.root(x)
    finally:
        for hook in hooks:
            hook.remove()
    statistics = {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        statistics[name] = (mean.float(), (squares / count - mean.pow(2)).clamp_min(0).float())
    return statistics


def _column_energy(module: nn.Module) -> torch.Tensor:
    """Squared norm of the weights that read each input channel."""
    weight = module.weight.detach()
    return weight.pow(2).sum(0) if weight.dim() == 2 else weight.pow(2).sum((0, 2, 3))


class Fluctuation:
    """FLAP's criterion, as a torch-pruning group criterion: for every layer of the
    group that reads the channels, variance times squared weight norm, summed."""

    def __init__(self, statistics: dict[str, tuple[torch.Tensor, torch.Tensor]], names: dict[nn.Module, str]) -> None:
        self.statistics, self.names = statistics, names

    def __call__(self, group: Any) -> torch.Tensor | None:
        scores, found = None, False
        for item in group:
            layer, name = item.dep.target.module, self.names.get(item.dep.target.module)
            if name not in self.statistics or group._DG.is_out_channel_pruning_fn(item.dep.handler):
                continue
            variance = self.statistics[name][1]
            local = (variance * _column_energy(layer))[item.idxs]
            scores = torch.zeros(len(group[0].idxs)) if scores is None else scores
            scores.index_add_(0, torch.as_tensor(item.root_idxs), local.cpu())
            found = True
        return scores if found else None


def _magnitude(statistics: Statistics | None, names: dict[nn.Module, str]) -> Any:
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)


def _taylor(statistics: Statistics | None, names: dict[nn.Module, str]) -> Any:
    import torch_pruning as tp

    return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)


def _energy(features: list[torch.Tensor], noise: float, generator: torch.Generator) -> torch.Tensor:
    return sum(0.5 * f.pow(2).mean() for f in features)


def _disturbed(features: list[torch.Tensor], noise: float, generator: torch.Generator) -> torch.Tensor:
    # SlimSAM: the disturbed target makes the gradient non-zero before anything is pruned
    return sum(F.mse_loss(f, f.detach() + noise * torch.randn(f.shape, generator=generator).to(f)) for f in features)


register_importance(Importance("magnitude", _magnitude))
register_importance(Importance("taylor", _taylor, loss=_energy))
register_importance(Importance("disturbed_taylor", _taylor, loss=_disturbed))
register_importance(Importance("fluctuation", lambda statistics, names: Fluctuation(statistics or {}, names),
                               statistics=True))

IMPORTANCES = tuple(_IMPORTANCES)
