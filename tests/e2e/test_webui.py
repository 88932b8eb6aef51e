"""webui.py as a person uses it: a real headless Chromium (Debian's `chromium`, driven by playwright) against the
app, started once for this module on a free localhost port with a tiny checkpoint.

The tiny model's answers are gibberish, but deterministic: every answer in the page must equal what the shared
generation code (`inference.generate_answers`, greedy) returns for the same conversation, computed here on
a separately loaded copy of the checkpoint. Without chromium or playwright the browser tests are skipped with the
reason (see `pytest -ra`); `.ci/run` installs chromium.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from inference import Prompt, generate_answers
from model import load_vlm
from qwen import QWenTokenizer
from visual import ImagePreprocessor, load_image

ROOT = Path(__file__).resolve().parents[2]
TAG = "<image>"  # the image marker of prompts (dataprocess.schema.IMAGE_MARKER)
# Debian's chromium as root needs --no-sandbox; the rest keep it off the (closed) network and quick to start.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--disable-quic"]
TIMEOUT_MS = 120_000  # generous: the CPU may be shared; nothing here is timed


# ------------------------------------------------------------------------------------------- the app and a reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(checkpoint, log_path: Path):
    """`python webui.py` on a free port; returns (process, url) once the page is served."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "webui.py", "--checkpoint", str(checkpoint), "--port", str(port),
                             "--device", "cpu"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"webui.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"webui.py did not serve {url} in time:\n{log_path.read_text()[-3000:]}")


