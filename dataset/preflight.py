"""Check a processed dataset before training: `python -m dataset.preflight --config config.yaml`.

Validates the whole config first, as train.py does (every section, the training keys against
TrainArguments). Then shows one sample as the model will see it (supervised tokens inside ⟦…⟧, each image as
<image×N>), then encodes the first --check samples exactly as training will (no image is decoded,
no model weight is loaded, no GPU needed) and prints how many are usable, truncated to max_length or
too long. Any label or image-tag inconsistency stops it with one message and exit status 1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Sequence

from dataprocess.schema import read_samples
from dataset.conversation import IGNORE_INDEX, EncodedConversation, SampleTooLongError, encode_conversation
from llm import ChatTokenizer, load_tokenizer
from settings import ConfigError

SUPERVISED_OPEN, SUPERVISED_CLOSE = "⟦", "⟧"


def render(tokenizer: ChatTokenizer, input_ids: Sequence[int], labels: Sequence[int], num_image_tokens: int) -> str:
    """The decoded sequence with supervised tokens inside ⟦…⟧ and each image's run shown as <image×N>."""
    image = tokenizer.image_token_id

    def kind(pair: tuple[int, int]) -> str:
        tok, lab = pair
        return "image" if tok == image else ("supervised" if lab != IGNORE_INDEX else "text")

    parts = []
    for k, group in itertools.groupby(zip(input_ids, labels), key=kind):
        ids = [tok for tok, _ in group]
        if k == "image":
            whole, rest = divmod(len(ids), num_image_tokens)
            parts.append(f"<image×{num_image_tokens}>" * whole + (f"<image×{rest}>" if rest else ""))
        elif k == "supervised":
            parts.append(SUPERVISED_OPEN + tokenizer.decode(ids) + SUPERVISED_CLOSE)
        else:
            parts.append(tokenizer.decode(ids))
    return "".join(parts)


def _encode(tokenizer, sample, *, system, num_image_tokens, max_length, where) -> EncodedConversation | None:
    try:
        return encode_conversation(
            tokenizer, sample["turns"], system=system, num_image_tokens=num_image_tokens,
            max_length=max_length, sample_id=where,
        )
    except SampleTooLongError:
        return None


def _show(tokenizer, row, sample, encoded, num_image_tokens, max_length) -> None:
    print(f"\n--- sample {row}: {sample['id']} ({len(sample['images'])} images) ---")
    if encoded is None:
        print(f"(too long: its first turn pair does not fit max_length={max_length})")
        return
    print(render(tokenizer, encoded.input_ids, encoded.labels, num_image_tokens))
    n_supervised = sum(lab != IGNORE_INDEX for lab in encoded.labels)
    print(f"--- {len(encoded.input_ids)} tokens, {n_supervised} supervised, "
          f"{encoded.dropped_turns} turns dropped to fit ---")


def preflight(config: str, split: str = "train", index: int = 0, check: int | None = None) -> None:
    """Print the report; raise ValueError / FileNotFoundError / ConfigError on the first problem."""
    # The whole config as train.py reads it: every section typed, the training section's keys and values checked
    # against TrainArguments (this imports transformers: seconds).
    from settings.training import parse_train_args
    from visual import num_image_tokens, vision_config  # the towers' configs: transformers too

    loaded = parse_train_args(["--config", str(config)]).config
    model_config, data_config = loaded.require("model"), loaded.require("data")
    path = data_config.output if split == "train" else data_config.resolved_val_output()
    tokenizer = load_tokenizer(model_config.llm_path)
    n_image_tokens = num_image_tokens(vision_config(model_config.vision_path))
    system, max_length = model_config.system_prompt, data_config.max_length
    print(f"file:        {path} ({split})")
    print(f"tokenizer:   {model_config.llm_path} ({tokenizer.vocab_size} tokens, image token "
          f"{tokenizer.image_token} = {tokenizer.image_token_id})")
    print(f"images:      {n_image_tokens} placeholder tokens each (from {model_config.vision_path})")
    print(f"max_length:  {max_length}; system prompt: {system!r}")

    samples = truncated = unusable = images = missing_images = tokens = supervised = longest = 0
    rows = 0
    shown = False
    for row, (lineno, _, sample) in enumerate(read_samples(path)):
        rows = row + 1
        in_check = check is None or row < check
        if not in_check and row != index:
            if shown:
                break
            continue  # read on only to reach --index
        where = f"{path}, line {lineno}" + (f" ({sample['id']})" if isinstance(sample.get("id"), str) else "")
        encoded = _encode(tokenizer, sample, system=system, num_image_tokens=n_image_tokens,
                          max_length=max_length, where=where)
        if row == index:
            shown = True
            _show(tokenizer, row, sample, encoded, n_image_tokens, max_length)
        if not in_check:
            continue
        samples += 1
        if encoded is None:
            unusable += 1
            continue
        truncated += encoded.dropped_turns > 0
        images += encoded.num_images
        missing_images += sum(not os.path.isfile(p) for p in sample["images"][: encoded.num_images])
        tokens += len(encoded.input_ids)
        supervised += sum(lab != IGNORE_INDEX for lab in encoded.labels)
        longest = max(longest, len(encoded.input_ids))
    if not shown:
        raise ValueError(f"--index {index}: {path} has only {rows} samples")

    print(f"\nchecked {samples} samples: {samples - unusable} usable, {truncated} truncated (trailing turns "
          f"dropped), {unusable} unusable (first turn pair over max_length={max_length})")
    print(f"tokens: {tokens} ({supervised} supervised), longest sample {longest}; images: {images}, "
          f"{missing_images} missing on disk (skipped at training time)")
    if samples == unusable:
        raise ValueError(f"{path}: no usable sample among the {samples} checked")
    print("OK: labels and image tags are consistent")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataset.preflight", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--config", required=True, help="config.yaml (model and data sections)")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--index", type=int, default=0, help="row of the sample to show (default 0)")
    parser.add_argument("--check", type=int, default=None, help="check only the first N samples (default all)")
    args = parser.parse_args(argv)
    if args.check is not None and args.check < 1:
        parser.error("--check must be at least 1")
    if args.index < 0:
        parser.error("--index must be at least 0")
    try:
        preflight(args.config, split=args.split, index=args.index, check=args.check)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"preflight FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
