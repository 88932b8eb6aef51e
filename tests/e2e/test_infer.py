"""infer.py as a user runs it: every input checked before the model loads, batch rows answered in input order
with bad rows marked in place, answers appended as they come, and an interrupted batch resumed without
answering an id twice. The model is a stub for the bookkeeping tests (what reaches `generate` is recorded),
and a real tiny bundle for the end-to-end run."""

from __future__ import annotations

import builtins
import contextlib
import errno
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


def test_an_interrupted_batch_resumes_to_the_file_of_an_uninterrupted_run(stub, images, capsys):
    rows = [{"id": f"q{i}", "images": [f"img/{i % 3}.png"], "prompt": f"question {i}"} for i in range(7)]
    rows.insert(3, {"id": "bad", "images": ["img/missing.png"], "prompt": "x"})
    batch = write_batch(images.parent / "prompts.jsonl", rows)
    reference, out = images.parent / "reference.jsonl", images.parent / "answers.jsonl"
    assert run_infer("--batch", batch, "--output", reference, "--batch-size", 2) == 0
    whole = reference.read_bytes()

    stub["model"] = StubCheckpoint(budget=3)  # chunks of 2: the second chunk dies on its 2nd prompt
    with pytest.raises(Interrupted):
        run_infer("--batch", batch, "--output", out, "--batch-size", 2)
    assert [line["id"] for line in read_lines(out)] == ["q0", "q1"]  # the first chunk was kept, whole
    with open(out, "ab") as f:
        f.write(whole[len(out.read_bytes()):][:30])  # and a kill in the middle of writing the next line

    stub["model"] = StubCheckpoint()
    assert run_infer("--batch", batch, "--output", out, "--batch-size", 2) == 0
    assert [q.splitlines()[-1] for q in stub["model"].queries] == [f"question {i}" for i in range(2, 7)]
    assert out.read_bytes() == whole
    lines = read_lines(out)
    assert [line["id"] for line in lines] == ["q0", "q1", "q2", "bad", "q3", "q4", "q5", "q6"]
    for line, i in zip([x for x in lines if x["id"] != "bad"], range(7)):
        assert line["answer"].endswith(f": question {i}")
    assert "2 already in it, skipped" in capsys.readouterr().out

    stub["model"] = StubCheckpoint(budget=0)  # a third run has nothing to do and loads nothing
    loads = stub["loads"]
    assert run_infer("--batch", batch, "--output", out) == 0
    assert stub["loads"] == loads and out.read_bytes() == whole


def test_a_run_killed_at_any_byte_resumes_to_the_file_of_an_uninterrupted_run(stub, images):
    batch = write_batch(images.parent / "prompts.jsonl", [
        {"id": "q0", "images": ["img/0.png"], "prompt": "question 0"},
        {"prompt": "第二个问题"},  # no id: the line number
        {"id": "bad", "images": ["img/missing.png"], "prompt": "x"},
        {"id": 4, "prompt": "last"},
    ])
    reference, out = images.parent / "reference.jsonl", images.parent / "answers.jsonl"
    assert run_infer("--batch", batch, "--output", reference, "--batch-size", 2) == 0
    whole = reference.read_bytes()
    for cut in range(len(whole)):  # what a kill leaves after `cut` bytes, in any line, any character
        out.write_bytes(whole[:cut])
        assert run_infer("--batch", batch, "--output", out, "--batch-size", 2) == 0, cut
        assert out.read_bytes() == whole, cut


def test_an_output_that_is_not_this_batchs_answers_is_left_byte_identical(stub, images, capsys):
    folder = images.parent
    batch = write_batch(folder / "prompts.jsonl", [{"prompt": "first"}, {"images": ["img/0.png"], "prompt": "second"}])
    ours = folder / "ours.jsonl"
    assert run_infer("--batch", batch, "--output", ours) == 0
    answers = ours.read_bytes()
    stub["loads"] = 0
    cases = {
        "settings.json": (b'{"learning_rate": 0.001, "epochs": 3}',
                          "line 1 (the last, with no newline): not the start"),
        "pretty.json": (b'{\n  "id": 1,\n  "answer": "x"\n}', "line 1: not an answer line of infer.py"),
        "earlier.jsonl": (b'{"id": 1, "answer": "x"}\n', "line 1: an answer line without row_hash"),
        "appended.jsonl": (answers + b"a note without a newline", "line 3 (the last, with no newline): not the start"),
        "edited.jsonl": (answers.replace(b'"answer": ', b'"score": 1, "answer": ', 1), "line 1: not an answer line"),
    }
    for name, (content, why) in cases.items():
        (folder / name).write_bytes(content)
        assert run_infer("--batch", batch, "--output", folder / name) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"infer.py: error: --output {folder / name}") and why in err, err
        assert (folder / name).read_bytes() == content, name
    assert stub["loads"] == 0


