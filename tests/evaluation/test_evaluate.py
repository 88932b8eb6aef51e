"""evaluate.py and the evaluator on a tiny bundle: samples recognised, the shuffled control, generation mode equal
to infer.py and independent of the batch size, predictions mode and its errors, the training callback, and the
demo's demo_eval.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataprocess.schema import IMAGE_MARKER as TAG
from evaluation.samples import EvalSample
from evaluation.text import java_available
from tests.projects import write_test_config

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], check=False, cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir):
    return tiny_bundle_dir


@pytest.fixture(scope="module")
def loaded(bundle):
    from inference import load_checkpoint

    return load_checkpoint(bundle, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import numpy as np

    from demo.synthetic import Item, draw_image

    folder = tmp_path_factory.mktemp("images")
    items = [Item("red", "circle", "top left"), Item("blue", "square", "bottom right"),
             Item("green", "triangle", "top right"), Item("yellow", "circle", "bottom left")]
    paths = []
    for i, item in enumerate(items):
        path = folder / f"{i}.png"
        draw_image(item, 56, np.random.default_rng(i)).save(path)
        paths.append(str(path))
    return paths


def processed_row(sample_id, source, image, question, answer, candidates=None):
    answer_turn = {"role": "assistant", "content": answer, **({"candidates": candidates} if candidates else {})}
    return {"id": sample_id, "source": source, "images": [image],
            "turns": [{"role": "user", "content": f"{TAG}\n{question}"}, answer_turn]}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, images):
    """A processed JSONL: two AI Challenger captions (zh), two short answers to one question (en), a long answer."""
    rows = [
        processed_row("aic:0", "aic", images[0], "请描述这张图片。", "左上角有一个红色的圆形。",
                      ["左上角有一个红色的圆形。", "图片的左上角是一个红色圆形。"]),
        processed_row("llava:1", "llava", images[1], "What colour is the shape?", "blue"),
        processed_row("aic:2", "aic", images[2], "这张图片里有什么？", "右上角有一个绿色的三角形。",
                      ["右上角有一个绿色的三角形。", "一个绿色的三角形位于图片的右上角。"]),
        processed_row("llava:3", "llava", images[3], "What colour is the shape?", "yellow"),
        processed_row("llava:4", "llava", images[0], "Describe the picture in detail.",
                      "The picture shows a red circle in the top left corner of a light background."),
    ]
    path = tmp_path_factory.mktemp("data") / "val.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_samples_are_recognised_as_captions_short_and_long_answers(data_file):
    from evaluation.samples import read_processed

    samples = read_processed(data_file)
    assert [(s.kind, s.language) for s in samples] == [("caption", "zh"), ("qa", "en"), ("caption", "zh"),
                                                        ("qa", "en"), ("caption", "en")]
    assert samples[0].references == ["左上角有一个红色的圆形。", "图片的左上角是一个红色圆形。"]
    assert samples[1].answer == "blue" and samples[4].answer is None
    assert samples[1].group == samples[3].group != samples[0].group == samples[2].group


def test_shuffled_control_scores_each_answer_against_the_other_images_references(loaded, images):
    """Two samples ask the same question about different images. In the shuffled pass each is asked about the
    other's image, so its answer is exactly the other's with-image answer, and it is scored against the other's
    references: with references equal to the with-image answers, the shuffled accuracy is 1."""
    from evaluation.generation import generate_passes
    from evaluation.runner import evaluate_samples

    def sample(i, reference):
        return EvalSample(id=f"s{i}", language="en", kind="qa", prompt=f"{TAG}\nWhat colour is the shape?",
                          images=[images[i]], references=[reference], answer=reference, group="q")

    first = generate_passes(loaded, [sample(0, "-"), sample(1, "-")], passes=("with_image",), max_new_tokens=8,
                            progress=False)["with_image"]
    assert first[0] != first[1]  # the images change the answer: the test can tell the pairings apart
    samples = [sample(0, first[0]), sample(1, first[1])]
    seen = []
    hook = loaded.model.vision_tower.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        metrics, rows = evaluate_samples(loaded, samples, max_new_tokens=8, progress=False,
                                         normalise=lambda text, lang: text)
    finally:
        hook.remove()
    assert sum(seen) == 3  # the tower ran once per distinct image over the three passes: two pictures, one blank
    assert [r["prediction"] for r in rows] == first
    assert [r["shuffled_prediction"] for r in rows] == [first[1], first[0]]
    assert [r["shuffled_images_of"] for r in rows] == ["s1", "s0"]
    assert metrics["accuracy"] == 1.0 and metrics["shuffled"]["accuracy"] == 1.0
    assert metrics["shuffled"]["swapped"] == 2
    assert metrics["image_gain"]["accuracy"] == metrics["accuracy"] - metrics["blank"]["accuracy"]


def test_blank_pass_asks_each_distinct_prompt_once_with_the_answer_of_asking_it_alone(loaded, images):
    """With the images blanked the answer depends on the prompt alone: three samples, two of them one question
    about different images, cost two blank generations, and each gets what its own prompt, blanked, answers."""
    import torch

    from evaluation.generation import generate_passes
    from inference import Prompt
    from visual import load_image

    questions = ["What colour is the shape?", "What colour is the shape?", "Which corner is the shape in?"]
    samples = [EvalSample(id=f"s{i}", language="en", kind="qa", prompt=f"{TAG}\n{q}", images=[images[i]],
                          references=["-"], answer="-", group=q) for i, q in enumerate(questions)]
    asked = []
    generate = loaded.generate

    def counting(prompts, **options):
        if options.get("pixel_override") is not None:
            asked.extend(p.query for p in prompts)
        return generate(prompts, **options)

    loaded.generate = counting
    try:
        blank = generate_passes(loaded, samples, passes=("blank",), max_new_tokens=8, progress=False)["blank"]
    finally:
        del loaded.generate
    assert sorted(asked) == sorted({s.prompt for s in samples})
    alone = [generate([Prompt(s.prompt, [load_image(s.images[0])])], pixel_override=torch.zeros_like,
                      max_new_tokens=8)[0] for s in samples]
    assert blank == alone and blank[0] == blank[1]


def test_generate_mode_end_to_end_equals_infer_and_batch_size_does_not_matter(bundle, loaded, data_file, tmp_path):
    out = tmp_path / "eval"
    result = run("evaluate.py", "--checkpoint", str(bundle), "--data", str(data_file), "--batch-size", "2",
                 "--max-new-tokens", "6", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(result.stdout) == metrics
    assert (out / "report.md").read_text().startswith("# Evaluation")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["aic:0", "llava:1", "aic:2", "llava:3", "llava:4"]
    assert metrics["zh"]["n"] == 2 and metrics["en"]["n"] == 1 and metrics["en"]["n_qa"] == 2
    for lang in ("en", "zh"):
        for m in ("bleu_4", "cider"):
            assert metrics["image_gain"][lang][m] == pytest.approx(metrics[lang][m] - metrics["blank"][lang][m])

    # the answers are infer.py's for the same prompts and images (infer batches them 8 at a time, unsorted)
    prompts = tmp_path / "prompts.jsonl"
    samples = [json.loads(line) for line in data_file.read_text().splitlines()]
    assert [r["images"] for r in rows] == [s["images"] for s in samples]
    prompts.write_text("".join(json.dumps({"id": r["id"], "images": r["images"], "prompt": r["prompt"]}) + "\n"
                               for r in rows))
    infer = run("infer.py", "--checkpoint", str(bundle), "--batch", str(prompts), "--output", str(tmp_path / "a.jsonl"),
                "--max-new-tokens", "6")
    assert infer.returncode == 0, infer.stderr[-3000:]
    answers = [json.loads(line)["answer"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == answers

    # one sample at a time, in this process: the same answers and scores in all three passes
    from evaluation.runner import evaluate_samples
    from evaluation.samples import read_processed

    one, one_rows = evaluate_samples(loaded, read_processed(data_file), batch_size=1,
                                     max_new_tokens=6, progress=False)
    assert one_rows == rows
    assert metrics["skipped"] == {"n": 0, "by_reason": {}, "first": []}  # evaluate.py's: every image loaded
    assert {k: v for k, v in one.items() if k != "settings"} == \
        {k: v for k, v in metrics.items() if k not in ("settings", "skipped")}

    # scoring the written predictions again gives the same with-image scores
    rescored = run("evaluate.py", "--predictions", str(out / "predictions.jsonl"), "--output", str(tmp_path / "re"))
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    again = json.loads(rescored.stdout)
    for lang in ("en", "zh"):
        assert again[lang] == metrics[lang]


GOOD_ROWS = [
    {"id": 1, "language": "en", "prediction": "A man rides a horse!",
     "references": ["A man rides a horse.", "a horse"]},
    {"id": 2, "language": "zh", "prediction": "一个女人在街上走。", "references": ["一个女人在街上走着。"]},
    {"id": 3, "language": "en", "kind": "qa", "prediction": "Blue.", "references": ["blue"], "answer": "blue"},
]


def test_predictions_mode_writes_three_files(tmp_path):
    source = tmp_path / "pred.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in GOOD_ROWS), encoding="utf-8")
    result = run("evaluate.py", "--predictions", str(source))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "pred-scored"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.jsonl", "report.md"]
    metrics = json.loads(result.stdout)
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert set(metrics["en"]) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "n", "accuracy", "n_qa"}
    assert metrics["en"]["n"] == 1 and metrics["zh"]["n"] == 1 and metrics["en"]["accuracy"] == 1.0
    assert metrics["en"]["bleu_1"] == pytest.approx(1.0, abs=1e-6)  # an exact match of one reference
    written = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == [1, 2, 3] and written[2]["correct"] is True and "cider" in written[0]
    if java_available():  # the official PTB tokenizer gives these rows the same English tokens
        ptb = run("evaluate.py", "--predictions", str(source), "--ptb", "--output", str(tmp_path / "ptb"))
        assert ptb.returncode == 0, ptb.stderr
        assert json.loads(ptb.stdout)["en"] == metrics["en"]
        assert "official PTB" in json.loads(ptb.stdout)["tokenizer"]["en"]
    # an output folder that holds the input is refused
    clash = run("evaluate.py", "--predictions", str(out / "predictions.jsonl"), "--output", str(out))
    assert clash.returncode == 2 and "would overwrite the input" in clash.stderr


@pytest.mark.parametrize("bad,message", [
    ({"id": 9, "language": "en", "prediction": "x"}, "line 2: missing key(s) references"),
    ({"id": 9, "language": "fr", "prediction": "x", "references": ["y"]}, "line 2: language must be \"en\" or \"zh\""),
    ({"id": 9, "language": "en", "prediction": "x", "references": []}, "line 2: references must be a non-empty list"),
    ({"id": 9, "language": "zh", "prediction": "x", "references": ["好", " "]}, "line 2: reference 1 is empty"),
    ({"id": 9, "language": "en", "prediction": "x", "references": ["y"], "kind": "vqa"}, "line 2: kind must be"),
])
def test_predictions_mode_exits_2_naming_the_bad_line(tmp_path, bad, message):
    source = tmp_path / "pred.jsonl"
    source.write_text(json.dumps(GOOD_ROWS[0]) + "\n" + json.dumps(bad) + "\n")
    result = run("evaluate.py", "--predictions", str(source))
    assert result.returncode == 2
    assert result.stderr.startswith("evaluate.py: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not (tmp_path / "pred-scored").exists()


@pytest.mark.parametrize("line,message", [
    (b'{"id": 9, "language": "en", "prediction": "caf\xe9", "references": ["y"]}', "line 2: not UTF-8 text (byte 0xe9"),
    (b'{"id": 9, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "line 2: nested too deeply to read"),
    (b'{"id": ' + b"7" * 5000 + b', "language": "en", "prediction": "x", "references": ["y"]}',
     "line 2: not readable JSON (Exceeds the limit"),
    (b'{"id": 9, "language": "en", "prediction": "\\ud800", "references": ["y"]}',
     "line 2: holds the lone surrogate \\ud800"),
], ids=["not-utf8", "deeply-nested", "5000-digit-id", "lone-surrogate"])
def test_predictions_mode_refuses_an_unreadable_line_naming_it_and_writes_nothing(tmp_path, line, message):
    source = tmp_path / "pred.jsonl"
    source.write_bytes(json.dumps(GOOD_ROWS[0]).encode() + b"\n" + line + b"\n")
    result = run("evaluate.py", "--predictions", str(source))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("evaluate.py: error: ") and message in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not (tmp_path / "pred-scored").exists()


def run_without_write_permission(*args):
    """evaluate.py bound by the folders' permission bits: as this user, or as root without the capabilities that
    let root write into a read-only folder (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    prefix = []
    if os.geteuid() == 0:
        import shutil

        if shutil.which("setpriv") is None:
            pytest.skip("root writes into read-only folders, and setpriv (util-linux) is not here to drop that")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
    return subprocess.run([*prefix, sys.executable, *args], check=False, cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_a_read_only_output_folder_is_refused_before_scoring_and_left_as_it_was(tmp_path):
    source = tmp_path / "pred.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in GOOD_ROWS), encoding="utf-8")
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "metrics.json").write_text('{"old": true}\n')
    previous.chmod(0o555)
    try:
        for output in (previous, previous / "new"):  # the read-only folder itself, or a folder to create in it
            result = run_without_write_permission("evaluate.py", "--predictions", str(source), "--output", str(output))
            assert result.returncode == 2, result.stderr[-2000:]
            assert result.stderr.startswith(f"evaluate.py: error: cannot write the output folder {output}: ")
            assert "is not writable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
            assert [p.name for p in previous.iterdir()] == ["metrics.json"]
            assert (previous / "metrics.json").read_text() == '{"old": true}\n'
    finally:
        previous.chmod(0o755)


@pytest.mark.parametrize("existing", [True, False], ids=["into-a-previous-result", "into-a-new-folder"])
def test_a_full_disk_while_writing_is_one_message_and_changes_nothing(tmp_path, monkeypatch, capsys, existing):
    """The disk fills while the files are written (the error surfaces when a staged file is flushed): exit
    status 1, one line, the previous results untouched, no partial file, and no folder left that the run made."""
    import errno

    import common.fileio
    from evaluate import main

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    source = tmp_path / "pred.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in GOOD_ROWS), encoding="utf-8")
    output = tmp_path / "previous" if existing else tmp_path / "new" / "deeper"
    if existing:
        output.mkdir()
        (output / "metrics.json").write_text('{"old": true}\n')
    monkeypatch.setattr(common.fileio, "fsync_file", full)
    assert main(["--predictions", str(source), "--output", str(output)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"evaluate.py: error: cannot write the results into {output}: No space left on device\n"
    if existing:
        assert [p.name for p in output.iterdir()] == ["metrics.json"]
        assert (output / "metrics.json").read_text() == '{"old": true}\n'
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.jsonl"]


def test_generation_skips_and_counts_samples_whose_image_cannot_be_loaded(bundle, loaded, data_file, images,
                                                                          tmp_path):
    """A truncated image and a missing one, in the group of the two short answers: both samples are skipped
    before the model loads, counted, and the rest is scored exactly as the file without them is."""
    from evaluation.runner import evaluate_samples
    from evaluation.samples import read_processed

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(images[0]).read_bytes()[:200])
    rows = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines()]
    bad = [processed_row("bad:truncated", "llava", str(truncated), "What colour is the shape?", "red"),
           processed_row("bad:missing", "llava", str(tmp_path / "none.png"), "What colour is the shape?", "red")]
    data = tmp_path / "with_bad.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [*rows[:2], *bad, *rows[2:]]))
    out = tmp_path / "eval"
    result = run("evaluate.py", "--checkpoint", str(bundle), "--data", str(data), "--max-new-tokens", "6",
                 "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping 2 of 7 samples" in result.stderr and "2 samples skipped" in result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["skipped"] == {"n": 2, "by_reason": {"corrupt": 1, "missing": 1}, "first": [
        {"id": "bad:truncated", "image": str(truncated), "reason": "corrupt"},
        {"id": "bad:missing", "image": str(tmp_path / "none.png"), "reason": "missing"}]}
    assert metrics["settings"]["samples"] == 5
    written = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert "2 samples whose image could not be loaded" in (out / "report.md").read_text()

    alone, alone_rows = evaluate_samples(loaded, read_processed(data_file), max_new_tokens=6, progress=False)
    assert written == alone_rows
    assert {k: v for k, v in metrics.items() if k not in ("settings", "skipped")} == \
        {k: v for k, v in alone.items() if k != "settings"}

    # nothing left to evaluate: refused
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text("".join(json.dumps(r) + "\n" for r in bad))
    refused = run("evaluate.py", "--checkpoint", str(bundle), "--data", str(only_bad), "--output", str(tmp_path / "x"))
    assert refused.returncode == 2 and "(every one was skipped)" in refused.stderr.splitlines()[-1]
    assert "Traceback" not in refused.stderr and not (tmp_path / "x").exists()


def run_in_process(args, capsys, monkeypatch) -> tuple[int, str]:
    """evaluate.main(args) from the checkout root, as `python evaluate.py ARGS` runs it: (exit status, stderr)."""
    import evaluate

    monkeypatch.chdir(ROOT)
    try:
        code = evaluate.main(args)
    except SystemExit as e:  # argparse's errors
        code = e.code
    return code, capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, bundle, capsys, monkeypatch):
    """Each bad input: exit status 2 and one line naming it. In-process (the same main as the command; the
    subprocess case below checks the command's own exit status and stderr)."""
    for args, message in [
        (["--predictions", str(tmp_path / "none.jsonl")], "predictions file not found"),
        (["--predictions", "x.jsonl", "--checkpoint", "b"], "--checkpoint does not apply"),
        (["--checkpoint", str(tmp_path), "--data", "x.jsonl"], "not a checkpoint folder"),
        (["--checkpoint", str(bundle), "--data", str(tmp_path / "none.jsonl")], "data file not found"),
        (["--limit", "0"], "--limit: must be at least 1"),
    ]:
        code, err = run_in_process(args, capsys, monkeypatch)
        assert code == 2, args
        assert err.startswith("evaluate.py: error: ") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    result = run("evaluate.py", "--predict", "x.jsonl")
    assert result.returncode == 2
    assert result.stderr.startswith("evaluate.py: error: ") and "unrecognized arguments: --predict" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------ training


def test_training_callback_logs_generation_metrics_beside_the_eval_loss(tmp_path, tiny_llm_dir, tiny_clip_dir,
                                                                       data_file):
    """train.py with training.eval_generation_samples: CIDEr-D, BLEU-4 and accuracy of the first N validation
    samples are logged at the evaluation's step, and equal what evaluate.py measures on that step's checkpoint."""
    write_test_config(tmp_path, tiny_llm_dir, tiny_clip_dir, training={
        "output_dir": str(tmp_path / "out"), "seed": 3, "max_steps": 2, "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2, "learning_rate": 5e-3, "save_steps": 2, "logging_steps": 1,
        "eval_strategy": "steps", "eval_steps": 2, "eval_generation_samples": 4, "report_to": "none",
        "disable_tqdm": True})
    result = run("train.py", "--config", str(tmp_path / "config.yaml"), "--train_file", str(data_file),
                 "--eval_file", str(data_file), "--max_length", "256")
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    generation = [e for e in history if "eval_cider_zh" in e]
    assert generation and generation[0]["step"] == 2
    logged = generation[0]
    assert {"eval_cider_zh", "eval_bleu_4_zh", "eval_accuracy"} <= set(logged)
    assert "eval_cider_en" not in logged  # the first 4 samples hold no English caption
    assert any("eval_loss" in e and e["step"] == 2 for e in history)
    assert "eval_cider_zh" in json.loads((tmp_path / "out" / "eval_results.json").read_text())

    measured = run("evaluate.py", "--checkpoint", str(tmp_path / "out" / "checkpoint-2"), "--data", str(data_file),
                   "--limit", "4", "--max-new-tokens", "128", "--output", str(tmp_path / "eval"))
    assert measured.returncode == 0, measured.stderr[-3000:]
    metrics = json.loads(measured.stdout)
    assert logged["eval_cider_zh"] == pytest.approx(metrics["zh"]["cider"], abs=1e-9)
    assert logged["eval_bleu_4_zh"] == pytest.approx(metrics["zh"]["bleu_4"], abs=1e-9)
    assert logged["eval_accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)


def test_demo_eval_from_the_evaluator(bundle, tmp_path, monkeypatch):
    """demo_eval.json's figures from a stand-in model that reads the held-out images perfectly when asked in a
    trained or text-only wording and, asked in a never-seen wording or shown a blank image, guesses yellow /
    square / bottom left: with the image and shuffled (scored against the answers of the image shown) all right,
    shuffled against the question's own image's answers all wrong (the two images share no label), blind and
    never-seen as the guesses score on these items by hand, chance levels."""
    import inference.loading
    from demo.evaluate import evaluate
    from demo.synthetic import ATTRIBUTES, plan_items, write_demo_raw_data
    from demo.wordings import SETS
    from visual import load_image

    paths = write_demo_raw_data(tmp_path / "raw", n_train=1, n_aic=1, n_heldout=2, image_size=56, seed=1)
    items = plan_items(2, 1, "heldout")  # yellow triangle bottom left, orange square bottom right: no label shared
    assert all(getattr(items[0], a) != getattr(items[1], a) for a in ATTRIBUTES)
    heldout = json.loads(Path(paths["heldout"]).read_text())
    item_of = {load_image(Path(paths["root"]) / row["image"]).tobytes(): item for row, item in zip(heldout, items)}
    guess = {"colour": "yellow", "shape": "square", "position": "bottom left"}
    kind_of = {q: (kind, which) for which, kinds in SETS.items() for kind, qs in kinds.items() for q in qs}

    def reads_the_image(model_, tokenizer, processor, prompts, *, pixel_override=None, **kwargs):
        out = []
        for p in prompts:
            (lang, attribute), which = kind_of[p.query.split("\n", 1)[1]]
            guessing = pixel_override is not None or which == "never_seen"  # never-seen wordings: not understood
            label = guess[attribute] if guessing else getattr(item_of[p.images[0].tobytes()], attribute)
            out.append(getattr(ATTRIBUTES[attribute][label], lang))
        return out

    monkeypatch.setattr(inference.loading, "generate_answers", reads_the_image)
    result = evaluate(bundle, Path(paths["heldout"]), batch_size=5)
    assert result["n"] == 12
    assert result["accuracy_with_image"] == 1.0 and result["accuracy_shuffled"] == 1.0
    assert result["accuracy_shuffled_own"] == 0.0  # each question was shown the other image
    # blind: the guesses name item 0's colour and corner and item 1's shape, in both languages
    assert result["accuracy_blind"] == 0.5
    assert {a: r["blind"] for a, r in result["by_attribute"].items()} == {"colour": 0.5, "shape": 0.5, "position": 0.5}
    assert result["by_language"] == {
        lang: {"with_image": 1.0, "blind": 0.5, "shuffled": 1.0, "shuffled_own": 0.0} for lang in ("en", "zh")}
    assert result["chance_level"] == pytest.approx(0.25)  # (1/6 + 1/3 + 1/4) / 3
    assert [result["by_attribute"][a]["chance"] for a in ("colour", "shape", "position")] == [0.1667, 0.3333, 0.25]
    assert "12 of 12 questions" in result["shuffled"]
    wordings = result["wordings"]
    assert {w: wordings[w]["n"] for w in wordings} == {"trained": 12, "text_only": 12, "never_seen": 12}
    assert wordings["trained"]["with_image"] == 1.0 and wordings["trained"]["shuffled_own"] == 0.0
    assert {k: wordings["text_only"][k] for k in ("with_image", "blind")} == {"with_image": 1.0, "blind": 0.5}
    assert "shuffled" not in wordings["text_only"]  # the shuffled control asks the trained wordings only
    assert {k: wordings["never_seen"][k] for k in ("with_image", "blind")} == {"with_image": 0.5, "blind": 0.5}
    assert wordings["never_seen"]["by_kind"]["zh shape"] == {"with_image": 0.5, "blind": 0.5}
    assert wordings["never_seen"]["by_attribute"]["colour"] == {"with_image": 0.5, "blind": 0.5}


def test_shuffled_answers_are_scored_against_the_own_images_answer_too():
    """own_image_scores compares each shuffled-image answer with the question's own answer, after normalisation;
    an answer naming no label never counts."""
    from demo.evaluate import own_image_scores
    from demo.synthetic import normalise_answer
    from evaluation.samples import EvalSample

    def sample(lang, answer):
        return EvalSample(id=answer, language=lang, kind="qa", prompt="<image>\nq", images=["x.png"],
                          references=[answer], answer=answer)

    samples = [sample("en", "red"), sample("en", "top left"), sample("zh", "圆形"), sample("zh", "蓝色"),
               sample("en", "square")]
    shown = ["Red.", "bottom left", "圆", "blue", ""]  # own answer; another image's; a synonym; wrong language; none
    rows = [{"shuffled_prediction": p} for p in shown]
    assert own_image_scores(samples, rows, normalise_answer) == [True, False, True, False, False]
