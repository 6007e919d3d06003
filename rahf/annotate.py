"""`rahf annotate`: a local web page for collecting rich feedback as in the paper's Fig. 1, one image at a time.

    rahf annotate --images DIR [--prompts FILE] --out annotations.jsonl [--annotator NAME] [--port 8080]

The page (our own HTML, JS and CSS in `rahf/assets/annotate/`, nothing fetched from elsewhere) shows an image and its
prompt: a click on the image puts a point of the current kind (red: implausibility, blue: misalignment; a click on a
point removes it), a click on a prompt word marks it misaligned, and four 1-5 ratings. Keys: `1` / `2` pick the
point kind, `u` undoes the last point, digits `1`-`5` with a rating row active (`Tab`, or a click on the row) rate
it, `Enter` submits, `←` / `→` go back and forth, `s` skips.

Each submission replaces the annotator's earlier line for that image or adds one, in the JSONL that
`rahf data consolidate` reads (the README's format): the whole file is written to a temporary file, flushed to disk
and renamed over the old one, so a crash or a killed server leaves the previous complete file, never a half-written
line, and loses at most the image being edited. A restart resumes each annotator at the first image they have
neither submitted nor skipped (skips are kept in `OUT.skipped.json`, written the same way). Several annotators may
work at once, each under their own name; one server owns an output file at a time (a lock file beside it).

Every submission is checked by the consolidator's own line checks (`check_annotation_lines`): points inside the
image, scores in 1-5, word indices inside the prompt; a bad one is answered 400 with the reason and writes nothing.
The server binds to 127.0.0.1 unless told otherwise.

Prompts: `--prompts FILE`, a JSONL of `{"image": path under DIR, "prompt": ..., "uid"?: ..., "split"?: ...}` lines or
a JSON object `{path under DIR: prompt}`; without it, `IMAGE.txt` beside each image holds its prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .constants import HEATMAP_NAMES, SCORE_NAMES
from .fileio import write_text_atomically
from .keywords import is_blank_prompt, split_prompt_words

logger = logging.getLogger(__name__)

__all__ = ["AnnotationStore", "AnnotationTask", "create_annotate_app", "load_tasks", "register"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
STATIC_DIR = Path(__file__).parent / "assets" / "annotate"
ANNOTATOR_RE = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")
SPLITS = ("train", "validation", "test")
POINT_KINDS = HEATMAP_NAMES


@dataclass
class AnnotationTask:
    """One image to annotate: its id, path relative to the image folder, prompt, split and size."""

    uid: str
    image: str
    prompt: str
    split: str
    width: int
    height: int


def _read_prompts(path: Path) -> dict[str, dict[str, str]]:
    text = path.read_text(encoding="utf-8")
    whole = None
    if path.suffix != ".jsonl":  # one JSONL line is a JSON object too
        try:
            whole = json.loads(text)
        except ValueError:
            pass
    if isinstance(whole, dict):
        return {str(k): {"prompt": v} for k, v in whole.items()}
    entries: dict[str, dict[str, str]] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise ValueError(f"--prompts {str(path)!r} line {line_no} is not JSON ({err})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ValueError(f'--prompts {str(path)!r} line {line_no} must be an object with "image" and "prompt"')
        entries[entry["image"]] = entry
    return entries


def load_tasks(
    images_dir: str | Path, prompts: str | Path | None = None, split: str = "train"
) -> list[AnnotationTask]:
    """The images under `images_dir` that have a prompt, in path order; images without one are left out (logged)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ValueError(f"--images {str(images_dir)!r} is not a folder; pass the folder of images to annotate")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {list(SPLITS)}, got {split!r}")
    table = None
    if prompts is not None:
        if not Path(prompts).is_file():
            raise ValueError(f"--prompts {str(prompts)!r} is not a file")
        table = _read_prompts(Path(prompts))
    from .data.consolidate import ImageSizes

    sizes = ImageSizes(images_dir)  # consolidate's checks: inside the folder, under the pixel and file caps
    tasks, missing = [], []
    for path in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        rel = path.relative_to(images_dir).as_posix()
        if table is not None:
            entry = table.get(rel)
        else:
            txt = path.with_suffix(".txt")
            entry = {"prompt": txt.read_text(encoding="utf-8").strip()} if txt.is_file() else None
        prompt = entry.get("prompt") if entry else None
        if not isinstance(prompt, str) or is_blank_prompt(prompt):
            missing.append(rel)
            continue
        size = sizes.get(rel)
        if isinstance(size, str):
            logger.warning("left out %s: %s", rel, size)
            continue
        width, height = size
        entry_split = entry.get("split", split)
        if entry_split not in SPLITS:
            raise ValueError(f"--prompts: the split of {rel!r} must be one of {list(SPLITS)}, got {entry_split!r}")
        uid = str(entry.get("uid") or Path(rel).with_suffix("").as_posix())
        tasks.append(AnnotationTask(uid, rel, prompt, entry_split, width, height))
    if missing:
        logger.warning("left out %d image(s) with no prompt, e.g. %s", len(missing), missing[:3])
    if not tasks:
        raise ValueError(f"no image under {str(images_dir)!r} has a prompt (give --prompts FILE or IMAGE.txt files)")
    uids = [t.uid for t in tasks]
    if len(set(uids)) != len(uids):
        raise ValueError("two images share a uid; give each its own uid in --prompts")
    return tasks


