"""webui.py as a person uses it: a real headless Chromium (Debian's `chromium`, driven by playwright) against the
app, started once for this module on a free localhost port with a tiny checkpoint.

The tiny model's answers are gibberish, but deterministic: every answer in the page must equal what the shared
generation code (`inference.generate_answers`, greedy) returns for the same conversation, computed here on
a separately loaded copy of the checkpoint. Without chromium or playwright the browser tests are skipped with the
reason (see `pytest -ra`); `.ci/run` installs chromium.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
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
        jobs = [(pages[0], files["red"], "What colour is the shape?"),
                (pages[1], files["blue"], "图形在图片的哪个角？")]
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


# ------------------------------------------------------------------- the server's memory and the API (no browser)


@pytest.fixture(scope="module")
def served(tiny_bundle_dir):
    """The app in this process, so that the tests can look at what each session holds; (app, url)."""
    import webui
    from inference import load_checkpoint

    app = webui.build_app(load_checkpoint(tiny_bundle_dir, device="cpu"))
    app.queue(default_concurrency_limit=1)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True, quiet=True)
    yield app, f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture
def client(served):
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(served[1], verbose=False)
    yield client
    client.close()


def state_of(app, client) -> list:
    """The values of the session's gr.State components (the conversation's turns, the pending message)."""
    return list(app.state_holder.session_data[client.session_hash].state_data.values())


def turns_of(app, client) -> list:
    return next((value for value in state_of(app, client) if isinstance(value, list)), [])


def pending_of(app, client):
    import webui

    return next((value for value in state_of(app, client) if isinstance(value, webui.Pending)), None)


def image_bytes(value) -> int:
    """Bytes of the pixels held by a state value: every PIL image in it, however nested."""
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = [getattr(value, f.name) for f in dataclasses.fields(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum(image_bytes(v) for v in value)
    return 0


def gallery(*paths):
    from gradio_client import handle_file

    return [{"image": handle_file(str(p)), "caption": None} for p in paths]


def text_parts(chat) -> list:
    """A chat as returned by the API, without its pictures: the API does not take its own file parts back."""
    return [{**m, "content": [part for part in m["content"] if part.get("type") != "file"]} for m in chat]


def api_ask(client, text: str, images=(), chat=(), temperature=0.0, max_new_tokens=12):
    """Sends a message and gets its answer as the page's Send does; (chat after the answer, status)."""
    sent = client.predict(gallery(*images) if images else None, text, text_parts(chat), "You are a test.",
                          temperature, max_new_tokens, api_name="/submit")
    assert sent[-1] == "", sent[-1]  # the status line: no complaint
    return client.predict(api_name="/answer")


def api_answer_text(chat) -> str:
    return html.unescape(chat[-1]["content"][0]["text"])


def noise_photo(path: Path, width: int, height: int, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)  # any shift shows
    Image.fromarray(pixels).save(path)
    return path


def test_a_conversation_keeps_its_images_only_as_the_model_reads_them(served, client, reference, tmp_path):
    app, _ = served
    photos = [noise_photo(tmp_path / f"photo{i}.png", 1600, 1200 - 300 * i, seed=i) for i in range(3)]
    chat, status = api_ask(client, "Is <image> like <image>?", photos[:2])
    q1 = f"Is {TAG} like {TAG}?"
    assert api_answer_text(chat) == reference.answer(q1, photos[:2], max_new_tokens=12) and status == ""
    chat, _ = api_ask(client, "And this one?", photos[2:], chat)
    history = [(q1, api_answer_text(chat[:2]))]
    assert api_answer_text(chat) == reference.answer(f"{TAG}\nAnd this one?", photos, history, max_new_tokens=12)

    # the session holds three images of at most 56 x 56 (the tiny tower's size and crop), not 17 MB of photos
    side = max(reference.processor.size, *reference.processor.crop_size)
    held = image_bytes(state_of(app, client))
    assert 0 < held <= 3 * 3 * side * side, held
    # ... and exactly the pixels that preprocessing the uploads gives
    kept = [image for turn in turns_of(app, client) for image in turn.images]
    assert len(kept) == 3
    for image, photo in zip(kept, photos):
        assert torch.equal(reference.processor([image]), reference.processor([load_image(photo)]))


def test_turns_that_no_longer_fit_the_prompt_are_dropped_from_the_session(served, client, reference):
    app, _ = served
    words = " ".join(f"w{i}" for i in range(1400))  # a message of about 4000 tokens: two do not fit in 6144
    assert 3100 < len(reference.tokenizer.encode(words)) < 6000
    chat, status = api_ask(client, words, max_new_tokens=1)
    chat, status = api_ask(client, words, chat=chat, max_new_tokens=1)
    assert "The 1 oldest turn(s) no longer fit in the prompt and were dropped" in status
    assert len(turns_of(app, client)) == 1  # what the model no longer sees is not kept either


def test_an_upload_over_the_pixel_cap_is_refused_from_its_header(served, client, tmp_path):
    import webui

    big = tmp_path / "big.png"
    Image.new("1", (10_000, 10_000)).save(big)  # the 10000 x 10000 PNG (1 bit a pixel: a small file)
    assert webui.MAX_UPLOAD_PIXELS < 10_000 * 10_000
    sent = client.predict(gallery(big), "What is it?", [], "You are a test.", 0.0, 12, api_name="/submit")
    assert sent[-1] == (f"⚠ Cannot use big.png: too large (10000x10000 is over {webui.MAX_UPLOAD_PIXELS:,} pixels). "
                        "It was removed; nothing was sent.")
    assert image_bytes(state_of(served[0], client)) == 0


