"""Build what the CPU demo needs, in the real formats: `python -m demo.prepare --config config.yaml`.

Into the config's `demo.workdir` it writes
  tiny-clip/   a tiny CLIP checkpoint in the openai/clip-vit-large-patch14 layout, given a short contrastive
               image-caption training on pictures drawn for it alone (the real tower was trained that way,
               which is why its patch features tell a circle from a triangle), then frozen in training like
               the real one; its random position embeddings are scaled up so that "where" survives;
  tiny-qwen/   a tiny QWen checkpoint in the Qwen-7B-Chat layout, with a small real BPE vocabulary, given a
               short text pretraining first: ChatML conversations that answer questions about a shape
               *described in words*. This is the miniature of the real recipe's pretrained chat LLM: it knows
               the chat format and the answer words; the VLM training then teaches it to read them from the
               image instead of from the description;
  raw/         the synthetic images and annotations in the LLaVA and AI Challenger formats, and a held-out set.
The tiny QWen and raw/ are built in a second process while this one pretrains the tower (one core each on two).
A `prepared.json` stamp records the settings; running again with the same settings does nothing.

With other settings (or --force) the folder is deleted and rebuilt, but only a folder this command created:
it writes a marker file into the folder when it creates it (folders of earlier versions are recognised by
their `prepared.json`). A workdir that holds other files, or that is or contains the checkout or the config
file being read (`workdir: .`, say), is refused with one message and exit status 2; nothing is deleted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import shutil
import sys
import time
import traceback
from pathlib import Path

from common.fileio import write_json
from common.paths import created_by, is_within, mark_created
from demo.synthetic import write_demo_raw_data
from qwen import QWenTokenizer
from qwen.tiny_vocab import write_tiny_vocab
from settings import ConfigError, DemoConfig, load_config

STAMP = "prepared.json"
REPORT = "prepare_report.json"  # seconds per part, final losses, the text pretraining's answers (bench/demo_seeds.py)
CREATED_BY = "demo.prepare"
CHECKOUT = Path(__file__).resolve().parents[1]


class WorkdirError(ValueError):
    """A demo.workdir that must not be deleted; the message says why."""


class PrepareError(RuntimeError):
    """The second process (the tiny QWen and the data) failed; the message names the exception."""


def _read_stamp(work: Path):
    try:
        return json.loads((work / STAMP).read_text())
    except (OSError, ValueError):
        return None


def check_workdir(work: Path, inputs: tuple[Path, ...] = ()) -> None:
    """Raise WorkdirError unless `work` may be deleted and rebuilt: missing, empty, or created by this command,
    and neither the checkout nor a folder holding it or one of `inputs` (the config file)."""
    for label, path in (("the checkout", CHECKOUT), *(("the config file", p) for p in inputs)):
        if is_within(path, work):
            raise WorkdirError(f"demo.workdir {work} is or contains {label} ({path}); it would be deleted: name a "
                               "folder of its own, such as .demo")
    if not work.exists():
        return
    if not work.is_dir():
        raise WorkdirError(f"demo.workdir {work} is a file; name a folder")
    ours = created_by(work) == CREATED_BY or isinstance(_read_stamp(work), dict)
    if not ours and any(work.iterdir()):
        raise WorkdirError(f"demo.workdir {work} holds files that demo.prepare did not write (no marker); it is left "
                           "alone: remove it yourself or name another folder")


def prepare(demo: DemoConfig, *, force: bool = False, inputs: tuple[Path, ...] = ()) -> Path:
    """Build the demo's models and data into `demo.workdir` (see the module docstring); `inputs`: files being
    read (the config), which the workdir must not contain. Raises WorkdirError before deleting anything."""
    work = Path(demo.workdir)
    settings = dataclasses.asdict(demo)
    if not force and _read_stamp(work) == settings:
        print(f"demo: {work} is already prepared with these settings")
        return work
    check_workdir(work, inputs)
    if work.exists() and any(work.iterdir()):
        print(f"demo: replacing {work} (written by an earlier demo.prepare)")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    mark_created(work, CREATED_BY)
    # torch loads only now: --help, a refused workdir and a workdir already prepared with these settings answer
    # without those seconds of imports
    import torch

    # The tiny QWen and the data are built in a second process while this one pretrains the tower: the text
    # pretraining gains little from a second thread (its matrices are small: 1.2x) and the tower's more
    # (1.5-1.7x), so one core each is sooner than both cores for one, then for the other. The thread counts
    # are fixed by the machine's cores, never by timing, so a seed gives the same models on every run. It starts
    # before this process imports transformers' models, so that both processes' imports run at once.
    cores = torch.get_num_threads()
    tower_threads, text_threads = thread_shares(cores)
    started = time.time()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked OpenMP or torch state
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(target=_qwen_and_data_job, args=(demo, str(work), text_threads, sender),
                             name="demo.prepare: tiny QWen and data", daemon=True)
    worker.start()
    sender.close()  # the worker holds the only sending end: its exit without an answer reads as EOF below
    try:
        from demo.pretrain import pretrain_clip
        from visual.tiny_clip import write_tiny_clip_checkpoint

        torch.set_num_threads(tower_threads)
        torch.manual_seed(demo.seed)
        write_tiny_clip_checkpoint(work / "tiny-clip", image_size=demo.image_size, seed=demo.seed, **dict(demo.clip))
        report = {"seconds": {}}
        if demo.clip_pretrain_steps:
            print(f"demo: contrastive pretraining of the tiny CLIP ({demo.clip_pretrain_steps} steps)", flush=True)
            losses = pretrain_clip(work / "tiny-clip", demo)
            report["clip_final_loss"] = round(sum(losses[-20:]) / len(losses[-20:]), 4)
        print(f"demo: tiny CLIP written to {work / 'tiny-clip'}", flush=True)
        report["seconds"]["clip"] = round(time.time() - started, 1)
        try:
            status, answer = receiver.recv()
        except EOFError:
            worker.join()
            raise PrepareError(f"the process building the tiny QWen and the data died (exit code "
                               f"{worker.exitcode}) without an answer") from None
        if status != "ok":
            raise PrepareError(f"building the tiny QWen and the data failed: {answer}")
    finally:
        torch.set_num_threads(cores)  # as it was, also when the tower's pretraining fails (prepare() as a library)
        if worker.is_alive():
            worker.terminate()
        worker.join()
        receiver.close()
    report["seconds"].update(answer.pop("seconds"))
    report.update(answer)

    write_json(work / REPORT, report)

    write_json(work / STAMP, settings)
    print(f"demo: prepared in {time.time() - started:.0f} s")
    return work


def thread_shares(cores: int) -> tuple[int, int]:
    """(the tower's threads, the second process's) on `cores` threads: half each, at least one."""
    text = max(1, cores // 2)
    return max(1, cores - text), text


def build_qwen_and_data(demo: DemoConfig, work: Path) -> dict:
    """The tiny QWen (vocabulary, text pretraining, checkpoint) and the synthetic data, into `work`; returns
    their part of the report (seconds, final text loss, the text pretraining's answers)."""
    from demo.pretrain import pretrain_text, vocab_corpus
    from qwen.tiny import random_qwen_state_dict, tiny_qwen_config, write_tiny_qwen_checkpoint

    report = {"seconds": {}}
    mark = time.time()
    paths = write_demo_raw_data(
        work / "raw", n_train=demo.n_train_images, n_aic=demo.n_caption_images, n_heldout=demo.n_heldout_images,
        image_size=demo.image_size, seed=demo.seed,
    )
    print(f"demo: synthetic images and annotations written to {paths['root']}", flush=True)
    report["seconds"]["images"] = round(time.time() - mark, 1)
    mark = time.time()

    vocab = write_tiny_vocab(work / "qwen.tiktoken", vocab_size=demo.vocab_size, corpus=vocab_corpus())
    tokenizer = QWenTokenizer(vocab)
    config_fields = tiny_qwen_config(**demo.qwen)
    print(f"demo: text pretraining of the tiny QWen ({demo.pretrain_steps} steps)", flush=True)
    state_dict, losses, accuracy = pretrain_text(
        random_qwen_state_dict(config_fields, seed=demo.seed), config_fields, tokenizer, demo
    )
    write_tiny_qwen_checkpoint(work / "tiny-qwen", state_dict=state_dict, vocab_file=vocab, **demo.qwen)
    (work / "qwen.tiktoken").unlink()
    print(f"demo: tiny QWen written to {work / 'tiny-qwen'}", flush=True)
    report["seconds"]["qwen"] = round(time.time() - mark, 1)
    report["text_final_loss"] = round(sum(losses[-20:]) / len(losses[-20:]), 4)
    report["text_accuracy"] = accuracy
    return report


def _qwen_and_data_job(demo: DemoConfig, work: str, threads: int, sender) -> None:
    """prepare()'s second process: build_qwen_and_data on `threads` threads, its report (or, after printing the
    traceback, the exception's one line) sent back through `sender`."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(demo.seed)
    try:
        sender.send(("ok", build_qwen_and_data(demo, Path(work))))
    except BaseException as e:
        traceback.print_exc()  # the whole story on stderr; the parent's one-line error names the exception
        sender.send(("error", "".join(traceback.format_exception_only(type(e), e)).strip()))
    finally:
        sender.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    args = parser.parse_args(argv)
    try:
        demo = load_config(args.config).require("demo")
        prepare(demo, force=args.force, inputs=(Path(args.config),))
    except (ConfigError, WorkdirError) as e:
        print(f"demo.prepare: error: {e}", file=sys.stderr)
        return 2
    except PrepareError as e:
        print(f"demo.prepare: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