class AnnotationStore:
    """The output JSONL, one line per (image, annotator), held in memory and rewritten whole on each change.

    Lines it did not write (another tool's, or ones it cannot read) are kept as they are, in place.

    Examples:

    ```python
    >>> store = AnnotationStore("annotations.jsonl")
    >>> store.put(record)             # a raw annotation line as a dict; replaces (uid, annotator)'s earlier one
    >>> store.get("img-0001", "ann")  # the line back, or None
    ```
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.skips_path = self.path.with_name(self.path.name + ".skipped.json")
        self.lock = threading.Lock()
        self.lines: list[str] = []
        self.index: dict[tuple[str, str], int] = {}
        self.skips: dict[str, list[str]] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                self.lines.append(line)
                try:
                    record = json.loads(line)
                    self.index[(str(record["uid"]), str(record["annotator"]))] = len(self.lines) - 1
                except (ValueError, KeyError, TypeError):
                    logger.warning("%s: a line that is not an annotation is kept as it is", self.path)
        if self.skips_path.exists():
            self.skips = json.loads(self.skips_path.read_text(encoding="utf-8"))

    def get(self, uid: str, annotator: str) -> dict | None:
        at = self.index.get((uid, annotator))
        return None if at is None else json.loads(self.lines[at])

    def done(self, annotator: str) -> set[str]:
        return {uid for uid, who in self.index if who == annotator}

    def put(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self.lock:
            key = (record["uid"], record["annotator"])
            lines = list(self.lines)
            if key in self.index:
                lines[self.index[key]] = line
            else:
                lines.append(line)
            write_text_atomically(self.path, "".join(f"{x}\n" for x in lines))
            self.lines = lines  # only once the file holds them
            self.index.setdefault(key, len(lines) - 1)
            if record["uid"] in self.skips.get(record["annotator"], []):
                self.skips[record["annotator"]].remove(record["uid"])
                write_text_atomically(self.skips_path, json.dumps(self.skips, indent=1) + "\n")

    def skip(self, uid: str, annotator: str) -> None:
        with self.lock:
            skipped = self.skips.setdefault(annotator, [])
            if uid not in skipped:
                skipped.append(uid)
                write_text_atomically(self.skips_path, json.dumps(self.skips, indent=1) + "\n")


class _OutputLock:
    """An exclusive lock on `OUT.lock`, so that two servers never rewrite the same file over each other."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".lock")
        self.file = open(self.path, "a+")  # noqa: SIM115 - held for the server's life
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock on this platform: one server per file is up to the user
            pass
        except OSError:
            self.file.close()
            raise ValueError(
                f"another `rahf annotate` is writing {str(out)!r} (it holds {str(self.path)!r})"
            ) from None

    def release(self) -> None:
        self.file.close()  # closing the file drops the lock