def stop_app(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def app(tiny_bundle_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("webui") / "webui.log"
    proc, url = start_app(tiny_bundle_dir, log)
    yield url, log
    stop_app(proc)


class Reference:
    """The shared generation code on its own copy of a checkpoint: what the page must show."""

    def __init__(self, checkpoint):
        self.model, self.config = load_vlm(checkpoint)
        self.model.eval()
        llm_path, vision_path = self.config.resolve(Path(checkpoint))
        self.tokenizer = QWenTokenizer.from_pretrained(llm_path)
        self.processor = ImagePreprocessor.from_pretrained(vision_path)

    def answer(self, query: str, images=(), history=None, max_new_tokens: int = 24) -> str:
        return generate_answers(self.model, self.tokenizer, self.processor,
                                [Prompt(query, [load_image(p) for p in images], history)],
                                system=self.config.system_prompt, num_image_tokens=self.config.vision.num_image_tokens,
                                max_new_tokens=max_new_tokens)[0]


@pytest.fixture(scope="module")
def reference(tiny_bundle_dir):
    return Reference(tiny_bundle_dir)


def draw(path: Path, colour, corner: int) -> Path:
    image = Image.new("RGB", (96, 96), (236, 232, 222))
    x, y = (corner % 2) * 48, (corner // 2) * 48
    ImageDraw.Draw(image).rectangle([x + 6, y + 6, x + 42, y + 42], fill=colour)
    image.save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    red, blue, green = (draw(folder / f"{name}.png", colour, corner) for name, colour, corner in
                        (("red", (215, 30, 30), 0), ("blue", (35, 65, 215), 3), ("green", (30, 150, 45), 1)))
    (folder / "notes.png").write_text("these are notes, not a picture\n")
    (folder / "truncated.png").write_bytes(red.read_bytes()[:120])
    return {"red": red, "blue": blue, "green": green, "notes": folder / "notes.png",
            "truncated": folder / "truncated.png"}


# ------------------------------------------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("no `chromium` on PATH: install Debian's chromium (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                   "(pip install -r requirements-dev.txt)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#send-button")
    # Record every text the newest answer shows while it streams in (window.__seen), to see it grow.
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const answers = document.querySelectorAll('#chatbot [data-testid=bot] .message-content');
            if (answers.length !== window.__want) return;
            const text = answers[answers.length - 1].textContent;
            if (window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
        }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
    }""")
    return page


@pytest.fixture
def page(browser, app):
    page = open_page(browser, app[0])
    yield page
    page.close()


def attach(page, *paths):
    before = page.locator("#image-input .thumbnail-item").count()
    page.locator("#image-input input[type=file]").set_input_files([str(p) for p in paths])
    page.wait_for_function(f"() => document.querySelectorAll('#image-input .thumbnail-item').length === "
                           f"{before + len(paths)}")


def set_max_new_tokens(page, n: int):
    box = page.locator("#max-new-tokens-input input[type=number]")
    box.fill(str(n))
    box.press("Enter")


def answers(page) -> list[str]:
    return page.locator("#chatbot [data-testid=bot] .message-content").all_text_contents()


def send(page, text: str):
    """Types and sends a message (the chat must be idle)."""
    n = len(answers(page))
    page.evaluate(f"() => {{ window.__want = {n + 1}; window.__seen = []; }}")
    page.locator("#prompt-input textarea").fill(text)
    page.locator("#send-button").click()
    return n


def wait_answer(page, n_before: int) -> str:
    """The new answer once it is complete (the send button is enabled again after every answer)."""
    page.wait_for_function(f"() => document.querySelectorAll('#chatbot [data-testid=bot]').length > {n_before}")
    page.wait_for_function("() => !document.querySelector('#send-button').disabled")
    return answers(page)[n_before]


def ask(page, text: str) -> str:
    return wait_answer(page, send(page, text))


def status(page) -> str:
    return page.locator("#status [data-testid=markdown]").inner_text().strip()


# ----------------------------------------------------------------------------------------------------------- tests


def test_a_question_about_an_image_streams_the_shared_answer_and_follow_ups_see_the_earlier_turns(
        page, reference, files):
    set_max_new_tokens(page, 40)
    attach(page, files["red"])
    first = ask(page, "What colour is the shape?")
    q1 = f"{TAG}\nWhat colour is the shape?"
    assert first == reference.answer(q1, [files["red"]], max_new_tokens=40)
    # it streamed: the page showed the answer growing, each text a beginning of the next
    seen = page.evaluate("() => window.__seen")
    assert len(seen) >= 3, seen
    for shorter, longer in zip(seen, seen[1:]):
        assert longer.strip().startswith(shorter.strip()), seen
    assert page.locator("#chatbot [data-testid=user] img").count() == 1  # the picture is shown with the question

    # a follow-up without an image: the model sees the first turn and its picture
    second = ask(page, "Which corner is it in?")
    history = [(q1, first)]
    assert second == reference.answer("Which corner is it in?", [files["red"]], history, max_new_tokens=40)
    assert second != reference.answer("Which corner is it in?", max_new_tokens=40)  # the history matters here

    # a third turn with a new picture placed by <image>: images spliced in the order they were given
    attach(page, files["blue"])
    third = ask(page, "Is <image> the same colour?")
    history.append(("Which corner is it in?", second))
    assert third == reference.answer(f"Is {TAG} the same colour?", [files["red"], files["blue"]], history,
                                     max_new_tokens=40)
    assert status(page) == ""


def file_transfer(page, path: Path, name: str):
    """A DataTransfer holding the file, as a drop or a paste carries it."""
    data = base64.b64encode(path.read_bytes()).decode()
    return page.evaluate_handle("""([data, name]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: 'image/png'}));
        return transfer;
    }""", [data, name])


def test_images_arrive_by_drag_and_drop_and_by_paste_in_order(page, reference, files):
    set_max_new_tokens(page, 16)
    dropped = file_transfer(page, files["red"], "dropped.png")
    zone = page.locator("#image-input .upload-container").first
    for event in ("dragenter", "dragover", "drop"):
        zone.dispatch_event(event, {"dataTransfer": dropped})
    page.wait_for_function("() => document.querySelectorAll('#image-input .thumbnail-item').length === 1")
    pasted = file_transfer(page, files["blue"], "pasted.png")  # Ctrl+V of a copied picture, in the message box
    page.locator("#prompt-input textarea").evaluate(
        "(box, transfer) => box.dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true}))",
        pasted)
    page.wait_for_function("() => document.querySelectorAll('#image-input .thumbnail-item').length === 2")
    answer = ask(page, "Is <image> brighter than <image>?")
    assert answer == reference.answer(f"Is {TAG} brighter than {TAG}?", [files["red"], files["blue"]],
                                      max_new_tokens=16)
    assert answer != reference.answer(f"Is {TAG} brighter than {TAG}?", [files["blue"], files["red"]],
                                      max_new_tokens=16)  # the order matters, and is the order given


def test_bad_uploads_show_a_message_and_the_app_keeps_serving(page, reference, files):
    set_max_new_tokens(page, 12)
    attach(page, files["notes"])
    send(page, "What colour is the shape?")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('notes.png')")
    assert "Cannot use notes.png: not an image" in status(page)
    assert answers(page) == [] and page.locator("#chatbot [data-testid=user]").count() == 0
    assert page.locator("#image-input .thumbnail-item").count() == 0  # the bad file was taken off

    attach(page, files["truncated"])
    page.locator("#send-button").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('truncated.png')")
    assert "Cannot use truncated.png: corrupt" in status(page)

    attach(page, files["green"])
    send(page, "Is <image> like <image>?")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('mark')")
    assert "the prompt has 2 <image> mark(s) but 1 image(s) were given" in status(page)
    assert answers(page) == []

    # still serving: the next question (the picture is still attached) is answered
    answer = ask(page, "What colour is the shape?")
    assert answer == reference.answer(f"{TAG}\nWhat colour is the shape?", [files["green"]], max_new_tokens=12)
    assert status(page) == ""


def test_two_tabs_at_once_each_get_their_own_answer_one_after_the_other(browser, app, reference, files):
    url, log = app
    pages = [open_page(browser, url) for _ in range(2)]
    try:
        jobs = [(pages[0], files["red"], "What colour is the shape?"), (pages[1], files["blue"], "图形在图片的哪个角？")]
        for tab, image, _ in jobs:
            set_max_new_tokens(tab, 60)
            attach(tab, image)
        log_start = len(log.read_text())
        counts = [send(tab, question) for tab, _, question in jobs]  # the second is sent while the first runs
        got = [wait_answer(tab, n) for (tab, _, _), n in zip(jobs, counts)]
        for (_, image, question), answer in zip(jobs, got):
            assert answer == reference.answer(f"{TAG}\n{question}", [image], max_new_tokens=60)
        assert got[0] != got[1]
        # one answer at a time: the server log alternates answering / done
        events = re.findall(r"webui: message \d+ (answering|done)", log.read_text()[log_start:])
        assert events == ["answering", "done", "answering", "done"], events
    finally:
        for tab in pages:
            tab.close()


def test_stop_ends_the_answer_early_and_clear_starts_over(app, page, reference, files):
    set_max_new_tokens(page, 2048)  # this question's greedy answer runs to the limit: thousands of tokens
    attach(page, files["red"])
    question = f"{TAG}\nExplain the picture in detail."
    log_start = len(app[1].read_text())
    n = send(page, "Explain the picture in detail.")
    page.wait_for_function("() => (window.__seen || []).some(t => t.length > 0)")
    page.locator("#stop-button").click()
    stopped = wait_answer(page, n)
    assert status(page) == "Stopped."
    assert re.search(r"webui: message \d+ done in .* \(stopped\)", app[1].read_text()[log_start:])
    # what was shown is the beginning of the uninterrupted answer (compared on a longer greedy run)
    limit = 32
    while True:
        longer = reference.answer(question, [files["red"]], max_new_tokens=limit)
        if len(longer) > len(stopped) + 20 or limit >= 2048:
            break
        limit *= 2
    assert 0 < len(stopped) < len(longer) and longer.startswith(stopped.rstrip("\ufffd")), (stopped, longer)

    # the stopped answer is part of the conversation: the next question sees it
    set_max_new_tokens(page, 12)
    follow = ask(page, "Why?")
    assert follow == reference.answer("Why?", [files["red"]], [(question, stopped)], max_new_tokens=12)

    page.locator("#clear-button").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=user]').length === 0")
    fresh = ask(page, "Why?")
    assert fresh == reference.answer("Why?", max_new_tokens=12)  # no history, no image after Clear


def test_the_chatbots_own_clear_button_forgets_the_conversation_even_mid_answer(page, reference, files):
    set_max_new_tokens(page, 2048)
    attach(page, files["green"])
    n = send(page, "Explain the picture in detail.")
    page.wait_for_function("() => (window.__seen || []).some(t => t.length > 0)")
    page.locator("#chatbot button[aria-label=Clear]").click()  # the trash icon of the chat itself
    page.wait_for_function("() => !document.querySelector('#send-button').disabled")
    assert n == 0 and answers(page) == [] and page.locator("#chatbot [data-testid=user]").count() == 0
    set_max_new_tokens(page, 12)
    assert ask(page, "Why?") == reference.answer("Why?", max_new_tokens=12)  # nothing of the cleared turn is left


def test_example_prompts_fill_the_message_box(page):
    for example in ("图形是什么颜色？", "Which corner of the image is the shape in?"):
        page.get_by_text(example, exact=True).click()
        page.wait_for_function("(text) => document.querySelector('#prompt-input textarea').value === text", arg=example)


def test_screenshot_of_an_exchange(browser, app, reference, files, tmp_path):
    """A picture of the page after a question in English and one in Chinese. WEBUI_SCREENSHOT=docs/webui.png
    writes it there too (optimised); WEBUI_SCREENSHOT_CHECKPOINT and WEBUI_SCREENSHOT_IMAGE (e.g. the demo model
    and one of its held-out images) take it with another checkpoint; the answers are checked either way."""
    checkpoint = os.environ.get("WEBUI_SCREENSHOT_CHECKPOINT")
    image = Path(os.environ.get("WEBUI_SCREENSHOT_IMAGE", files["red"]))
    proc = None
    url = app[0]
    if checkpoint:
        proc, url = start_app(checkpoint, tmp_path / "webui.log")
    try:
        ref = Reference(checkpoint) if checkpoint else reference
        page = open_page(browser, url)
        page.set_viewport_size({"width": 1100, "height": 760})
        set_max_new_tokens(page, 16)
        attach(page, image)
        english = ask(page, "What colour is the shape?")
        chinese = ask(page, "图形是什么颜色？")
        q1 = f"{TAG}\nWhat colour is the shape?"
        assert english == ref.answer(q1, [image], max_new_tokens=16)
        assert chinese == ref.answer("图形是什么颜色？", [image], [(q1, english)], max_new_tokens=16)
        shot = tmp_path / "webui.png"
        page.screenshot(path=str(shot))
        page.close()
        assert Image.open(shot).size == (1100, 760)
        target = os.environ.get("WEBUI_SCREENSHOT")
        if target:
            Image.open(shot).convert("RGB").quantize(colors=128).save(target, optimize=True)
    finally:
        if proc is not None:
            stop_app(proc)


# ------------------------------------------------------------------------------------- start-up errors (no browser)


@pytest.mark.parametrize("damage,message", [
    (None, "not a checkpoint folder (no vlm_config.json)"),
    ("config", "not valid JSON"),
    ("projector", "cannot load the checkpoint"),
])
def test_a_missing_or_broken_checkpoint_is_one_message_and_exit_status_2(tiny_bundle_dir, tmp_path, capsys,
                                                                         damage, message):
    import webui

    folder = tmp_path / "bundle"
    if damage is None:
        folder.mkdir()
    else:
        shutil.copytree(tiny_bundle_dir, folder)
        if damage == "config":
            (folder / "vlm_config.json").write_text('{"llm_path": ')
        else:
            data = (folder / "projector.safetensors").read_bytes()
            (folder / "projector.safetensors").write_bytes(data[: len(data) // 2])
    assert webui.main(["--checkpoint", str(folder)]) == 2
    err = capsys.readouterr().err  # (loading progress bars may come first)
    last = err.strip().splitlines()[-1]
    assert last.startswith("webui.py: error: ") and message in last and "Traceback" not in err, err
