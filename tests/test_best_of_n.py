"""Best-of-N filtering: the kept set, its image folder, resuming after a crash, and two processes via accelerate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from improve_utils import (
    PROMPTS,
    launch_two_processes,
    read_jsonl,
    save_tiny_amused,
    save_tiny_rahf,
    save_tiny_sd,
    write_prompts,
)
from PIL import Image
from rahf.improve import best_of_n
from rahf.improve.best_of_n import (
    derive_seed,
    parse_best_of_n_args,
    read_prompts,
    run_best_of_n,
)

from rahf.reward import parse_reward

N = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bon_assets")
    return {
        "sd": save_tiny_sd(root / "sd"),
        "rahf": save_tiny_rahf(root / "rahf"),
        "prompts": write_prompts(root / "prompts.txt"),
        "root": root,
    }


def _argv(assets, out, *extra) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        assets["sd"],
        "--reward_model",
        assets["rahf"],
        "--prompts_file",
        assets["prompts"],
        "--num_images_per_prompt",
        N,
        "--num_inference_steps",
        2,
        "--resolution",
        32,
        "--reward",
        "plausibility=0.5,aesthetics=0.5",
        "--seed",
        3,
        "--batch_size",
        3,
        "--output_dir",
        out,
        *extra,
    ]


def _run(*argv):
    return run_best_of_n(parse_best_of_n_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def reference(assets):
    """An uninterrupted run, with a threshold between the prompts' best rewards so that some prompts are dropped."""
    probe = assets["root"] / "probe"
    _run(*_argv(assets, probe))
    best = sorted(
        max(r["reward"] for r in read_jsonl(probe / "all_scores.jsonl") if r["prompt_index"] == p)
        for p in range(len(PROMPTS))
    )
    threshold = (best[1] + best[2]) / 2  # two prompts below, three above
    out = assets["root"] / "reference"
    summary = _run(*_argv(assets, out, "--threshold", threshold))
    return {"out": out, "threshold": threshold, "summary": summary}


def _kept_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "kept").iterdir())}


# --------------------------------------------------------------------------------------------------------------------
# Arguments and inputs


def test_prompts_files_and_reward_specs(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\n a red cat \n\nblue dog\n")
    assert read_prompts(txt) == [{"prompt": "a red cat"}, {"prompt": "blue dog"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "uid": 7}\n\n{"caption": "b"}\n')
    assert read_prompts(jsonl) == [{"prompt": "a", "uid": 7}, {"prompt": "b"}]
    jsonl.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="prompt"):
        read_prompts(jsonl)
    with pytest.raises(ValueError, match="prompts_file"):
        read_prompts(tmp_path / "missing.txt")

    assert parse_reward("overall") == "overall"
    assert parse_reward("plausibility=0.5, aesthetics=0.25") == {"plausibility": 0.5, "aesthetics": 0.25}
    assert parse_reward({"aesthetics": 1.0, "-implausibility": 0.5}) == {"aesthetics": 1.0, "implausibility": -0.5}
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        parse_reward("plausibility=high")
    # Seeds depend on (seed, prompt, image) only, and differ between images.
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)


def test_yaml_config_and_flags(tmp_path):
    args = parse_best_of_n_args(
        ["--config", "configs/improve/best_of_n.yaml", "--threshold", "0.5", "--reward", "overall"]
    )
    assert (args.num_images_per_prompt, args.threshold, args.reward) == (8, 0.5, "overall")
    assert args.pretrained_model_name_or_path and Path(args.prompts_file).is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_images_per_promt: 4\n")
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        parse_best_of_n_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        parse_best_of_n_args(["--num_images_per_prompt", "0"])


# --------------------------------------------------------------------------------------------------------------------
# One process


def test_kept_set_is_the_best_above_threshold_and_loads_as_imagefolder(assets, reference):
    from datasets import load_dataset

    out, threshold = reference["out"], reference["threshold"]
    rows = read_jsonl(out / "all_scores.jsonl")
    assert [r["prompt_index"] for r in rows] == [p for p in range(len(PROMPTS)) for _ in range(N)]
    kept = read_jsonl(out / "kept" / "metadata.jsonl")
    assert len(kept) == 3 == reference["summary"]["num_kept"]  # two prompts fell below the threshold
    assert len({k["prompt_index"] for k in kept}) == len(kept)  # at most one image per prompt
    for p in range(len(PROMPTS)):
        mine = [r for r in rows if r["prompt_index"] == p]
        assert sorted(r["rank"] for r in mine) == list(range(1, N + 1))
        assert [r["seed"] for r in mine] == [derive_seed(3, p, i) for i in range(N)]
        for r in mine:
            assert {"plausibility", "alignment", "aesthetics", "overall"} <= r.keys()
            assert r["reward"] == pytest.approx(0.5 * r["plausibility"] + 0.5 * r["aesthetics"], abs=1e-5)
        best = max(mine, key=lambda r: r["reward"])
        kept_here = [k for k in kept if k["prompt_index"] == p]
        assert [r["kept"] for r in mine].count(True) == len(kept_here)
        if best["reward"] > threshold:
            assert kept_here and kept_here[0]["image_index"] == best["image_index"] and kept_here[0]["rank"] == 1
            assert kept_here[0]["reward"] == best["reward"] and kept_here[0]["seed"] == best["seed"]
        else:
            assert not kept_here
    assert all(k["reward"] > threshold for k in kept)

    # diffusers' fine-tuning scripts read this folder as an imagefolder data set.
    data = load_dataset("imagefolder", data_dir=str(out / "kept"), split="train")
    assert len(data) == len(kept)
    assert {"image", "prompt", "reward", "seed", "rank", "plausibility"} <= set(data.column_names)
    assert sorted(data["prompt"]) == sorted(k["prompt"] for k in kept)
    assert data[0]["image"].size == (32, 32)

    # A kept image is what the pipeline gives for its recorded seed.
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(assets["sd"]))
    pipe.set_progress_bar_config(disable=True)
    k = kept[0]
    regenerated = pipe(
        k["prompt"], num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(k["seed"])
    ).images[0]
    saved = Image.open(out / "kept" / k["file_name"])
    assert np.array_equal(np.asarray(regenerated), np.asarray(saved))


