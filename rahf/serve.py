"""`rahf serve`: RAHF as an HTTP scoring server, with dynamic batching across concurrent requests.

    rahf serve --model DIR [--host 127.0.0.1] [--port 8000] [--max_batch_size 8] [--max_wait_ms 10]

Endpoints (JSON in and out; every error is `{"error": message}` with a 4xx status, 5xx only for a server fault):

- `GET /health` -> `{"status": "ok", "score_names": [...], "heatmap_names": [...], "requests": n, "batches": n, ...}`
- `POST /score` with `{"prompts": [...], "images": [base64 PNG / JPEG / WebP, ...]}` (or `"paths": [...]`, files
  under the server's `--image_root`, instead of `"images"`), and optionally `"heatmaps": "png"` (base64 mode "L" PNGs
  at each image's size, 0..255 = heat 0..1) or `"array"` (nested lists of floats) -> `{"results": [{"scores": {...},
  "misaligned_words": [...], "misaligned_word_indices": [...], "heatmaps": {...}}, ...]}`, one per image, in order.
  One prompt may stand for all the request's images.

Dynamic batching: requests wait in one queue; the batcher takes the oldest, then waits up to `max_wait_ms` for more
(of the same kind: with or without heatmaps) until `max_batch_size` images are gathered, runs them as one predictor
call on one worker thread, and hands each request its own rows. The model is only ever run by that thread, so
concurrent requests cannot mix. An answer equals `RichFeedbackPredictor` on the same request alone up to float32
rounding (the rows of a batch are computed together; measured differences are ~1e-7) and the same misaligned words.

Limits, each answered before any model work: the body size (`--max_body_bytes`, 413), images per request
(`--max_images`, 413), the pixel cap of `rahf.image_io` per image and `--max_request_pixels` for all of a request's
images (413, both read from the headers before anything is decoded), the number of images waiting (`--max_queue`,
503).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import logging
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .image_io import ImageTooLargeError, max_image_pixels

if TYPE_CHECKING:  # torch and transformers load with the model, not with `rahf --help`
    from .predictor import RichFeedback, RichFeedbackPredictor

logger = logging.getLogger(__name__)

__all__ = [
    "BackgroundServer",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_IMAGES",
    "DynamicBatcher",
    "HTTPError",
    "ServeConfig",
    "create_app",
    "parse_score_request",
    "register",
    "run_in_thread",
    "serve",
]

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # 64 MiB: dozens of 1024 px PNGs, base64-encoded
DEFAULT_MAX_IMAGES = 64
DEFAULT_MAX_REQUEST_PIXELS = 200_000_000  # 64 images of 1,770 x 1,770; a 24 MP photo; ~600 MB decoded as RGB
HEATMAP_FORMATS = ("png", "array")
# The file signatures of the formats the server decodes; anything else is refused before Pillow sees it.
_SIGNATURES = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",), "WebP": (b"RIFF",)}


class HTTPError(Exception):
    """A request the server refuses: the HTTP status and the message sent back as `{"error": message}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ServeConfig:
    """The server's settings.

    Args:
        max_batch_size (`int`, *optional*, defaults to 8): images gathered into one model call.
        max_wait_ms (`float`, *optional*, defaults to 10): how long the oldest waiting request may wait for others.
        max_body_bytes (`int`, *optional*, defaults to 64 MiB): the largest request body accepted.
        max_images (`int`, *optional*, defaults to 64): the most images in one request.
        max_queue (`int`, *optional*, defaults to 1024): the most images waiting; more are answered 503.
        max_request_pixels (`int`, *optional*, defaults to 200,000,000): the most pixels of all a request's images
            together, read from their headers before any is decoded (about 600 MB as RGB).
        image_root (`str`, *optional*): the folder whose files requests may name in `"paths"`; None refuses paths.
        max_image_pixels (`int`, *optional*): the pixel cap (default: `rahf.image_io.max_image_pixels()`).

    Examples:

    ```python
    >>> app = create_app(predictor, ServeConfig(max_batch_size=16, max_wait_ms=5, image_root="/data/generated"))
    ```
    """

    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_images: int = DEFAULT_MAX_IMAGES
    max_queue: int = 1024
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    image_root: str | None = None
    max_image_pixels: int | None = None

    def __post_init__(self):
        for name in ("max_batch_size", "max_body_bytes", "max_images", "max_queue", "max_request_pixels"):
            _check_positive_int(getattr(self, name), name)
        if (
            isinstance(self.max_wait_ms, bool)
            or not isinstance(self.max_wait_ms, (int, float))
            or self.max_wait_ms < 0
        ):
            raise ValueError(f"`max_wait_ms` must be a number >= 0, got {self.max_wait_ms!r}")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise ValueError(
                f"`image_root` {self.image_root!r} is not a folder; pass the folder images may be read from"
            )
        self.max_image_pixels = max_image_pixels(self.max_image_pixels)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------------------------
# Requests


def _base64_bytes(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise HTTPError(400, f"{where} must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:  # a data URL, as a browser writes it
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, f"{where} is not valid base64") from None
    return data


def _header_pixels(data: bytes, where: str, cap: int) -> int:
    """width x height from the file's header (nothing decoded), after checking that it is a PNG, JPEG or WebP."""
    if not any(data.startswith(sig) for sigs in _SIGNATURES.values() for sig in sigs) or (
        data.startswith(b"RIFF") and data[8:12] != b"WEBP"
    ):
        raise HTTPError(400, f"{where} is not a PNG, JPEG or WebP file (its first bytes are {data[:8]!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError as err:
        raise HTTPError(413, f"{where}: {err}") from None
    except Exception as err:  # Pillow raises many types on bad headers
        raise HTTPError(400, f"{where}: could not read it as an image ({type(err).__name__}: {err})") from None
    if width * height > cap:
        raise HTTPError(
            413, f"{where} is {width} x {height} = {width * height:,} pixels, more than the cap of {cap:,} per image"
        )
    return width * height


def _decode_image_bytes(data: bytes, where: str, cap: int) -> Image.Image:
    from .processing_rahf import load_image

    try:
        return load_image(data, max_pixels=cap)
    except ImageTooLargeError as err:
        raise HTTPError(413, f"{where}: {err}") from None
    except ValueError as err:
        raise HTTPError(400, f"{where}: {err}") from None


def _read_image_path(path: Any, where: str, root: Path | None, max_bytes: int) -> bytes:
    if root is None:
        raise HTTPError(403, f"{where}: this server reads no paths (start it with --image_root DIR); send images")
    if not isinstance(path, str) or not path:
        raise HTTPError(400, f"{where} must be a path relative to the image root, got {path!r}")
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise HTTPError(403, f"{where} {path!r} is outside the server's image root; name a file under it")
    if not resolved.is_file():
        raise HTTPError(404, f"{where} {path!r} is not a file under the server's image root")
    try:
        if resolved.stat().st_size > max_bytes:  # a file is held to the body's limit
            raise HTTPError(413, f"{where} {path!r} is larger than the limit of {max_bytes:,} bytes")
        data = resolved.read_bytes()
    except OSError as err:
        raise HTTPError(404, f"{where} {path!r} could not be read ({err.strerror})") from None
    return data


def parse_score_request(body: bytes, config: ServeConfig) -> tuple[list[Image.Image], list[str], str | None]:
    """A `/score` body -> (RGB images, one prompt per image, heatmap format or None), or an `HTTPError` saying what
    is wrong. Decodes the images, so it runs off the event loop."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise HTTPError(400, f"the body is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(payload, dict):
        raise HTTPError(400, f"the body must be a JSON object, got {type(payload).__name__}")
    unknown = set(payload) - {"prompts", "images", "paths", "heatmaps"}
    if unknown:
        raise HTTPError(400, f"unknown keys {sorted(unknown)}; a request holds prompts, images or paths, and heatmaps")
    if ("images" in payload) == ("paths" in payload):
        raise HTTPError(400, 'give exactly one of "images" (base64 files) and "paths" (files under the image root)')
    key = "images" if "images" in payload else "paths"
    items = payload[key]
    if not isinstance(items, list) or not items:
        raise HTTPError(400, f'"{key}" must be a non-empty list')
    if len(items) > config.max_images:
        raise HTTPError(413, f"{len(items)} images in one request, more than the limit of {config.max_images}")
    if "prompts" not in payload:
        raise HTTPError(400, '"prompts" is missing: give one prompt per image, or one for all')
    prompts = payload["prompts"]
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or len(prompts) not in (1, len(items)):
        raise HTTPError(
            400,
            f'"prompts" must be a list of one prompt, or of one per image ({len(items)}), got {_describe(prompts)}',
        )
    if len(prompts) == 1:
        prompts = prompts * len(items)
    from .processing_rahf import check_prompts

    try:
        check_prompts(prompts)
    except (TypeError, ValueError) as err:
        raise HTTPError(400, f"prompts: {err}") from None
    heatmaps = payload.get("heatmaps")
    if heatmaps is True:
        heatmaps = "png"
    if heatmaps is False:
        heatmaps = None
    if heatmaps is not None and heatmaps not in HEATMAP_FORMATS:
        raise HTTPError(
            400, f'"heatmaps" must be one of {list(HEATMAP_FORMATS)}, true, false or null, got {heatmaps!r}'
        )
    cap = config.max_image_pixels
    root = Path(config.image_root).resolve() if config.image_root is not None else None
    if key == "images":
        blobs = [_base64_bytes(item, f"images[{i}]") for i, item in enumerate(items)]
    else:
        blobs = [_read_image_path(item, f"paths[{i}]", root, config.max_body_bytes) for i, item in enumerate(items)]
    wheres = [f"{key}[{i}]" for i in range(len(blobs))]
    # Headers first: many small files that each decode to a large image must not be decoded at all.
    total = sum(_header_pixels(blob, where, cap) for blob, where in zip(blobs, wheres))
    if total > config.max_request_pixels:
        raise HTTPError(
            413, f"the images hold {total:,} pixels in all, more than the limit of {config.max_request_pixels:,}"
        )
    images = [_decode_image_bytes(blob, where, cap) for blob, where in zip(blobs, wheres)]
    return images, prompts, heatmaps


def _describe(value: Any) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__


def feedback_to_json(feedback: RichFeedback, heatmaps: str | None) -> dict:
    """One image's answer: scores, misaligned words and their indices, and the heatmaps when asked."""
    out = feedback.to_dict()
    del out["prompt"]  # the client sent it
    if heatmaps == "png":
        out["heatmaps"] = {name: _png_base64(heat) for name, heat in feedback.heatmaps.items()}
    elif heatmaps == "array":
        out["heatmaps"] = {name: heat.tolist() for name, heat in feedback.heatmaps.items()}
    return out


def _png_base64(heatmap: np.ndarray) -> str:
    from .viz import heatmap_to_image

    buffer = io.BytesIO()
    heatmap_to_image(heatmap).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------------------------------
# Dynamic batching


@dataclass
class _Job:
    images: list[Image.Image]
    prompts: list[str]
    outputs: tuple[str, ...] | None
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Gathers concurrent requests into predictor calls of up to `max_batch_size` images.

    The oldest waiting request waits at most `max_wait_s` for company; only requests asking for the same outputs
    share a call. A request larger than `max_batch_size` runs alone, in chunks of that size. All model calls run on
    one worker thread, in arrival order.

    Examples:

    ```python
    >>> batcher = DynamicBatcher(predictor, max_batch_size=8, max_wait_s=0.01)
    >>> feedback = await batcher.submit(images, prompts)  # inside the event loop, with batcher.run() as a task
    ```
    """

    def __init__(self, predictor: RichFeedbackPredictor, max_batch_size: int = 8, max_wait_s: float = 0.01):
        self.predictor = predictor
        self.max_batch_size = _check_positive_int(max_batch_size, "max_batch_size")
        self.max_wait_s = max_wait_s
        self.pending: deque[_Job] = deque()
        self.pending_images = 0
        self.batches = 0
        self.batched_images = 0
        self.requests = 0
        self._wakeup: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rahf-model")
        # The predictor's own batch size is the batcher's, so that one gathered batch is one forward pass.
        predictor.batch_size = self.max_batch_size

    async def submit(
        self, images: list[Image.Image], prompts: list[str], outputs: tuple[str, ...] | None = None
    ) -> list[RichFeedback]:
        loop = asyncio.get_running_loop()
        job = _Job(images, prompts, outputs, loop.create_future())
        self.pending.append(job)
        self.pending_images += len(images)
        self._event().set()
        return await job.future

    def _event(self) -> asyncio.Event:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        return self._wakeup

    def _take(self) -> list[_Job]:
        """The oldest job and the next ones asking for the same outputs, up to max_batch_size images."""
        first = self.pending[0]
        taken, count = [], 0
        for job in list(self.pending):
            if job.outputs != first.outputs:
                continue
            if taken and count + len(job.images) > self.max_batch_size:
                break
            taken.append(job)
            count += len(job.images)
        for job in taken:
            self.pending.remove(job)
            self.pending_images -= len(job.images)
        return taken

    def _ready_count(self) -> int:
        first = self.pending[0]
        return sum(len(job.images) for job in self.pending if job.outputs == first.outputs)

    async def run(self) -> None:
        """The batching loop; runs until cancelled."""
        loop = asyncio.get_running_loop()
        event = self._event()
        while True:
            if not self.pending:
                event.clear()
                await event.wait()
                continue
            deadline = self.pending[0].arrived + self.max_wait_s
            while self._ready_count() < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
                event.clear()
                try:
                    await asyncio.wait_for(event.wait(), timeout=remaining)
                except asyncio.TimeoutError:
                    break
            jobs = self._take()
            images = [im for job in jobs for im in job.images]
            prompts = [p for job in jobs for p in job.prompts]
            outputs = list(jobs[0].outputs) if jobs[0].outputs is not None else None
            try:
                results = await loop.run_in_executor(self._executor, self.predictor, images, prompts, outputs)
            except Exception as err:  # a fault of ours, not the client's: each request of the batch gets a 500
                logger.exception("a batch of %d image(s) failed", len(images))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            self.batches += 1
            self.batched_images += len(images)
            self.requests += len(jobs)
            start = 0
            for job in jobs:
                if not job.future.done():  # a client that went away has cancelled its future
                    job.future.set_result(results[start : start + len(job.images)])
                start += len(job.images)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------------------------------
# The app


# A body over the limit is read on and thrown away up to this much, so that the client, still sending, reads the 413
# and its message instead of a broken pipe; beyond it the server answers and closes at once.
DRAIN_BYTES = 64 * 1024 * 1024


async def _drain(request, consumed: int) -> None:
    async for chunk in request.stream():
        consumed += len(chunk)
        if consumed > DRAIN_BYTES:
            return


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_size = int(declared)
        except ValueError:
            raise HTTPError(400, f"Content-Length {declared!r} is not a number") from None
        if declared_size > limit:
            if declared_size <= limit + DRAIN_BYTES:
                await _drain(request, 0)
            raise HTTPError(413, f"the body is {declared_size:,} bytes, more than the limit of {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            chunks.clear()
            await _drain(request, size - limit)
            raise HTTPError(413, f"the body is more than the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(predictor: RichFeedbackPredictor, config: ServeConfig | None = None):
    """The Starlette app serving `predictor`; run it with uvicorn (as `serve` does) or any ASGI server."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    config = config or ServeConfig()
    batcher = DynamicBatcher(predictor, config.max_batch_size, config.max_wait_ms / 1000.0)
    model_config = predictor.model.config

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "score_names": list(model_config.score_names),
                "heatmap_names": list(model_config.heatmap_names),
                "max_batch_size": batcher.max_batch_size,
                "max_wait_ms": config.max_wait_ms,
                "max_images": config.max_images,
                "max_body_bytes": config.max_body_bytes,
                "paths_allowed": config.image_root is not None,
                "queued_images": batcher.pending_images,
                "requests": batcher.requests,
                "batches": batcher.batches,
                "images": batcher.batched_images,
            }
        )

    async def score(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, config.max_body_bytes)
            images, prompts, heatmaps = await run_in_threadpool(parse_score_request, body, config)
            if batcher.pending_images + len(images) > config.max_queue:
                raise HTTPError(503, f"{batcher.pending_images} images are waiting already; retry in a moment")
        except HTTPError as err:
            return JSONResponse({"error": err.message}, status_code=err.status)
        outputs = None if heatmaps else ("scores", "keywords")
        try:
            feedback = await batcher.submit(images, prompts, outputs)
        except Exception as err:
            return JSONResponse({"error": f"scoring failed: {type(err).__name__}: {err}"}, status_code=500)
        results = await run_in_threadpool(lambda: [feedback_to_json(fb, heatmaps) for fb in feedback])
        return JSONResponse({"results": results})

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Unknown routes and wrong methods answer in the same JSON shape as everything else.
        return JSONResponse(
            {"error": f"{exc.detail}: {request.method} {request.url.path}"}, status_code=exc.status_code
        )

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            task.cancel()
            batcher.close()

    app = Starlette(
        routes=[Route("/health", health, methods=["GET"]), Route("/score", score, methods=["POST"])],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    return app


class BackgroundServer:
    """Any ASGI app under uvicorn on a socket of our own (127.0.0.1, a free port by default), in a thread: for tests
    and benchmarks; `url` is its address. A context manager that returns once the server answers."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def run_in_thread(
    predictor: RichFeedbackPredictor, config: ServeConfig | None = None, port: int = 0
) -> BackgroundServer:
    """A context manager serving `predictor` on 127.0.0.1 (a free port by default) in a background thread.

    Examples:

    ```python
    >>> with run_in_thread(predictor) as server:
    ...     RAHFClient(server.url).score([image], ["a cat"])
    ```
    """
    return BackgroundServer(create_app(predictor, config), port=port)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, device: str | None = None, **config) -> None:
    """Loads the model folder and serves it until interrupted."""
    import uvicorn

    from .predictor import RichFeedbackPredictor

    serve_config = ServeConfig(**config)  # checked before the model loads
    predictor = RichFeedbackPredictor.from_pretrained(
        model, device=device, max_image_pixels=serve_config.max_image_pixels
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can use the model", host)
    logger.info("serving %s on http://%s:%d (max_batch_size=%d)", model, host, port, serve_config.max_batch_size)
    uvicorn.run(create_app(predictor, serve_config), host=host, port=port, log_level="info")


def register(parser: argparse.ArgumentParser) -> None:
    """Adds `rahf serve`'s flags to `parser`."""
    from .job_args import positive_int

    parser.add_argument("--model", required=True, help="folder written by save_pretrained (model + processor)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cpu)")
    parser.add_argument("--max_batch_size", type=positive_int, default=8, help="images per model call (default: 8)")
    parser.add_argument(
        "--max_wait_ms", type=float, default=10.0, help="longest wait for a fuller batch (default: 10)"
    )
    parser.add_argument("--max_body_bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--max_images", type=positive_int, default=DEFAULT_MAX_IMAGES, help="images per request")
    parser.add_argument("--max_queue", type=positive_int, default=1024, help="images waiting before 503s")
    parser.add_argument(
        "--max_request_pixels", type=positive_int, default=DEFAULT_MAX_REQUEST_PIXELS, help="all images of a request"
    )
    parser.add_argument("--image_root", default=None, help='folder that requests may name files under ("paths")')
    parser.add_argument("--max_image_pixels", type=positive_int, default=None)


def run_from_args(args: argparse.Namespace) -> int:
    serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_body_bytes=args.max_body_bytes,
        max_images=args.max_images,
        max_queue=args.max_queue,
        max_request_pixels=args.max_request_pixels,
        image_root=args.image_root,
        max_image_pixels=args.max_image_pixels,
    )
    return 0
