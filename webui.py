"""Chat with the trained model about images, in the browser.

    python webui.py                                    # the newest bundle under ./outputs, http://127.0.0.1:7860
    python webui.py --checkpoint outputs/demo --port 8000 --device cpu
    python webui.py --host 0.0.0.0                     # other machines can reach it: so can ANYONE on the network
    python webui.py --share                            # a temporary public gradio.live link (needs internet)

Attach one or more images (upload, drag and drop, or paste), ask, and the answer streams in. The model sees the
whole conversation: earlier turns and their images, in the ChatML layout of training. `<image>` in a message
marks where each of its images goes; without it they go first, one per line. The generation code is infer.py's
(`inference`). The model is loaded once and answers one message at a time: requests from several tabs wait in
a queue. Exit status 2 when the checkpoint is missing or cannot be loaded.

Stable element ids, for automating the page: image-input, prompt-input, send-button, stop-button, chatbot;
also clear-button, system-input, temperature-input, max-new-tokens-input and status (messages such as a bad
upload).
"""

from __future__ import annotations

import argparse
import html
import sys
import time
import traceback
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")
GENERAL_EXAMPLES = ["Describe this image in detail.", "What is unusual about this image?", "详细描述一下这张图片。"]
# Ctrl+V of an image anywhere in the page (also over plain http, where the gallery's clipboard button cannot read
# the clipboard) hands the pasted files to the image input, as if they had been uploaded.
PASTE_JS = """
() => {
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData ? event.clipboardData.files : [])].filter((f) => f.type.startsWith("image/"));
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


def note(text: str) -> str:
    """A status line, shown as written (the status element renders Markdown)."""
    return html.escape(text)


def shown(text: str) -> dict:
    """A chat message's text, shown exactly as written: HTML escaped, no Markdown, and as a text part, which
    gradio does not dedent (it dedents plain strings)."""
    return {"type": "text", "text": html.escape(text)}


def build_app(answerer):
    """The gradio Blocks app around a loaded `inference.LoadedCheckpoint`."""
    import itertools
    import threading

    import gradio as gr

    from demo.synthetic import QUESTIONS
    from inference import Turn, chat_prompt
    from inference import query_with_images as make_query
    from visual import ImageLoadError, load_image

    config = answerer.config
    numbers = itertools.count(1)  # messages, in the server log

    def submit(gallery, text, chat, pending):
        """Checks the message and its images; on success shows it and hands it to `answer` through `pending`."""
        keep = gr.skip()
        if pending is not None:
            return keep, keep, keep, keep, note("Still answering the last message: wait, or press Stop."), keep, keep
        if not (text or "").strip():
            return keep, keep, keep, keep, note("Type a message first."), keep, keep
        paths = [item[0] for item in gallery or []]
        good, problems = [], []
        for path in paths:
            try:
                good.append((path, load_image(path)))
            except ImageLoadError as e:
                name = Path(path).name
                detail = e.detail.replace(path, name) if e.detail else ""
                problems.append(f"{name}: {e.reason}" + (f" ({detail})" if detail else ""))
        if problems:
            return (keep, keep, [p for p, _ in good], keep,
                    note("⚠ Cannot use " + "; ".join(problems) + ". It was removed; nothing was sent."), keep, keep)
        try:
            query = make_query(text, len(paths))
        except ValueError as e:
            return keep, keep, keep, keep, note(f"⚠ {e}. Nothing was sent."), keep, keep
        message = {"role": "user", "content": [*({"path": p} for p in paths), shown(text)]}
        pending = {"query": query, "images": [image for _, image in good], "stop": threading.Event(),
                   "cleared": False, "number": next(numbers)}
        busy = gr.update(interactive=False)  # until the answer is complete (the last step of the chain)
        return [*chat, message], pending, None, "", "", busy, busy

    def answer(chat, turns, pending, system, temperature, max_new_tokens):
        """Streams the answer to the pending message into the chat; then it joins the conversation."""
        if pending is None:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        who = f"message {pending['number']}"
        stop = pending["stop"]
        if pending["cleared"]:  # the conversation was cleared while this message waited in the queue
            yield [], [], None, ""
            return
        if stop.is_set():  # stopped while waiting in the queue
            yield chat[:-1], turns, None, note("Stopped before the answer began; the message was not sent.")
            return
        started, text = time.perf_counter(), ""
        try:
            history = answerer.fit(pending["query"], turns, system)
            prompt = chat_prompt(pending["query"], pending["images"], history)
            print(f"webui: {who} answering ({len(prompt.images)} image(s), {len(history)} earlier turn(s))",
                  flush=True)
            for text in answerer.stream(prompt, system=system, stop=stop, temperature=float(temperature),
                                        max_new_tokens=int(max_new_tokens)):
                if not pending["cleared"]:
                    yield [*chat, {"role": "assistant", "content": shown(text)}], gr.skip(), gr.skip(), gr.skip()
        except Exception as e:  # the request fails, the app keeps serving; the server log gets the traceback
            traceback.print_exc()
            print(f"webui: {who} failed", flush=True)
            yield chat[:-1], turns, None, note(f"⚠ The model failed on this message ({type(e).__name__}: {e}).")
            return
        print(f"webui: {who} done in {time.perf_counter() - started:.1f} s" + (" (stopped)" if stop.is_set() else ""),
              flush=True)
        if pending["cleared"]:
            yield [], [], None, ""
            return
        notes = []
        if stop.is_set():
            notes.append("Stopped.")
        if len(history) < len(turns):
            notes.append(f"The {len(turns) - len(history)} oldest turn(s) no longer fit in the prompt and were left out.")
        yield ([*chat, {"role": "assistant", "content": shown(text)}],
               [*turns, Turn(pending["query"], pending["images"], text)], None, note(" ".join(notes)))

    def stop_answer(pending):
        if pending is not None:
            pending["stop"].set()

    def forget(pending):
        """Starts a new conversation: an answer under way is stopped and dropped."""
        if pending is not None:
            pending["cleared"] = True
            pending["stop"].set()
        return [], [], ""

    def clear(pending):  # the Clear button: the conversation, and the images and text not sent yet
        return *forget(pending), None, ""

    with gr.Blocks(title="Chat with the VLM", analytics_enabled=False) as app:
        gr.Markdown(f"### Chat with the VLM\n`{answerer.folder}` on {answerer.device.type}, "
                    f"{config.vision.num_image_tokens} image tokens per image")
        turns = gr.State([])  # list[inference.Turn]: what the model sees again
        pending = gr.State(None)  # the message waiting for (or getting) its answer
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
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, elem_id="temperature-input",
                                        label="Temperature (0: greedy)")
                max_new_tokens = gr.Slider(1, 2048, value=512, step=1, elem_id="max-new-tokens-input",
                                           label="Max new tokens")

        for trigger in (send.click, prompt.submit):
            (trigger(submit, [images, prompt, chatbot, pending], [chatbot, pending, images, prompt, status, send,
                                                                  clear_button],
                     concurrency_limit=None, show_progress="hidden")
             .then(answer, [chatbot, turns, pending, system, temperature, max_new_tokens],
                   [chatbot, turns, pending, status], concurrency_id="model", concurrency_limit=1,
                   show_progress_on=[chatbot])
             .then(lambda: (gr.update(interactive=True),) * 2, None, [send, clear_button], concurrency_limit=None,
                   show_progress="hidden"))
        stop.click(stop_answer, [pending], None, concurrency_limit=None, show_progress="hidden")
        clear_button.click(clear, [pending], [chatbot, turns, status, images, prompt], concurrency_limit=None,
                           show_progress="hidden")
        chatbot.clear(forget, [pending], [chatbot, turns, status], concurrency_limit=None,  # its own trash button
                      show_progress="hidden")
    return app


class UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", help="a bundle or merged export (default: the newest under ./outputs)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--share", action="store_true", help="also serve on a temporary public gradio.live link")
    args = parser.parse_args(argv)

    from safetensors import SafetensorError

    from inference import find_checkpoint, load_checkpoint

    checkpoint = None
    try:
        checkpoint = find_checkpoint(args.checkpoint)
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda: no CUDA device is available")
        answerer = load_checkpoint(checkpoint, device=args.device)
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