def test_crash_then_rerun_gives_the_same_kept_set(assets, reference, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    argv = _argv(assets, out, "--threshold", reference["threshold"])
    real_mark_done = best_of_n._mark_done
    calls = []

    def crash_on_third(*args):
        calls.append(args[1])
        if len(calls) == 3:  # prompt 2's image and shard are on disk, its done-marker is not
            raise RuntimeError("simulated crash")
        real_mark_done(*args)

    monkeypatch.setattr(best_of_n, "_mark_done", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(*argv)
    monkeypatch.setattr(best_of_n, "_mark_done", real_mark_done)
    shards = out / "shards"
    assert sorted(p.name for p in shards.glob("*.done")) == ["000000.done", "000001.done"]
    assert (shards / "000002.json").is_file()
    assert not (out / "kept" / "metadata.jsonl").exists()
    # What else a crash can leave: a half-written shard, temporary files, a marker without its shard.
    data = (shards / "000002.json").read_bytes()
    (shards / "000002.json").write_bytes(data[: len(data) // 2])
    (shards / ".000003.json.tmp-999").write_text('{"prompt_index": 3')
    (out / "kept" / ".000003-01.png.tmp-999").write_bytes(b"\x89PNG half")
    (shards / "000004.done").write_text('{"shard_sha256": "0"}\n')

    summary = _run(*argv)
    assert summary["generated_this_run"] == 3  # prompts 2, 3 and 4; 0 and 1 were done
    assert _kept_files(out) == _kept_files(reference["out"])  # same files, same bytes, same metadata.jsonl
    assert (out / "all_scores.jsonl").read_text() == (reference["out"] / "all_scores.jsonl").read_text()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]

    # A rerun of a finished job generates nothing and changes nothing.
    again = _run(*argv)
    assert again["generated_this_run"] == 0
    assert _kept_files(out) == _kept_files(reference["out"])
    # Settings that change the results cannot be mixed into the same output_dir.
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        _run(*argv, "--num_images_per_prompt", 2)


def test_amused_best_of_n(assets, tmp_path):
    from datasets import load_dataset

    amused = save_tiny_amused(tmp_path / "amused")
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "out"
    summary = _run(
        "--pretrained_model_name_or_path",
        amused,
        "--reward_model",
        assets["rahf"],
        "--prompts_file",
        prompts,
        "--num_images_per_prompt",
        2,
        "--num_inference_steps",
        2,
        "--output_dir",
        out,
        "--reward=-implausibility",
    )  # `=`: argparse would read a separate "-implausibility" as a flag
    assert summary["num_kept"] == 2
    rows = read_jsonl(out / "all_scores.jsonl")
    assert len(rows) == 4 and all(r["reward"] == pytest.approx(-r["implausibility_mean"]) for r in rows)
    assert len({r["seed"] for r in rows}) == 4
    assert len(load_dataset("imagefolder", data_dir=str(out / "kept"), split="train")) == 2


# --------------------------------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.distributed
def test_two_processes_split_prompts_and_match_one_process(assets, reference, tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes(
        "rahf.improve.best_of_n", _argv(assets, out, "--threshold", reference["threshold"]), cwd=tmp_path
    )
    done = {rank: [r["prompt_index"] for r in read_jsonl(out / "work_log" / f"rank{rank}.jsonl")] for rank in (0, 1)}
    assert all(r["num_processes"] == 2 for rank in (0, 1) for r in read_jsonl(out / "work_log" / f"rank{rank}.jsonl"))
    assert sorted(len(v) for v in done.values()) == [2, 3]  # 5 prompts: no duplicate, no loss
    assert sorted(done[0] + done[1]) == list(range(len(PROMPTS)))
    assert {json.loads((out / "shards" / f"{p:06d}.json").read_text())["process_index"] for p in range(5)} == {0, 1}
    # The same images are kept, byte for byte. Their scores agree to 1e-4, not bit for bit: a launched process may
    # order its float32 matmul reductions differently (thread count), which moves scores by ~1e-6.
    kept, kept_ref = _kept_files(out), _kept_files(reference["out"])
    assert sorted(kept) == sorted(kept_ref)
    assert all(kept[name] == kept_ref[name] for name in kept if name.endswith(".png"))
    for rows_name in ("kept/metadata.jsonl", "all_scores.jsonl"):
        rows, rows_ref = read_jsonl(out / rows_name), read_jsonl(reference["out"] / rows_name)
        assert len(rows) == len(rows_ref)
        for row, row_ref in zip(rows, rows_ref):
            assert row.keys() == row_ref.keys()
            for key, value in row.items():
                if isinstance(value, float):
                    assert value == pytest.approx(row_ref[key], abs=1e-4), (rows_name, key)
                else:
                    assert value == row_ref[key], (rows_name, key)
    shutil.rmtree(out)
