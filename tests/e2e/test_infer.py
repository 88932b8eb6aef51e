"""infer.py as a user runs it: every input checked before the model loads, batch rows answered in input order
with bad rows marked in place, answers appended as they come, and an interrupted batch resumed without
answering an id twice. The model is a stub for the bookkeeping tests (what reaches `generate` is recorded),
and a real tiny bundle for the end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
import inference

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


class Interrupted(BaseException):
    """Stands for Ctrl-C or a kill in the middle of generation."""


class StubCheckpoint:
    """Answers "<n> image(s) (<sizes>): <last line of the query>"; raises Interrupted when asked for more than
    `budget` answers. Records every query it was given."""

    def __init__(self, budget: int | None = None):
        self.budget = budget
        self.queries: list[str] = []

    def generate(self, prompts, **options):
        answers = []
        for p in prompts:
            if self.budget is not None and len(self.queries) >= self.budget:
                raise Interrupted()
            self.queries.append(p.query)
            sizes = ",".join(f"{im.width}x{im.height}" for im in p.images)
            answers.append(f"{len(p.images)} image(s) ({sizes}): {p.query.splitlines()[-1]}")
        return answers


@pytest.fixture
def stub(monkeypatch):
    holder = {"model": StubCheckpoint(), "loads": 0}

    def load(*args, **kwargs):
        holder["loads"] += 1
        return holder["model"]

    monkeypatch.setattr(inference, "load_checkpoint", load)
    return holder


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "batch" / "img"
    folder.mkdir(parents=True)
    for i, size in enumerate([(20, 10), (12, 12), (8, 16)]):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def write_batch(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_infer(*args) -> int:
    return infer.main(["--checkpoint", "unused", *map(str, args)])


def test_every_row_is_checked_first_and_bad_rows_are_marked_in_place(stub, images, capsys):
    batch = write_batch(images.parent / "prompts.jsonl", [
        {"id": "a", "images": ["img/0.png"], "prompt": "colour?"},         # relative to the batch file
        {"id": "b", "images": ["img/1.png"], "prompt": 42},
        {"id": "c", "images": [None], "prompt": "x"},
        {"id": "d", "images": ["img/1.png"]},
        "[1, 2]",
        {"id": "f", "images": ["img/missing.png"], "prompt": "x"},
        {"id": "g", "images": ["img/0.png"], "prompt": "<image> and <image>?"},
        {"id": "h", "images": "img/2.png", "prompt": "one path as a string"},
        '{"id": "i", "prompt": ',
        {"id": "j", "images": ["img/broken.jpg"], "prompt": "x"},
        {"id": 11, "prompt": "text only"},
        {"id": "k", "image": "img/0.png", "prompt": "a misspelt key is not answered without its image"},
        {"id": "l", "images": [str(images / "1.png"), "img/2.png"], "prompt": "<image> vs <image>"},
    ])
    out = images.parent / "answers.jsonl"
    assert run_infer("--batch", batch, "--output", out, "--batch-size", 2) == 0
    lines = read_lines(out)
    assert [line["id"] for line in lines] == ["a", "b", "c", "d", 5, "f", "g", "h", 9, "j", 11, "k", "l"]
    answers = {line["id"]: line["answer"] for line in lines if "answer" in line}
    assert answers == {
        "a": "1 image(s) (20x10): colour?",
        "h": "1 image(s) (8x16): one path as a string",
        11: "0 image(s) (): text only",
        "l": "2 image(s) (12x12,8x16): <image> vs <image>",
    }
    errors = {line["id"]: line["error"] for line in lines if "error" in line}
    assert errors["b"] == "prompt must be a string, got 42"
    assert errors["c"] == "images must be paths, got None"
    assert errors["d"] == "no prompt"
    assert errors[5] == "line 5: not a JSON object with a prompt, but a list"
    assert "missing.png: missing" in errors["f"]
    assert errors["g"] == "the prompt has 2 <image> mark(s) but 1 image(s) were given"
    assert errors[9].startswith("line 9: not valid JSON")
    assert "broken.jpg" in errors["j"]
    assert errors["k"] == "unknown key(s) ['image'] (a row has id, images, prompt)"
    assert stub["loads"] == 1 and len(stub["model"].queries) == 4  # only the good rows reach the model
    assert "answered 4 of 13 prompts" in capsys.readouterr().out


def test_an_interrupted_batch_resumes_and_answers_every_id_once_in_order(stub, images, capsys):
    rows = [{"id": f"q{i}", "images": [f"img/{i % 3}.png"], "prompt": f"question {i}"} for i in range(7)]
    rows.insert(3, {"id": "bad", "images": ["img/missing.png"], "prompt": "x"})
    batch = write_batch(images.parent / "prompts.jsonl", rows)
    out = images.parent / "answers.jsonl"

    stub["model"] = StubCheckpoint(budget=3)  # chunks of 2: the second chunk dies on its 2nd prompt
    with pytest.raises(Interrupted):
        run_infer("--batch", batch, "--output", out, "--batch-size", 2)
    assert [line["id"] for line in read_lines(out)] == ["q0", "q1"]  # the first chunk was kept, whole
    with open(out, "a") as f:
        f.write('{"id": "q2", "answer": "half a li')  # and a kill in the middle of writing a line

    stub["model"] = StubCheckpoint()
    assert run_infer("--batch", batch, "--output", out, "--batch-size", 2) == 0
    assert [q.splitlines()[-1] for q in stub["model"].queries] == [f"question {i}" for i in range(2, 7)]
    lines = read_lines(out)
    assert [line["id"] for line in lines] == ["q0", "q1", "q2", "bad", "q3", "q4", "q5", "q6"]
    for line, i in zip([x for x in lines if x["id"] != "bad"], range(7)):
        assert line["answer"].endswith(f": question {i}")
    assert "2 already in it, skipped" in capsys.readouterr().out

    stub["model"] = StubCheckpoint(budget=0)  # a third run has nothing to do and loads nothing
    loads = stub["loads"]
    assert run_infer("--batch", batch, "--output", out) == 0
    assert stub["loads"] == loads and len(read_lines(out)) == 8


def test_batch_errors_are_one_line_before_the_model_loads(stub, images, capsys, monkeypatch):
    folder = images.parent
    good = {"id": "a", "images": ["img/0.png"], "prompt": "x"}
    batch = write_batch(folder / "prompts.jsonl", [good, {**good, "id": "b"}])
    before = batch.read_bytes()
    (folder / "link.jsonl").symlink_to(batch)
    (folder / "foreign.jsonl").write_text('{"text": "someone else\'s file"}\n')
    (folder / "other.jsonl").write_text('{"id": "zz", "answer": "from another batch"}\n')
    monkeypatch.chdir(folder)
    cases = [
        (["--output", folder], "is a folder"),
        (["--output", "prompts.jsonl"], "is the batch file"),  # relative
        (["--output", folder / "link.jsonl"], "is the batch file"),  # a link to it
        (["--output", images / "0.png"], "is an image"),
        (["--output", folder / "foreign.jsonl"], "line 1: not an answer line of infer.py"),
        (["--output", folder / "other.jsonl"], "ids the batch file does not have"),
        (["--output", folder / "nowhere" / "a.jsonl"], "does not exist"),
    ]
    for extra, message in cases:
        assert run_infer("--batch", batch, *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("infer.py: error: ") and message in err, err
    assert batch.read_bytes() == before and (folder / "foreign.jsonl").read_text().startswith('{"text"')
    write_batch(batch, [good, {**good, "id": "b"}, good, {**good, "id": 7}, {"prompt": "line 5"}, {**good, "id": 5}])
    assert run_infer("--batch", batch, "--output", folder / "new.jsonl") == 2
    err = capsys.readouterr().err
    assert 'duplicate id(s): "a" (lines 1 and 3), 5 (lines 5 and 6)' in err
    assert stub["loads"] == 0 and not (folder / "new.jsonl").exists()


def test_single_prompt_inputs_are_checked_before_the_model_loads(stub, images, capsys):
    cases = [
        (["--image", images / "broken.jpg", "--prompt", "x"], "broken.jpg"),
        (["--image", images / "missing.png", "--prompt", "x"], "missing"),
        (["--image", images / "0.png", "--prompt", "<image><image>"], "2 <image> mark(s) but 1 image(s)"),
        (["--prompt", "x", "--temperature", "-0.5"], "--temperature -0.5: must be 0 (greedy) or a positive"),
        (["--prompt", "x", "--temperature", "nan"], "--temperature nan"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0"),
        (["--prompt", "x", "--device", "gpu"], "expected cpu, cuda or cuda:N"),
        (["--prompt", "x", "--device", "cuda:99"],
         "cuda:99: this machine has" if torch.cuda.is_available() else "no CUDA GPU is available here"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--prompt", "x", "--device", "cuda"], "--device cuda: no CUDA GPU is available here"))
    for args, message in cases:
        assert run_infer(*args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert stub["loads"] == 0
    with pytest.raises(SystemExit) as exit_info:  # flags are never abbreviated: --temp is not --temperature
        run_infer("--prompt", "x", "--temp", "1.5")
    assert exit_info.value.code == 2 and "unrecognized arguments: --temp" in capsys.readouterr().err


def test_generation_refuses_a_negative_or_nan_temperature():
    from inference import generate_answers

    for value in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be 0 .greedy. or a positive number"):
            generate_answers(None, None, None, [], system="", num_image_tokens=1, temperature=value)


def test_a_real_batch_run_answers_as_the_loaded_checkpoint_does(tiny_llm_dir, tiny_clip_dir, tmp_path):
    """The subprocess runs the real loading and generation path; its answers equal the in-process ones."""
    from model import apply_lora, build_vlm, save_bundle, vlm_config_for

    model = build_vlm(tiny_llm_dir, tiny_clip_dir)
    peft_model = apply_lora(model, r=4, alpha=8, verbose=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    save_bundle(peft_model, tmp_path / "bundle", vlm_config_for(model, tiny_llm_dir, tiny_clip_dir, "Be brief."))
    Image.fromarray(np.full((30, 20, 3), 200, dtype=np.uint8)).save(tmp_path / "a.png")
    batch = write_batch(tmp_path / "prompts.jsonl", [
        {"id": 1, "images": "a.png", "prompt": "What is it?"},
        {"id": 2, "images": ["gone.png"], "prompt": "x"},
        {"id": 3, "prompt": "No image here."},
    ])
    result = subprocess.run(
        [sys.executable, "infer.py", "--checkpoint", str(tmp_path / "bundle"), "--batch", str(batch), "--output",
         str(tmp_path / "answers.jsonl"), "--max-new-tokens", "5", "--device", "cpu"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = read_lines(tmp_path / "answers.jsonl")
    assert [line["id"] for line in lines] == [1, 2, 3] and "error" in lines[1]
    loaded = inference.load_checkpoint(tmp_path / "bundle", device="cpu")
    expected = loaded.generate(infer.prompts_of([("What is it?", [str(tmp_path / "a.png")]), ("No image here.", [])]),
                               max_new_tokens=5)
    assert [lines[0]["answer"], lines[2]["answer"]] == expected