class SubmissionError(ValueError):
    """A submission the server refuses, with the reason sent back."""


def build_record(task: AnnotationTask, annotator: str, body: dict, images_dir: Path) -> dict:
    """A page's submission -> the raw annotation line, checked as `rahf data consolidate` checks lines."""
    from .data.consolidate import check_annotation_lines

    unknown = set(body) - {"annotator", "index", "points", "misaligned_word_indices", "scores"}
    if unknown:
        raise SubmissionError(f"unknown keys {sorted(unknown)}")
    points = body.get("points", [])
    if not isinstance(points, list) or len(points) > 1000:
        raise SubmissionError('"points" must be a list of at most 1000 {"x", "y", "kind"} objects')
    for i, point in enumerate(points):
        if not isinstance(point, dict) or set(point) != {"x", "y", "kind"}:
            raise SubmissionError(f'points[{i}] must be {{"x", "y", "kind"}}, got {str(point)[:80]}')
    record = {
        "uid": task.uid,
        "image": task.image,
        "prompt": task.prompt,
        "split": task.split,
        "annotator": annotator,
        "points": points,
        "misaligned_word_indices": body.get("misaligned_word_indices", []),
        "scores": body.get("scores"),
    }
    scores = record["scores"]
    if not isinstance(scores, dict) or set(scores) != set(SCORE_NAMES):
        raise SubmissionError(f"rate all four of {list(SCORE_NAMES)} (1-5) before submitting")
    for name in SCORE_NAMES:
        value = scores[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
            raise SubmissionError(f"scores[{name!r}] must be a whole number from 1 to 5, got {value!r}")
    invalid = check_annotation_lines((json.dumps(record) + "\n").encode(), images_dir)
    if invalid:
        raise SubmissionError(invalid[0]["reason"])
    return record


def create_annotate_app(
    tasks: list[AnnotationTask], images_dir: str | Path, out: str | Path, default_annotator: str | None = None
):
    """The Starlette app of the annotation page, writing to `out`."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    images_dir = Path(images_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _OutputLock(out)
    store = AnnotationStore(out)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def annotator_of(value: Any) -> str:
        if not isinstance(value, str) or not ANNOTATOR_RE.match(value):
            raise SubmissionError(
                f"annotator name {value!r} must be 1-64 letters, digits or _ . @ + - (give yours in the name field)"
            )
        return value

    def task_at(value: Any) -> tuple[int, AnnotationTask]:
        try:
            index = int(value)
        except (TypeError, ValueError):
            raise SubmissionError(f"index {value!r} is not a number") from None
        if not 0 <= index < len(tasks):
            raise SubmissionError(f"index {index} is outside 0..{len(tasks) - 1}")
        return index, tasks[index]

    def resume_index(annotator: str) -> int:
        finished = store.done(annotator) | set(store.skips.get(annotator, []))
        return next((i for i, t in enumerate(tasks) if t.uid not in finished), len(tasks))

    def progress(annotator: str) -> dict:
        done = store.done(annotator)
        return {"total": len(tasks), "done": sum(t.uid in done for t in tasks), "resume": resume_index(annotator)}

    async def index_page(request: Request) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    async def state(request: Request) -> JSONResponse:
        try:
            annotator = annotator_of(request.query_params.get("annotator"))
        except SubmissionError as err:
            return error(400, str(err))
        return JSONResponse({"annotator": annotator, **progress(annotator)})

    async def config(request: Request) -> JSONResponse:
        return JSONResponse(
            {"annotator": default_annotator, "total": len(tasks), "kinds": POINT_KINDS, "scores": SCORE_NAMES}
        )

    async def item(request: Request) -> JSONResponse:
        try:
            annotator = annotator_of(request.query_params.get("annotator"))
            index, task = task_at(request.path_params["index"])
        except SubmissionError as err:
            return error(400, str(err))
        return JSONResponse(
            {
                "index": index,
                "uid": task.uid,
                "prompt": task.prompt,
                "words": split_prompt_words(task.prompt),
                "width": task.width,
                "height": task.height,
                "image_url": f"/image/{index}",
                "existing": store.get(task.uid, annotator),
                "skipped": task.uid in store.skips.get(annotator, []),
                **progress(annotator),
            }
        )

    async def image(request: Request) -> FileResponse | JSONResponse:
        try:
            _, task = task_at(request.path_params["index"])
        except SubmissionError as err:
            return error(404, str(err))
        return FileResponse(images_dir / task.image)  # a path of our own list: a request names an index, never a path

    async def read_json(request: Request) -> dict:
        body = await request.body()
        if len(body) > 1_000_000:
            raise SubmissionError("the submission is larger than 1 MB")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            raise SubmissionError("the submission is not valid JSON") from None
        if not isinstance(payload, dict):
            raise SubmissionError("the submission must be a JSON object")
        return payload

    async def submit(request: Request) -> JSONResponse:
        try:
            body = await read_json(request)
            annotator = annotator_of(body.get("annotator"))
            _, task = task_at(body.get("index"))
            record = await run_in_threadpool(build_record, task, annotator, body, images_dir)
        except SubmissionError as err:
            return error(400, str(err))
        await run_in_threadpool(store.put, record)
        return JSONResponse({"ok": True, **progress(annotator)})

    async def skip(request: Request) -> JSONResponse:
        try:
            body = await read_json(request)
            annotator = annotator_of(body.get("annotator"))
            _, task = task_at(body.get("index"))
        except SubmissionError as err:
            return error(400, str(err))
        await run_in_threadpool(store.skip, task.uid, annotator)
        return JSONResponse({"ok": True, **progress(annotator)})

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            lock.release()

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", index_page, methods=["GET"]),
            Route("/api/config", config, methods=["GET"]),
            Route("/api/state", state, methods=["GET"]),
            Route("/api/item/{index}", item, methods=["GET"]),
            Route("/api/annotation", submit, methods=["POST"]),
            Route("/api/skip", skip, methods=["POST"]),
            Route("/image/{index}", image, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.store, app.state.lock = store, lock
    return app


def annotate(
    images: str,
    out: str,
    prompts: str | None = None,
    annotator: str | None = None,
    split: str = "train",
    host: str = "127.0.0.1",
    port: int = 8080,
) -> None:
    """Serves the annotation page until interrupted."""
    import uvicorn

    if annotator is not None and not ANNOTATOR_RE.match(annotator):
        raise ValueError(f"--annotator {annotator!r} must be 1-64 letters, digits or _ . @ + -")
    if Path(out).is_dir():
        raise ValueError(f"--out {out!r} is a folder; pass the JSONL file to append to")
    tasks = load_tasks(images, prompts, split)
    app = create_annotate_app(tasks, images, out, annotator)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can write annotations", host)
    query = f"?annotator={annotator}" if annotator else ""
    logger.info("%d image(s) to annotate: open http://%s:%d/%s", len(tasks), host, port, query)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def register(parser: argparse.ArgumentParser) -> None:
    """Adds `rahf annotate`'s flags to `parser`."""
    parser.add_argument("--images", required=True, help="folder of the images to annotate (searched recursively)")
    parser.add_argument("--prompts", default=None, help="JSONL {image, prompt[, uid, split]} or JSON {image: prompt}")
    parser.add_argument("--out", required=True, help="the annotation JSONL (created, or resumed)")
    parser.add_argument("--annotator", default=None, help="the name the page starts with (each may enter their own)")
    parser.add_argument("--split", default="train", choices=list(SPLITS), help="split of images that name none")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8080)


def run_from_args(args: argparse.Namespace) -> int:
    annotate(args.images, args.out, args.prompts, args.annotator, args.split, args.host, args.port)
    return 0