def test_the_answers_of_another_batch_are_refused(stub, images, capsys):
    folder = images.parent
    first = write_batch(folder / "a.jsonl", [{"prompt": "What colour?"}, {"images": "img/0.png", "prompt": "Size?"}])
    out = folder / "answers.jsonl"
    assert run_infer("--batch", first, "--output", out) == 0
    before = out.read_bytes()
    others = {  # ids numbered the same, other questions: each is another batch
        "b.jsonl": [{"prompt": "Which shape?"}, {"prompt": "Where?"}, {"prompt": "Why?"}],
        "c.jsonl": [{"prompt": "What colour?"}, {"images": "img/1.png", "prompt": "Size?"}],  # another image
        "d.jsonl": [{"id": 1, "prompt": "What colour?"}, {"id": 2, "images": "img/0.png", "prompt": "Size!"}],
    }
    lines = {"b.jsonl": 1, "c.jsonl": 2, "d.jsonl": 2}
    for name, rows in others.items():
        assert run_infer("--batch", write_batch(folder / name, rows), "--output", out) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"line {lines[name]}: id {lines[name]} was answered for another question" in err
        assert "another batch" in err and out.read_bytes() == before
    loads = stub["loads"]
    # The same rows written differently (key order, spacing, one path as a list), one row added: resumed.
    (folder / "a.jsonl").write_text('{ "prompt" : "What colour?" }\n{"prompt": "Size?", "images": ["img/0.png"]}\n'
                                    '{"prompt": "And now?"}\n')
    stub["model"] = StubCheckpoint()
    assert run_infer("--batch", first, "--output", out) == 0
    assert [q.splitlines()[-1] for q in stub["model"].queries] == ["And now?"]
    assert out.read_bytes().startswith(before) and [line["id"] for line in read_lines(out)] == [1, 2, 3]
    assert stub["loads"] == loads + 1


