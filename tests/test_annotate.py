"""`rahf annotate`'s server: tasks and prompts, submissions checked as consolidate checks them, atomic rewrites, resume."""

import json
import urllib.error
import urllib.request

import pytest
from PIL import Image

from rahf.annotate import AnnotationStore, create_annotate_app, load_tasks
from rahf.data.consolidate import consolidate
from rahf.serve import BackgroundServer

SCORES = {"plausibility": 4, "alignment": 2, "aesthetics": 3, "overall": 3}


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(folder / "a.png")
    (folder / "a.txt").write_text("a red circle on a table\n")
    Image.new("RGB", (20, 20), "blue").save(folder / "sub" / "b.jpg")
    (folder / "sub" / "b.txt").write_text("a blue square")
    Image.new("RGB", (10, 10)).save(folder / "no_prompt.png")
    return folder


def call(url, path, body=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_tasks_from_txt_files_jsonl_and_json(images, tmp_path):
    tasks = load_tasks(images)
    assert [(t.uid, t.image, t.prompt, t.width, t.height) for t in tasks] == [
        ("a", "a.png", "a red circle on a table", 40, 30),
        ("sub/b", "sub/b.jpg", "a blue square", 20, 20),
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"image": "sub/b.jpg", "prompt": "two cats", "uid": "b-1", "split": "test"}) + "\n")
    [task] = load_tasks(images, prompts)
    assert (task.uid, task.prompt, task.split) == ("b-1", "two cats", "test")
    (tmp_path / "prompts.json").write_text(json.dumps({"no_prompt.png": "a black square"}))
    [task] = load_tasks(images, tmp_path / "prompts.json", split="validation")
    assert (task.uid, task.split) == ("no_prompt", "validation")
    with pytest.raises(ValueError, match="is not a folder"):
        load_tasks(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no image .* has a prompt"):
        load_tasks(images, _write(tmp_path / "empty.json", "{}"))


def _write(path, text):
    path.write_text(text)
    return path


def test_submit_resume_edit_and_consolidate(images, tmp_path):
    out = tmp_path / "ann" / "annotations.jsonl"
    with BackgroundServer(create_annotate_app(load_tasks(images), images, out)) as server:
        status, page = call(server.url, "/api/item/0?annotator=ann")
        assert status == 200 and page["words"] == ["a", "red", "circle", "on", "a", "table"] and page["resume"] == 0
        good = {"annotator": "ann", "index": 0, "points": [{"x": 39.5, "y": 0, "kind": "implausibility"}],
                "misaligned_word_indices": [1], "scores": SCORES}  # fmt: skip
        status, answer = call(server.url, "/api/annotation", good)
        assert status == 200 and answer["done"] == 1 and answer["resume"] == 1
        # an edit replaces the line; another annotator adds one
        status, _ = call(server.url, "/api/annotation", {**good, "misaligned_word_indices": [1, 2]})
        assert status == 200
        assert call(server.url, "/api/annotation", {**good, "annotator": "bob"})[0] == 200
        status, page = call(server.url, "/api/item/0?annotator=ann")
        assert page["existing"]["misaligned_word_indices"] == [1, 2]
        assert call(server.url, "/api/skip", {"annotator": "bob", "index": 1})[1]["resume"] == 2
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["uid"], r["annotator"], r["misaligned_word_indices"]) for r in lines] == [
        ("a", "ann", [1, 2]),
        ("a", "bob", [1]),
    ]
    # a restart resumes each annotator where they stopped (bob skipped b, so he is done)
    with BackgroundServer(create_annotate_app(load_tasks(images), images, out)) as server:
        assert call(server.url, "/api/state?annotator=ann")[1] == {
            "annotator": "ann",
            "total": 2,
            "done": 1,
            "resume": 1,
        }
        assert call(server.url, "/api/state?annotator=bob")[1]["resume"] == 2
        assert call(server.url, "/api/state?annotator=cy")[1]["resume"] == 0
    report = consolidate(out, images, tmp_path / "data")
    assert report["invalid"] == [] and report["images"] == 1


BAD = [
    ({"x": 40, "y": 3, "kind": "implausibility"}, None, None, "outside the 40x30 image"),  # x == width is outside
    ({"x": 3, "y": -1, "kind": "misalignment"}, None, None, "outside the 40x30 image"),
    ({"x": "a", "y": 3, "kind": "misalignment"}, None, None, "must be finite numbers"),
    ({"x": 3, "y": 3, "kind": "beauty"}, None, None, "'kind' must be one of"),
    (None, [6], None, "out of range: the prompt has 6 words"),
    (None, None, {**SCORES, "overall": 6}, "from 1 to 5"),
    (None, None, {**SCORES, "overall": 0}, "from 1 to 5"),
    (None, None, {"plausibility": 3}, "rate all four"),
]