@pytest.mark.parametrize("temperature,max_new_tokens,message", [
    (5.0, 12, "greater than maximum value 2"),  # the slider's own range check
    (0.0, 100_000, "greater than maximum value 2048"),
    (0.0, 12.5, "⚠ Max new tokens 12.5: must be a whole number from 1 to 2048. Nothing was sent."),
])
def test_controls_sent_through_the_api_are_checked_and_the_next_question_is_answered(
        served, client, reference, temperature, max_new_tokens, message):
    from gradio_client.exceptions import AppError

    try:
        sent = client.predict(None, "Why?", [], "You are a test.", temperature, max_new_tokens, api_name="/submit")
        said = sent[-1]
    except AppError as e:
        said = str(e)
    assert message in said
    assert pending_of(served[0], client) is None  # no message left pending: the next one goes
    chat, status = api_ask(client, "Why?")
    assert api_answer_text(chat) == reference.answer("Why?", max_new_tokens=12) and status == ""


@pytest.mark.parametrize("button", ["/stop_answer", "/clear"])
def test_stop_and_clear_withdraw_a_message_whose_answer_never_came(served, client, reference, button):
    first, _ = api_ask(client, "Why?")
    # sent, but its answer step never runs (an API client that does not ask for it): the message stays pending
    sent = client.predict(None, "How?", first, "You are a test.", 0.0, 12, api_name="/submit")
    assert len(sent[0]) == 3
    again = client.predict(None, "How?", sent[0], "You are a test.", 0.0, 12, api_name="/submit")
    assert again[-1] == "Still answering the last message: wait, or press Stop."
    reset = client.predict(api_name=button)
    if button == "/stop_answer":  # the withdrawn message leaves the chat; the conversation stays
        assert reset == (first, "Stopped before the answer began; the message was not sent.")
        chat, status = api_ask(client, "How?", chat=first)
        assert api_answer_text(chat) == reference.answer("How?", history=[("Why?", api_answer_text(first))],
                                                         max_new_tokens=12)
    else:
        assert reset[:2] == ([], "")
        chat, status = api_ask(client, "How?")
        assert api_answer_text(chat) == reference.answer("How?", max_new_tokens=12)
    assert status == ""


def test_a_closed_session_is_freed_at_once(served, tiny_bundle_dir, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    app, url = served
    client = gradio_client.Client(url, verbose=False)
    chat, _ = api_ask(client, "What is it?", [noise_photo(tmp_path / "photo.png", 300, 200, seed=5)])
    session = client.session_hash
    assert image_bytes(state_of(app, client)) > 0
    client.close()  # like closing the tab: its heartbeat connection ends
    deadline = time.monotonic() + 60
    while app.state_holder.session_data[session].state_data and time.monotonic() < deadline:
        time.sleep(0.2)
    assert app.state_holder.session_data[session].state_data == {}

    # a page that still shows a conversation the server no longer holds is told so, rather than answered without it
    client = gradio_client.Client(url, verbose=False)
    try:
        sent = client.predict(None, "And then?", text_parts(chat), "You are a test.", 0.0, 12, api_name="/submit")
        assert sent[-1].startswith("⚠ The server has ended this session and no longer holds its conversation")
    finally:
        client.close()


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


@pytest.mark.parametrize("flags,message", [
    (["--port", "99999"], "argument --port: '99999' is not a port number (1 to 65535)"),
    (["--host", "999.1.1.1"], "--host 999.1.1.1: not an address or a name this machine knows"),
    (["--port", "{taken}"], "port {taken} is in use on 127.0.0.1"),
])
def test_a_host_or_port_that_cannot_be_served_is_one_message_before_the_model_loads(tmp_path, flags, message):
    missing = tmp_path / "no-checkpoint"  # checked after the address: its message would come first otherwise
    with socket.socket() as other:  # another server on a port
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        done = subprocess.run([sys.executable, "webui.py", "--checkpoint", str(missing),
                               *(flag.format(taken=taken) for flag in flags)],
                              check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and last.startswith("webui.py: error: ") and "Traceback" not in done.stderr
    assert message.format(taken=taken) in last, done.stderr


@pytest.mark.parametrize("temperature,max_new_tokens,problem", [
    (0.0, 512, None), (2.0, 1, None), (0.7, 2048.0, None),
    (float("nan"), 512, "temperature nan: must be a number from 0 to 2"),
    (float("inf"), 512, "temperature inf: must be a number from 0 to 2"),
    ("hot", 512, "temperature 'hot': must be a number from 0 to 2"),
    (0.0, 0, "max new tokens 0: must be a whole number from 1 to 2048"),
    (0.0, 3.5, "max new tokens 3.5: must be a whole number from 1 to 2048"),
    (0.0, float("nan"), "max new tokens nan: must be a whole number from 1 to 2048"),
])
def test_the_controls_are_checked_on_the_server(temperature, max_new_tokens, problem):
    import webui

    assert webui.controls_problem(temperature, max_new_tokens) == problem
