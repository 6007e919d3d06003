"""`RAHFClient`: the client of `rahf serve`, and its scores as the reward of an external trainer.

Standard library only (urllib), so that a trainer's environment needs nothing but rahf's own package to call it;
`reward_fn` gives the rewards' one signature, `fn(images, prompts, metadata) -> (scores, info)`.

Examples:

```python
>>> from rahf.client import RAHFClient
>>> client = RAHFClient("http://127.0.0.1:8000")
>>> client.health()["status"]
'ok'
>>> [result] = client.score(["cat.png"], ["a cat on a table"], heatmaps="png")
>>> result["scores"]["overall"], result["misaligned_words"], result["heatmaps"]["implausibility"].shape
>>> reward = client.reward_fn("aesthetics=0.5,plausibility=0.5")
>>> scores, info = reward(images, prompts, None)  # (B,) tensor, info["scores"] holds all four per image
```
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["RAHFClient", "RAHFServerError", "encode_image"]


class RAHFServerError(RuntimeError):
    """The server refused or failed a request: `status` is the HTTP status, `message` the server's error text."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def encode_image(image: Any) -> str:
    """A PIL image, a uint8 (H, W[, C]) array, a (3, H, W) float tensor in [0, 1], encoded bytes or a local file path
    -> the base64 text of a PNG (or of the file's own bytes)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(image)).decode("ascii")
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return base64.b64encode(f.read()).decode("ascii")
    if hasattr(image, "detach"):  # a torch tensor (C, H, W) in [0, 1], as generators hand them out
        array = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot send a {type(image).__name__} as an image; pass a PIL image, array, tensor or path")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class RAHFClient:
    """Calls a `rahf serve` server.

    Args:
        url (`str`, *optional*, defaults to `"http://127.0.0.1:8000"`): the server's address.
        timeout (`float`, *optional*, defaults to 120): seconds to wait for one answer.

    Examples:

    ```python
    >>> client = RAHFClient("http://127.0.0.1:8000")
    >>> [result] = client.score([Image.open("cat.png")], "a cat on a table")
    >>> result["scores"]["plausibility"], result["misaligned_words"]
    ```
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                message = json.loads(body).get("error", body.decode(errors="replace"))
            except (ValueError, AttributeError):
                message = body.decode(errors="replace")
            raise RAHFServerError(err.code, message) from None

    def health(self) -> dict:
        """`GET /health`: the server's state (score names, batch settings, counts of requests and batches)."""
        return self._request("GET", "/health")

    def score(
        self,
        images: Sequence[Any] | None,
        prompts: Sequence[str] | str,
        heatmaps: str | None = None,
        paths: Sequence[str] | None = None,
    ) -> list[dict]:
        """Scores `images` (sent as PNG) or `paths` (files under the server's `--image_root`) against `prompts`.

        Args:
            heatmaps: None (no heatmaps), `"png"` or `"array"`; either way they come back as float32 (H, W) arrays in
                [0, 1] (PNG ones quantised to 1/255).

        Returns:
            One dict per image: `scores`, `misaligned_words`, `misaligned_word_indices` and, when asked, `heatmaps`.
        """
        payload: dict[str, Any] = {"prompts": [prompts] if isinstance(prompts, str) else list(prompts)}
        if paths is not None:
            payload["paths"] = [str(p) for p in paths]
        else:
            payload["images"] = [encode_image(im) for im in images]
        if heatmaps is not None:
            payload["heatmaps"] = heatmaps
        results = self._request("POST", "/score", payload)["results"]
        for result in results:
            for name, heat in result.get("heatmaps", {}).items():
                if isinstance(heat, str):
                    grey = Image.open(io.BytesIO(base64.b64decode(heat)))
                    result["heatmaps"][name] = np.asarray(grey, dtype=np.float32) / 255.0
                else:
                    result["heatmaps"][name] = np.asarray(heat, dtype=np.float32)
        return results

    def reward_fn(self, spec: str | dict[str, float] = "overall") -> Callable[..., tuple[Any, dict]]:
        """The server's answers as a reward `fn(images, prompts, metadata) -> (scores (B,), info)`.

        `spec` as `rahf.reward.parse_reward` reads it: a score name (`"overall"`), `"-implausibility"` (minus the mean
        heat), or a mix such as `"aesthetics=0.7,-implausibility=0.3"`. `images` is a (B, 3, H, W) tensor in [0, 1]
        or a list of images; `info["scores"]` holds the four scores of every image.
        """
        import torch

        from .reward import parse_reward

        parsed = parse_reward(spec)
        weights = parsed if isinstance(parsed, dict) else {parsed.lstrip("-"): -1.0 if parsed.startswith("-") else 1.0}
        health = self.health()
        known = set(health["score_names"]) | set(health["heatmap_names"])
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ValueError(
                f"reward {spec!r} names {unknown}, which the server does not output; it has {sorted(known)}"
            )
        want_heat = any(name in health["heatmap_names"] for name in weights)

        def reward(images, prompts, metadata=None):
            batch = list(images.unbind(0)) if hasattr(images, "unbind") else list(images)
            results = self.score(batch, prompts, heatmaps="array" if want_heat else None)
            values = []
            for result in results:
                total = 0.0
                for name, weight in weights.items():
                    value = (
                        result["scores"][name] if name in result["scores"] else float(result["heatmaps"][name].mean())
                    )
                    total += weight * value
                values.append(total)
            info = {
                "scores": {name: [r["scores"][name] for r in results] for name in health["score_names"]},
                "misaligned_words": [r["misaligned_words"] for r in results],
            }
            return torch.tensor(values, dtype=torch.float32), info

        return reward
