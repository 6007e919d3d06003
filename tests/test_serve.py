"""`rahf serve`: answers equal the predictor's under concurrent load, dynamic batching, bad requests answered 4xx."""

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from rahf import RichFeedbackPredictor
from rahf.client import RAHFClient, RAHFServerError, encode_image
from rahf.serve import ServeConfig, run_in_thread
from rahf.testing import tiny_rahf_model, tiny_rahf_processor

PROMPTS = ["a red circle", "a grey square on a wooden table", "two birds on a wire at dusk", "a cat"]


def random_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 24 + 5 * (i % 3), 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return RichFeedbackPredictor(tiny_rahf_model(), tiny_rahf_processor())


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    random_images(1)[0].save(root / "inside.png")
    outside = tmp_path_factory.mktemp("outside")
    random_images(1)[0].save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def server(predictor, image_root):
    config = ServeConfig(max_batch_size=8, max_wait_ms=20, max_body_bytes=200_000, max_images=8, image_root=image_root)
    with run_in_thread(predictor, config) as running:
        yield running


def post(url, body: bytes, content_type="application/json"):
    request = urllib.request.Request(url + "/score", data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def assert_same_feedback(answer, expected, heatmaps=False):
    assert answer["misaligned_word_indices"] == expected.misaligned_word_indices
    assert answer["misaligned_words"] == expected.misaligned_words
    assert answer["scores"].keys() == expected.scores.keys()
    for name, value in expected.scores.items():
        assert abs(answer["scores"][name] - value) < 1e-6, (name, answer["scores"][name], value)
    if heatmaps:
        for name, heat in expected.heatmaps.items():
            np.testing.assert_allclose(answer["heatmaps"][name], heat, atol=1e-6)


def test_health(server):
    health = RAHFClient(server.url).health()
    assert health["status"] == "ok" and health["score_names"] == ["plausibility", "alignment", "aesthetics", "overall"]
    assert health["paths_allowed"] is True and health["max_batch_size"] == 8


def test_concurrent_load_batches_and_every_answer_matches_the_predictor_alone(server, predictor):
    """A bounded load test: 6 clients x 5 requests of 1-3 images, some with heatmaps, all at once on 127.0.0.1."""
    clients, per_client = 6, 5
    client = RAHFClient(server.url)
    before = client.health()
    answers, errors = {}, []

    def work(c):
        for r in range(per_client):
            n = 1 + (c + r) % 3
            images = random_images(n, seed=100 * c + r)
            prompts = [PROMPTS[(c + r + i) % len(PROMPTS)] for i in range(n)]
            heatmaps = "array" if (c + r) % 4 == 0 else None
            try:
                answers[(c, r)] = (images, prompts, heatmaps, client.score(images, prompts, heatmaps=heatmaps))
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(answers) == clients * per_client
    after = client.health()
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == clients * per_client
    assert batches < requests  # concurrent requests shared model calls
    for images, prompts, heatmaps, results in answers.values():
        outputs = ["scores", "heatmaps", "keywords"] if heatmaps else ["scores", "keywords"]
        alone = predictor(images, prompts, outputs=outputs)
        assert len(results) == len(images)
        for answer, expected in zip(results, alone):
            assert_same_feedback(answer, expected, heatmaps=bool(heatmaps))


def test_png_heatmaps_at_the_image_size(server, predictor):
    images = random_images(2, seed=7)
    results = RAHFClient(server.url).score(images, "a red circle", heatmaps="png")
    for image, result in zip(images, results):
        assert set(result["heatmaps"]) == {"implausibility", "misalignment"}
        heat = result["heatmaps"]["implausibility"]
        assert heat.shape == (image.height, image.width) and 0 <= heat.min() and heat.max() <= 1
    expected = predictor(images, ["a red circle"] * 2)
    np.testing.assert_allclose(
        results[0]["heatmaps"]["misalignment"], expected[0].heatmaps["misalignment"], atol=1 / 255
    )


def test_paths_under_the_root(server, predictor, image_root):
    [result] = RAHFClient(server.url).score(None, "a cat", paths=["inside.png"])
    [expected] = predictor([Image.open(image_root / "inside.png")], ["a cat"], outputs=["scores", "keywords"])
    assert_same_feedback(result, expected)


PNG = encode_image(random_images(1)[0])
BAD_REQUESTS = [
    ("not JSON", b"{prompts: [", 400, "not valid JSON"),
    ("a JSON list", b"[1, 2]", 400, "must be a JSON object"),
    ("missing prompt", json.dumps({"images": [PNG]}).encode(), 400, '"prompts" is missing'),
    ("empty prompt", json.dumps({"images": [PNG], "prompts": ["  "]}).encode(), 400, "is empty"),
    ("prompt not a string", json.dumps({"images": [PNG], "prompts": [3]}).encode(), 400, "must be a str"),
    ("2 prompts, 3 images", json.dumps({"images": [PNG] * 3, "prompts": ["a", "b"]}).encode(), 400, "one per image"),
    ("no images", json.dumps({"prompts": ["a cat"]}).encode(), 400, 'exactly one of "images"'),
    ("empty image list", json.dumps({"images": [], "prompts": ["a"]}).encode(), 400, "non-empty list"),
    ("non-image bytes", json.dumps({"images": [base64.b64encode(b"hello" * 9).decode()], "prompts": ["a"]}).encode(),
     400, "not a PNG, JPEG or WebP"),
    ("truncated PNG", json.dumps({"images": [PNG[:120]], "prompts": ["a"]}).encode(), 400, "could not read"),
    ("not base64", json.dumps({"images": ["%%%"], "prompts": ["a"]}).encode(), 400, "not valid base64"),
    ("too many images", json.dumps({"images": [PNG] * 9, "prompts": ["a"]}).encode(), 413, "more than the limit of 8"),
    ("huge body", json.dumps({"images": ["A" * 300_000], "prompts": ["a"]}).encode(), 413, "more than the limit"),
    ("path outside the root", json.dumps({"paths": ["../outside/secret.png"], "prompts": ["a"]}).encode(), 403,
     "outside the server's image root"),
    ("absolute path", json.dumps({"paths": ["/etc/passwd"], "prompts": ["a"]}).encode(), 403, "outside"),
    ("symlink out of the root", json.dumps({"paths": ["link.png"], "prompts": ["a"]}).encode(), 403, "outside"),
    ("missing file", json.dumps({"paths": ["nope.png"], "prompts": ["a"]}).encode(), 404, "is not a file"),
    ("text file as image", json.dumps({"paths": ["notes.txt"], "prompts": ["a"]}).encode(), 400, "not a PNG"),
    ("unknown key", json.dumps({"images": [PNG], "prompts": ["a"], "seed": 1}).encode(), 400, "unknown keys"),
    ("bad heatmaps", json.dumps({"images": [PNG], "prompts": ["a"], "heatmaps": "jpeg"}).encode(), 400, '"heatmaps"'),
    ("too many pixels", json.dumps({"images": [encode_image(Image.new("L", (5000, 5000)))], "prompts": ["a"]}).encode(),
     413, "more than the cap of 1,000,000 per image"),
    ("pixels of a request", json.dumps({"images": [encode_image(Image.new("L", (1000, 1000)))] * 2, "prompts": ["a"]})
     .encode(), 413, "2,000,000 pixels in all, more than the limit of 1,500,000"),
]  # fmt: skip


@pytest.fixture(scope="module")
def small_cap_server(predictor):
    # A pixel cap of 1 MP so that a 25 MP image (a 25 kB PNG of one colour) stands for a decompression bomb.
    config = ServeConfig(max_images=8, max_image_pixels=1_000_000, max_request_pixels=1_500_000)
    with run_in_thread(predictor, config) as running:
        yield running


@pytest.mark.parametrize("name,body,status,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_with_a_message(server, small_cap_server, name, body, status, message):
    target = small_cap_server if "pixels" in name else server
    code, answer = post(target.url, body)
    assert code == status, answer
    assert message in answer["error"], answer["error"]


def test_still_answering_after_bad_requests_and_wrong_routes(server, predictor):
    for _, body, _, _ in BAD_REQUESTS:
        post(server.url, body)
    with pytest.raises(RAHFServerError) as err:
        RAHFClient(server.url)._request("GET", "/score")
    assert err.value.status == 405
    with pytest.raises(RAHFServerError) as err:
        RAHFClient(server.url)._request("GET", "/nowhere")
    assert err.value.status == 404 and "/nowhere" in err.value.message
    images = random_images(1, seed=3)
    [result] = RAHFClient(server.url).score(images, "a cat")
    assert_same_feedback(result, predictor(images, "a cat", outputs=["scores", "keywords"])[0])


def test_no_paths_without_a_root(small_cap_server):
    code, answer = post(small_cap_server.url, json.dumps({"paths": ["a.png"], "prompts": ["a"]}).encode())
    assert code == 403 and "--image_root" in answer["error"]


def test_reward_fn_for_an_external_trainer(server, predictor):
    reward = RAHFClient(server.url).reward_fn("aesthetics=0.5,-implausibility=0.5")
    images = torch.rand(2, 3, 16, 16)
    scores, info = reward(images, ["a cat", "a dog"], None)
    assert scores.shape == (2,) and set(info["scores"]) == {"plausibility", "alignment", "aesthetics", "overall"}
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    expected = predictor(pil, ["a cat", "a dog"])
    for value, fb in zip(scores.tolist(), expected):
        assert abs(value - (0.5 * fb.scores["aesthetics"] - 0.5 * fb.heatmaps["implausibility"].mean())) < 1e-5
    with pytest.raises(ValueError, match="does not output"):
        RAHFClient(server.url).reward_fn("beauty")


def test_config_is_checked():
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="is not a folder"):
        ServeConfig(image_root="/no/such/folder")


@pytest.mark.slow
def test_rahf_serve_command(tmp_path):
    """The CLI end to end: a saved tiny model served on 127.0.0.1, scored, and stopped."""
    model, processor = tiny_rahf_model(), tiny_rahf_processor()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rahf", "serve", "--model", str(tmp_path / "model"), "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        client = RAHFClient(f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.monotonic() + 120
        while True:
            try:
                assert client.health()["status"] == "ok"
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
        [result] = client.score([random_images(1)[0]], ["a red circle"])
        expected = RichFeedbackPredictor(model, processor)(
            random_images(1), ["a red circle"], outputs=["scores", "keywords"]
        )
        assert_same_feedback(result, expected[0])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_serve_arguments_fail_before_loading(tmp_path):
    from rahf.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
