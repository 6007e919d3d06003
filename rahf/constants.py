"""The names every part of rahf shares: the four scores and the two heatmaps of rich feedback, in their canonical order
(the data set's columns, the model's default outputs, the reports' tables). Scores are higher-is-better in [0, 1]."""

from __future__ import annotations

__all__ = ["HEATMAP_NAMES", "SCORE_NAMES"]

SCORE_NAMES: tuple[str, ...] = ("plausibility", "alignment", "aesthetics", "overall")
HEATMAP_NAMES: tuple[str, ...] = ("implausibility", "misalignment")
