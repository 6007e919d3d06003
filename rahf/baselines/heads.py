"""What the trainable baselines share: their own heads' initialisation, the MLP score head, the output-name check and
the loss (RAHF's, without the sequence term)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig

from ..configuration_rahf import KEYWORDS_TASK

__all__ = ["HEATMAP_BIAS_INIT", "baseline_losses", "check_output_names", "init_own", "mark_own", "mlp"]

# As RAHF's heatmap head: heatmaps are mostly empty, so the logits start where sigmoid is ~0.018.
HEATMAP_BIAS_INIT = -4.0


def mark_own(*modules: nn.Module) -> None:
    """Marks every layer of `modules` as the baseline's own, for `init_own` (the pretrained towers stay as loaded)."""
    for head in modules:
        for m in head.modules():
            m._rahf_own = True


@torch.no_grad()
def init_own(module: nn.Module) -> None:
    """`_init_weights` of the trainable baselines: initialises a layer marked by `mark_own`, and leaves the rest."""
    # Only our own heads: the towers initialise themselves (or come pretrained).
    if not getattr(module, "_rahf_own", False):
        return
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if getattr(module, "_rahf_heatmap_out", False):
        nn.init.constant_(module.bias, HEATMAP_BIAS_INIT)


def mlp(in_features: int, hidden_sizes: Sequence[int], out_features: int) -> nn.Sequential:
    """Linear layers of widths `hidden_sizes`, each followed by a ReLU, then a linear layer to `out_features`."""
    layers: list[nn.Module] = []
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def check_output_names(score_names: list[str], heatmap_names: list[str]) -> None:
    """A config's output names must be distinct and none of them the keywords task (no baseline writes keywords)."""
    names = list(score_names) + list(heatmap_names)
    if len(set(names)) != len(names) or KEYWORDS_TASK in names:
        raise ValueError(f"`score_names` and `heatmap_names` must be distinct and not {KEYWORDS_TASK!r}, got {names}")


def baseline_losses(
    config: PreTrainedConfig,
    heatmaps: torch.Tensor | None,
    heatmap_labels: torch.Tensor | None,
    scores: torch.Tensor | None,
    score_labels: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Weighted heatmap MSE (per pixel) + score MSE, as RAHF's loss without the sequence term."""
    terms, heatmap_loss, score_loss = [], None, None
    if heatmaps is not None and heatmap_labels is not None:
        if heatmap_labels.shape != heatmaps.shape:
            raise ValueError(
                f"`heatmap_labels` must have shape {tuple(heatmaps.shape)} (batch, heatmaps, size, size), got "
                f"{tuple(heatmap_labels.shape)}"
            )
        heatmap_loss = F.mse_loss(heatmaps, heatmap_labels.to(heatmaps.dtype))
        terms.append(config.heatmap_loss_weight * heatmap_loss)
    if scores is not None and score_labels is not None:
        if score_labels.shape != scores.shape:
            raise ValueError(f"`score_labels` must have shape {tuple(scores.shape)}, got {tuple(score_labels.shape)}")
        score_loss = F.mse_loss(scores, score_labels.to(scores.dtype))
        terms.append(config.score_loss_weight * score_loss)
    loss = torch.stack(terms).sum() if terms else None
    return loss, heatmap_loss, score_loss
