"""Chat with the trained model about images, in the browser.

    python webui.py                                    # the newest bundle under ./outputs, http://127.0.0.1:7860
    python webui.py --checkpoint outputs/demo --port 8000 --device cpu
    python webui.py --host 0.0.0.0                     # other machines can reach it: so can ANYONE on the network
    python webui.py --share                            # a temporary public gradio.live link (needs internet)

Attach one or more images (upload, drag and drop, or paste), ask, and the answer streams in. The model sees the
whole conversation: earlier turns and their images, in the ChatML layout of training. `<image>` in a message
marks where each of its images goes; without it they go first, one per line. The generation code is infer.py's
(`inference`). The model is loaded once and answers one message at a time: requests from several tabs wait in
a queue. Exit status 2, with one line, when the host or port cannot be listened on (checked before the model
loads) or the checkpoint is missing or cannot be loaded.

Memory: a conversation keeps each image only as what the model reads (`ImagePreprocessor.shrink`: at most
224 x 224 for CLIP, the exact pixels preprocessing gives), and only the turns that still fit the prompt; an
upload over MAX_UPLOAD_PIXELS is refused from its header; a closed tab's conversation is freed at once. The
controls are checked on the server too (values sent through the API), and Stop or Clear always leave the chat
ready for the next message, even when an answer never came.

Stable element ids, for automating the page: image-input, prompt-input, send-button, stop-button, chatbot;
also clear-button, system-input, temperature-input, max-new-tokens-input and status (messages such as a bad
upload).
"""

from __future__ import annotations

import argparse
import errno
import html
import math
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")
GENERAL_EXAMPLES = ["Describe this image in detail.", "What is unusual about this image?", "详细描述一下这张图片。"]
# Ctrl+V of an image anywhere in the page (also over plain http, where the gallery's clipboard button cannot read
# the clipboard) hands the pasted files to the image input, as if they had been uploaded.
PASTE_JS = """
() => {
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData ? event.clipboardData.files : [])]
      .filter((f) => f.type.startsWith("image/"));
    const input = document.querySelector("#image-input input[type=file]");
    if (!files.length || !input) return;
    event.preventDefault();
    const transfer = new DataTransfer();
    files.forEach((f) => transfer.items.add(f));
    input.files = transfer.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  });
}
"""
CSS = """
#chatbot .message-content { white-space: pre-wrap; }
#status:empty { display: none; }
"""


MAX_UPLOAD_PIXELS = 50_000_000  # per image: decoding one takes 3-4 bytes a pixel for a moment (its shrunk copy stays)
TEMPERATURE_RANGE = (0.0, 2.0)
MAX_NEW_TOKENS_RANGE = (1, 2048)


def note(text: str) -> str:
    """A status line, shown as written (the status element renders Markdown)."""
    return html.escape(text)


def shown(text: str) -> dict:
    """A chat message's text, shown exactly as written: HTML escaped, no Markdown, and as a text part, which
    gradio does not dedent (it dedents plain strings)."""
    return {"type": "text", "text": html.escape(text)}


def controls_problem(temperature, max_new_tokens) -> str | None:
    """Why the temperature or max new tokens cannot be used (values sent through the API, too: the sliders'
    own range check lets NaN and fractions through), or None."""
    low, high = TEMPERATURE_RANGE
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and low <= temperature <= high):
        return f"temperature {temperature!r}: must be a number from {low:g} to {high:g}"
    low, high = MAX_NEW_TOKENS_RANGE
    if not (isinstance(max_new_tokens, (int, float)) and math.isfinite(max_new_tokens)
            and float(max_new_tokens).is_integer() and low <= max_new_tokens <= high):
        return f"max new tokens {max_new_tokens!r}: must be a whole number from {low} to {high}"
    return None


