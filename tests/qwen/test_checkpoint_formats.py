"""QWen weights load from safetensors only: a pickle-only folder (pytorch_model.bin) is refused with the command
that converts it, and that command gives a folder that loads to the same weights."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen import QWenLMHeadModel
from qwen.tiny import write_tiny_qwen_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("shards", [1, 2])
def test_pickled_weights_are_refused_with_a_conversion_that_works(tmp_path, byte_vocab_file, shards):
    folder = write_tiny_qwen_checkpoint(tmp_path / "qwen", hidden_size=32, intermediate_size=64,
                                        vocab_file=byte_vocab_file, num_shards=shards)
    files = sorted(folder.glob("model*.safetensors"))
    state = {k: v for f in files for k, v in load_file(f).items()}
    weight_map = {}
    for i, f in enumerate(files):  # the same weights as pickles, in transformers' old names
        name = "pytorch_model.bin" if shards == 1 else f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = load_file(f)
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
        f.unlink()
    if shards > 1:
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)

    with pytest.raises(ValueError, match="has only pickled weights .* never unpickles") as error:
        QWenLMHeadModel.from_pretrained(folder)
    command = re.search(r"Convert them once to safetensors: (python -c .*)$", str(error.value)).group(1)
    subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, check=True, timeout=120)
    model = QWenLMHeadModel.from_pretrained(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