def test_bad_submissions_are_refused_and_write_nothing(images, tmp_path):
    out = tmp_path / "annotations.jsonl"
    with BackgroundServer(create_annotate_app(load_tasks(images), images, out)) as server:
        good = {"annotator": "ann", "index": 0, "points": [], "misaligned_word_indices": [], "scores": SCORES}
        assert call(server.url, "/api/annotation", good)[0] == 200
        before = out.read_bytes()
        for point, words, scores, message in BAD:
            body = dict(good)
            if point is not None:
                body["points"] = [point]
            if words is not None:
                body["misaligned_word_indices"] = words
            if scores is not None:
                body["scores"] = scores
            status, answer = call(server.url, "/api/annotation", body)
            assert status == 400 and message in answer["error"], (body, answer)
        for body, message in [
            ({**good, "annotator": "a b"}, "annotator name"),
            ({**good, "annotator": ""}, "annotator name"),
            ({**good, "index": 2}, "outside 0..1"),
            ({**good, "index": "x"}, "not a number"),
            ({**good, "uid": "other"}, "unknown keys"),
            (b"{not json", "not valid JSON"),
            (b"[]", "JSON object"),
        ]:
            status, answer = call(server.url, "/api/annotation", body)
            assert status == 400 and message in answer["error"], (body, answer)
        assert out.read_bytes() == before
        assert call(server.url, "/api/item/7?annotator=ann")[0] == 400
        assert call(server.url, "/image/7")[0] == 404
        assert call(server.url, "/image/..%2F..%2Fetc%2Fpasswd")[0] == 404
        assert call(server.url, "/api/annotation", good)[0] == 200  # still answering


def test_a_failed_write_leaves_the_previous_file(images, tmp_path, monkeypatch):
    out = tmp_path / "annotations.jsonl"
    store = AnnotationStore(out)
    record = {"uid": "a", "image": "a.png", "prompt": "a cat", "split": "train", "annotator": "ann", "points": [],
              "misaligned_word_indices": [], "scores": SCORES}  # fmt: skip
    store.put(record)
    before = out.read_bytes()

    def killed(*args):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("rahf.fileio.os.replace", killed)  # the one atomic writer
    with pytest.raises(KeyboardInterrupt):
        store.put({**record, "annotator": "bob"})
    assert out.read_bytes() == before and not list(tmp_path.glob(".annotations.jsonl.*"))
    assert store.get("a", "bob") is None  # memory follows the file


def test_one_server_per_output_file(images, tmp_path):
    out = tmp_path / "annotations.jsonl"
    app = create_annotate_app(load_tasks(images), images, out)
    with pytest.raises(ValueError, match="another `rahf annotate` is writing"):
        create_annotate_app(load_tasks(images), images, out)
    app.state.lock.release()


def test_page_and_static_files_are_served(images, tmp_path):
    with BackgroundServer(create_annotate_app(load_tasks(images), images, tmp_path / "o.jsonl", "ann")) as server:
        with urllib.request.urlopen(server.url + "/") as response:
            html = response.read().decode()
        assert "/static/annotate.js" in html and "http" not in html.replace("http-equiv", "")  # nothing from elsewhere
        for name in ("annotate.js", "annotate.css"):
            with urllib.request.urlopen(f"{server.url}/static/{name}") as response:
                assert response.status == 200
        assert call(server.url, "/api/config")[1]["annotator"] == "ann"


def test_cli_flags(images, tmp_path):
    from rahf.cli import main

    assert main(["annotate", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert main(["annotate", "--images", str(images), "--out", str(tmp_path), "--annotator", "x"]) == 2


def test_several_annotators_at_once(images, tmp_path):
    import threading

    out = tmp_path / "annotations.jsonl"
    statuses = []
    with BackgroundServer(create_annotate_app(load_tasks(images), images, out)) as server:

        def work(name):
            for index in (0, 1, 0):  # the last one edits the first
                body = {"annotator": name, "index": index, "points": [{"x": 1, "y": 1, "kind": "misalignment"}],
                        "misaligned_word_indices": [0], "scores": SCORES}  # fmt: skip
                statuses.append(call(server.url, "/api/annotation", body)[0])

        threads = [threading.Thread(target=work, args=(f"a{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert statuses == [200] * 18
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["annotator"], r["uid"]) for r in lines) == sorted(
        (f"a{i}", uid) for i in range(6) for uid in ("a", "sub/b")
    )
    report = consolidate(out, images, tmp_path / "data")
    assert report["invalid"] == [] and report["valid_lines"] == 12


@pytest.mark.slow
def test_the_page_ships_in_the_wheel(installed_wheel):
    import zipfile

    with zipfile.ZipFile(installed_wheel.wheel) as wheel:
        names = set(wheel.namelist())
    for name in ("index.html", "annotate.js", "annotate.css"):
        assert f"rahf/assets/annotate/{name}" in names


@pytest.mark.slow
def test_rahf_annotate_command(images, tmp_path):
    """The CLI end to end: `rahf annotate` on 127.0.0.1 serves the page and takes a submission."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "annotations.jsonl"
    command = [
        sys.executable,
        "-m",
        "rahf",
        "annotate",
        "--images",
        str(images),
        "--out",
        str(out),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                assert call(url, "/api/config")[1]["total"] == 2
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
        body = {"annotator": "ann", "index": 1, "points": [], "misaligned_word_indices": [2], "scores": SCORES}
        assert call(url, "/api/annotation", body)[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    assert (line["uid"], line["misaligned_word_indices"]) == ("sub/b", [2])