def refuse_writes(monkeypatch, folder: Path) -> None:
    """Opening a file of `folder` for writing fails as in a read-only folder (for root, whom permission bits do
    not stop)."""
    real_open = builtins.open

    def guarded(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).parent == folder and set(mode) & set("wax+"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(stub, images, capsys, monkeypatch):
    folder = images.parent / "locked"
    folder.mkdir()
    batch = write_batch(images.parent / "prompts.jsonl", [{"prompt": "first"}, {"prompt": "second"}])
    assert run_infer("--batch", batch, "--output", folder / "answers.jsonl") == 0
    whole = (folder / "answers.jsonl").read_bytes()
    (folder / "answers.jsonl").write_bytes(whole[:-5])  # a kill in the last line: would be cut before appending
    stub["loads"] = 0
    os.chmod(folder / "answers.jsonl", 0o444)
    os.chmod(folder, 0o555)
    try:
        if os.geteuid() == 0:
            refuse_writes(monkeypatch, folder)
        for name in ("answers.jsonl", "new.jsonl"):
            assert run_infer("--batch", batch, "--output", folder / name) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"--output {folder / name}" in err and "Permission denied" in err, err
    finally:
        os.chmod(folder, 0o755)
    assert stub["loads"] == 0 and (folder / "answers.jsonl").read_bytes() == whole[:-5]
    assert not (folder / "new.jsonl").exists()


def test_a_checkpoint_that_does_not_load_leaves_no_output_behind(stub, images, capsys, monkeypatch):
    """The output is created before the model loads (to know it can be written); a failed load removes it."""
    batch = write_batch(images.parent / "prompts.jsonl", [{"prompt": "first"}])

    def no_checkpoint(*args, **kwargs):
        raise FileNotFoundError("no checkpoint under ./outputs")

    monkeypatch.setattr(inference, "load_checkpoint", no_checkpoint)
    assert run_infer("--batch", batch, "--output", images.parent / "answers.jsonl") == 2
    assert "no checkpoint under ./outputs" in capsys.readouterr().err
    assert not (images.parent / "answers.jsonl").exists()


@contextlib.contextmanager
def file_size_limit(size: int):
    """No file of this process grows beyond `size` bytes: a write past it fails (EFBIG), as on a full disk."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_part_way_is_one_message_and_keeps_the_lines_written(stub, images, capsys):
    batch = write_batch(images.parent / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(6)])
    reference, out = images.parent / "reference.jsonl", images.parent / "answers.jsonl"
    assert run_infer("--batch", batch, "--output", reference, "--batch-size", 2) == 0
    whole = reference.read_bytes()
    first_chunk = len(b"".join(whole.splitlines(keepends=True)[:2]))
    with file_size_limit(first_chunk + 10):  # the second chunk is cut 10 bytes in
        assert run_infer("--batch", batch, "--output", out, "--batch-size", 2) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"infer.py: error: --output {out} cannot be written (File too large)" in err
    assert "the 2 answer lines before are kept" in err
    assert out.read_bytes() == whole[:first_chunk]  # no half line left behind
    assert run_infer("--batch", batch, "--output", out, "--batch-size", 2) == 0
    assert out.read_bytes() == whole


def test_one_odd_row_does_not_block_the_batch(stub, images, capsys):
    """A lone surrogate (valid JSON, not text), bytes that are not UTF-8, a 5000-digit number, deep nesting:
    each is that row's error (or, for an id, written back as its escape), and the batch is answered."""
    batch = images.parent / "prompts.jsonl"
    batch.write_bytes(b"\n".join([
        b'{"id": "a", "prompt": "first"}',
        b'{"id": "\\ud800", "prompt": "an id with a lone surrogate"}',
        b'{"id": "s", "prompt": "a prompt with \\udc00 in it"}',
        b'{"id": "latin-1", "prompt": "caf\xe9"}',
        b'{"id": ' + b"9" * 5000 + b', "prompt": "x"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"id": "z", "prompt": "last"}',
    ]) + b"\n")
    out = images.parent / "answers.jsonl"
    assert run_infer("--batch", batch, "--output", out) == 0
    text = out.read_bytes().decode("utf-8")  # valid UTF-8: the surrogate is written as its escape
    assert '{"id": "\\ud800", "row_hash": ' in text
    lines = read_lines(out)
    assert [line["id"] for line in lines] == ["a", "\ud800", "s", 4, 5, 6, "z"]
    assert [line.get("answer") for line in lines] == [
        "0 image(s) (): first", "0 image(s) (): an id with a lone surrogate", None, None, None, None,
        "0 image(s) (): last"]
    errors = {line["id"]: line["error"] for line in lines if "error" in line}
    assert errors == {
        "s": "the prompt has a lone surrogate \\udc00 (character 15): not text, it cannot be encoded",
        4: "line 4: not UTF-8 text (byte 33)",
        5: "line 5: cannot be read as JSON (a number with too many digits)",
        6: "line 6: cannot be read as JSON (nested too deeply)",
    }
    before = out.read_bytes()
    assert run_infer("--batch", batch, "--output", out) == 0  # and the rerun recognises every line
    assert "nothing to do" in capsys.readouterr().out and out.read_bytes() == before


def test_batch_errors_are_one_line_before_the_model_loads(stub, images, capsys, monkeypatch):
    folder = images.parent
    good = {"id": "a", "images": ["img/0.png"], "prompt": "x"}
    batch = write_batch(folder / "prompts.jsonl", [good, {**good, "id": "b"}])
    before = batch.read_bytes()
    (folder / "link.jsonl").symlink_to(batch)
    (folder / "foreign.jsonl").write_text('{"text": "someone else\'s file"}\n')
    (folder / "other.jsonl").write_text('{"id": "zz", "row_hash": "0123456789abcdef", "answer": "another batch"}\n')
    monkeypatch.chdir(folder)
    cases = [
        (["--output", folder], "is a folder"),
        (["--output", "prompts.jsonl"], "is the batch file"),  # relative
        (["--output", folder / "link.jsonl"], "is the batch file"),  # a link to it
        (["--output", images / "0.png"], "is an image"),
        (["--output", folder / "foreign.jsonl"], "line 1: not an answer line of infer.py"),
        (["--output", folder / "other.jsonl"], 'line 1: id "zz" is not in the batch file'),
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