@dataclass
class Pending:
    """A message waiting for (or getting) its answer, with all the answer step needs: the chat before it, the
    message as shown, the query (image tags in place), its images (shrunk), the system prompt and the checked
    controls. `begin` (the answer step) and `halt` (Stop, Clear) exclude each other: a message is either
    answered, or withdrawn by whoever halted it before its answer began."""

    number: int
    chat: list
    message: dict
    query: str
    images: list
    system: str
    temperature: float
    max_new_tokens: int
    stop: threading.Event = field(default_factory=threading.Event)
    cleared: bool = False  # the conversation was cleared: the answer step changes nothing any more
    begun: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self) -> bool:
        """The answer step starts: False if Stop or Clear came first (the message is withdrawn)."""
        with self.lock:
            self.begun = not self.stop.is_set()
            return self.begun

    def halt(self, clear: bool = False) -> bool:
        """Stop (and with `clear`, drop) its answer; True if the answer had not begun: the caller withdraws it,
        whether the answer step is still waiting in the queue or will never come (an API client that sends a
        message and never asks for its answer)."""
        with self.lock:
            self.cleared = self.cleared or clear
            self.stop.set()
            return not self.begun


def build_app(answerer):
    """The gradio Blocks app around a loaded `inference.LoadedCheckpoint`."""
    import itertools

    import gradio as gr

    from demo.synthetic import QUESTIONS
    from inference import Turn, chat_prompt
    from inference import query_with_images as make_query
    from qwen.chat_format import DEFAULT_MAX_WINDOW_SIZE
    from visual import ImageLoadError, load_image

    config = answerer.config
    numbers = itertools.count(1)  # messages, in the server log
    max_images = DEFAULT_MAX_WINDOW_SIZE // config.vision.num_image_tokens  # images of one message that fit a prompt

    def idle():
        return gr.update(interactive=True)

    def read_images(paths) -> tuple[list, list[str]]:
        """(the images shrunk to what the model reads, what is wrong with the others)."""
        good, problems = [], []
        for path in paths:
            try:
                good.append((path, answerer.processor.shrink(load_image(path, max_pixels=MAX_UPLOAD_PIXELS))))
            except ImageLoadError as e:
                name = Path(path).name
                detail = e.detail.replace(path, name) if e.detail else ""
                problems.append(f"{name}: {e.reason}" + (f" ({detail})" if detail else ""))
        return good, problems

    def submit(gallery, text, chat, turns, pending, system, temperature, max_new_tokens):
        """Checks the message, its images and the controls; on success shows it and hands it to `answer` through
        `pending`. Only the shrunk images are kept: what the model reads, exactly."""
        keep = gr.skip()

        def refuse(problem: str, gallery=keep):
            return keep, keep, gallery, keep, note(problem), keep, keep

        if pending is not None:
            return refuse("Still answering the last message: wait, or press Stop.")
        if chat and not turns:  # the server freed this session (its tab was disconnected): the model forgot it
            return refuse("⚠ The server has ended this session and no longer holds its conversation: press Clear "
                          "to start a new one.")
        if not (text or "").strip():
            return refuse("Type a message first.")
        if problem := controls_problem(temperature, max_new_tokens):
            return refuse(f"⚠ {problem.capitalize()}. Nothing was sent.")
        paths = [item[0] for item in gallery or []]
        if len(paths) > max_images:
            return refuse(f"⚠ {len(paths)} images: at most {max_images} fit in one prompt "
                          f"({config.vision.num_image_tokens} tokens each, {DEFAULT_MAX_WINDOW_SIZE} in all). "
                          "Nothing was sent.")
        good, problems = read_images(paths)
        if problems:
            return refuse("⚠ Cannot use " + "; ".join(problems) + ". It was removed; nothing was sent.",
                          gallery=[p for p, _ in good])
        try:
            query = make_query(text, len(paths))
        except ValueError as e:
            return refuse(f"⚠ {e}. Nothing was sent.")
        message = {"role": "user", "content": [*({"path": p} for p in paths), shown(text)]}
        pending = Pending(next(numbers), chat, message, query, [image for _, image in good], system,
                          float(temperature), int(max_new_tokens))
        busy = gr.update(interactive=False)  # until the answer is complete (the last step of the chain)
        return [*chat, message], pending, None, "", "", busy, busy

    def answer(turns, pending):
        """Streams the answer to the pending message into the chat; then it joins the conversation, which keeps
        only the turns the model still sees. Reads nothing but session state, so nothing sent can fail it
        before it runs; whatever happens, it ends with no message pending."""
        skip = (gr.skip(),) * 4
        if pending is None or not pending.begin():  # nothing sent, or withdrawn by Stop / Clear
            yield skip
            return
        who = f"message {pending.number}"
        chat = [*pending.chat, pending.message]
        started, text = time.perf_counter(), ""
        try:
            history = answerer.fit(pending.query, turns, pending.system)
            prompt = chat_prompt(pending.query, pending.images, history)
            print(f"webui: {who} answering ({len(prompt.images)} image(s), {len(history)} earlier turn(s))",
                  flush=True)
            for text in answerer.stream(prompt, system=pending.system, stop=pending.stop,
                                        temperature=pending.temperature, max_new_tokens=pending.max_new_tokens):
                yield skip if pending.cleared else ([*chat, {"role": "assistant", "content": shown(text)}],
                                                    *skip[1:])
        except Exception as e:  # the request fails, the app keeps serving; the server log gets the traceback
            traceback.print_exc()
            print(f"webui: {who} failed", flush=True)
            yield skip if pending.cleared else (
                pending.chat, turns, None, note(f"⚠ The model failed on this message ({type(e).__name__}: {e})."))
            return
        print(f"webui: {who} done in {time.perf_counter() - started:.1f} s" +
              (" (stopped)" if pending.stop.is_set() else ""), flush=True)
        if pending.cleared:  # Clear has already started a new conversation
            yield skip
            return
        notes = ["Stopped."] if pending.stop.is_set() else []
        if len(history) < len(turns):
            notes.append(f"The {len(turns) - len(history)} oldest turn(s) no longer fit in the prompt and were "
                         "dropped: the model no longer sees them.")
        yield ([*chat, {"role": "assistant", "content": shown(text)}],
               [*history, Turn(pending.query, pending.images, text)], None, note(" ".join(notes)))

    def stop_answer(pending):
        """Stops the answer under way (it ends at the next token); a message whose answer has not begun is
        withdrawn here, so that Stop always leaves the chat ready for the next message."""
        if pending is None or not pending.halt():
            return (gr.skip(),) * 5
        return pending.chat, None, note("Stopped before the answer began; the message was not sent."), idle(), idle()

    def forget(pending):
        """Starts a new conversation, whatever became of the last message: an answer under way is stopped and
        its end dropped (its chain enables the buttons when it ends)."""
        began = pending is not None and not pending.halt(clear=True)
        buttons = gr.skip() if began else idle()
        return [], [], None, "", buttons, buttons

    def clear(pending):  # the Clear button: the conversation, and the images and text not sent yet
        return *forget(pending), None, ""

    def end_session(request):
        """A tab closed or reloaded: its conversation and images are freed now (gradio alone waits an hour)."""
        app.state_holder.delete_state(request.session_hash)

    end_session.__annotations__ = {"request": gr.Request}  # gradio passes the request by this type (not a string)

    with gr.Blocks(title="Chat with the VLM", analytics_enabled=False) as app:
        gr.Markdown(f"### Chat with the VLM\n`{answerer.folder}` on {answerer.device.type}, "
                    f"{config.vision.num_image_tokens} image tokens per image")
        turns = gr.State([])  # list[inference.Turn]: what the model sees again (images shrunk)
        pending = gr.State(None, delete_callback=lambda p: p is not None and p.halt(clear=True))  # a Pending
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chatbot", label="Conversation", height=480, render_markdown=False,
                                     latex_delimiters=[], buttons=[])  # (a copy button would copy escaped text)
                status = gr.Markdown("", elem_id="status")
                prompt = gr.Textbox(elem_id="prompt-input", label="Message", lines=2, max_lines=8, autofocus=True,
                                    placeholder="Ask about the images (<image> marks where each goes); "
                                                "Enter sends, Shift+Enter is a new line")
                with gr.Row():
                    send = gr.Button("Send", elem_id="send-button", variant="primary")
                    stop = gr.Button("Stop", elem_id="stop-button", variant="stop")
                    clear_button = gr.Button("Clear", elem_id="clear-button")
                gr.Examples([[q] for q in GENERAL_EXAMPLES], inputs=[prompt], label="Examples")
                gr.Examples([[q] for q in QUESTIONS.values()], inputs=[prompt],
                            label="The CPU demo model's questions (bash train.sh)")
            with gr.Column(scale=2):
                images = gr.Gallery(elem_id="image-input", label="Images for the next message", type="filepath",
                                    interactive=True, sources=["upload", "clipboard"], columns=3, height=260,
                                    object_fit="contain")
                system = gr.Textbox(config.system_prompt, elem_id="system-input", label="System prompt", lines=2)
                temperature = gr.Slider(*TEMPERATURE_RANGE, value=0.0, step=0.05, elem_id="temperature-input",
                                        label="Temperature (0: greedy)")
                max_new_tokens = gr.Slider(*MAX_NEW_TOKENS_RANGE, value=512, step=1, elem_id="max-new-tokens-input",
                                           label="Max new tokens")

        for trigger in (send.click, prompt.submit):
            # submit decodes uploads (up to MAX_UPLOAD_PIXELS each): two at a time, whatever the number of tabs
            (trigger(submit, [images, prompt, chatbot, turns, pending, system, temperature, max_new_tokens],
                     [chatbot, pending, images, prompt, status, send, clear_button], concurrency_id="uploads",
                     concurrency_limit=2, show_progress="hidden")
             .then(answer, [turns, pending], [chatbot, turns, pending, status], concurrency_id="model",
                   concurrency_limit=1, show_progress_on=[chatbot])
             .then(lambda: (idle(), idle()), None, [send, clear_button], concurrency_limit=None,
                   show_progress="hidden"))
        stop.click(stop_answer, [pending], [chatbot, pending, status, send, clear_button], concurrency_limit=None,
                   show_progress="hidden")
        clear_button.click(clear, [pending], [chatbot, turns, pending, status, send, clear_button, images, prompt],
                           concurrency_limit=None, show_progress="hidden")
        chatbot.clear(forget, [pending], [chatbot, turns, pending, status, send, clear_button],  # its trash button
                      concurrency_limit=None, show_progress="hidden")
        app.unload(end_session)
    return app


class UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


def port_number(text: str) -> int:
    """The type of --port: a whole number from 1 to 65535."""
    port = int(text) if text.strip().isdigit() else 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return port


def check_address(host: str, port: int) -> None:
    """UsageError unless this process can listen on host:port now: checked before the model loads (minutes on a
    GPU), so that a host that is not this machine's or a port in use is found at once. The launch binds again
    (the port may be taken in between)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: not an address or a name this machine knows ({e.strerror})") from e
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} is in use on {host} (another webui.py?): stop what uses it, or pass "
                                 "another --port") from e
            if e.errno == errno.EADDRNOTAVAIL:
                raise UsageError(f"--host {host}: not an address of this machine") from e
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", help="a bundle or merged export (default: the newest under ./outputs)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    parser.add_argument("--port", type=port_number, default=7860)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--share", action="store_true", help="also serve on a temporary public gradio.live link")
    parser.add_argument("--quantization", help="how the LLM's linear weights are held: nf4 (4-bit, needs bitsandbytes) "
                        "or none (default: as the checkpoint was trained)")
    args = parser.parse_args(argv)

    from safetensors import SafetensorError

    from inference import find_checkpoint, load_checkpoint

    checkpoint = None
    try:
        check_address(args.host, args.port)
        checkpoint = find_checkpoint(args.checkpoint)
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda: no CUDA device is available")
        answerer = load_checkpoint(checkpoint, device=args.device, quantization=args.quantization)
    except UsageError as e:
        print(f"webui.py: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        where = f"cannot load the checkpoint {checkpoint}: " if checkpoint is not None else ""
        print(f"webui.py: error: {where}{e}", file=sys.stderr)
        return 2

    if args.host not in LOOPBACK:
        print(f"webui.py: warning: listening on {args.host}: anyone who can reach this machine on port {args.port} "
              f"can use the model (and upload files to it). Private alternative: keep the default host and tunnel, "
              f"ssh -L {args.port}:localhost:{args.port} THIS-MACHINE", file=sys.stderr)
    app = build_app(answerer)
    app.queue(default_concurrency_limit=1)
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS, js=PASTE_JS,
                   max_file_size="64mb", show_error=True)
    except OSError as e:  # e.g. the port is taken
        print(f"webui.py: error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
