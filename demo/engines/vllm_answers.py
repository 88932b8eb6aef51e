"""One side of `python -m demo.check_export --engine vllm`: vLLM alone answers the requests on an exported folder.

    VLLM_PYTHON demo/engines/vllm_answers.py EXPORT REQUESTS.jsonl ANSWERS.jsonl MAX_NEW_TOKENS TOP_K OURS_JSON

Runs in vLLM's own environment (`bash bench/vllm_env.sh`), never the project's, and imports nothing of this
repository (checked at the end against OURS_JSON, the repository's top-level module names). Each request
(`{"id", "images", "prompt"}`) is one user message, its images in front of its text, sent through
`LLM.chat` with the folder's chat template and the sampling defaults vLLM reads from generation_config.json,
greedy (temperature 0), in the dtype of the folder's config.json, with the PIL implementation of the image
processor (`mm_processor_kwargs={"backend": "pil"}`: the pixels of training; vLLM's default, the torchvision one
when torchvision is installed, differs by up to about 0.03 per value). Writes one
`{"id", "answer", "first_token_logprobs"}` line per request: the answer
text stripped of surrounding white space (as infer.py does), and the log-probabilities of the first generated
token's TOP_K best candidates (id -> log-prob, of the raw model output: vLLM's default logprobs mode).
"""

import json
import os
import sys
from pathlib import Path


def messages_of(row: dict) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": Path(path).resolve().as_uri()}} for path in row["images"]]
    return [{"role": "user", "content": [*content, {"type": "text", "text": row["prompt"]}]}]


def longest_prompt(folder: str, rows: list[dict]) -> int:
    """The token count of the longest request, image placeholders included (the folder's own processor)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    longest = 0
    for row in rows:
        content = [{"type": "image"} for _ in row["images"]] + [{"type": "text", "text": row["prompt"]}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        images = [Image.open(path).convert("RGB") for path in row["images"]] or None
        longest = max(longest, len(processor(text=text, images=images)["input_ids"][0]))
    return longest


def main(argv: list[str]) -> None:
    folder, requests, answers, max_new_tokens, top_k, ours = argv
    max_new_tokens, top_k = int(max_new_tokens), int(top_k)
    rows = [json.loads(line) for line in Path(requests).read_text(encoding="utf-8").splitlines()]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (the default takes far more)

    from vllm import LLM

    images = [Path(path).resolve().parent for row in rows for path in row["images"]]
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype") or "auto"  # "auto" would run a float32 export in bf16
    llm = LLM(model=folder, dtype=dtype, seed=0, enforce_eager=True, mm_processor_kwargs={"backend": "pil"},
              max_model_len=longest_prompt(folder, rows) + max_new_tokens,
              limit_mm_per_prompt={"image": max(len(row["images"]) for row in rows)},
              allowed_local_media_path=os.path.commonpath(images) if images else "")
    params = llm.get_default_sampling_params()  # what generation_config.json says (as the server does)
    params.temperature = 0.0
    params.max_tokens = max_new_tokens
    params.logprobs = top_k
    outputs = llm.chat([messages_of(row) for row in rows], params, use_tqdm=False)
    with open(answers, "w", encoding="utf-8") as out:
        for row, output in zip(rows, outputs, strict=True):
            completion = output.outputs[0]
            first = completion.logprobs[0] if completion.logprobs else {}
            out.write(json.dumps({"id": row["id"], "answer": completion.text.strip(),
                                  "first_token_logprobs": {str(i): lp.logprob for i, lp in first.items()}},
                                 ensure_ascii=False) + "\n")
    imported = sorted(name for name in sys.modules if name.split(".")[0] in set(json.loads(ours)))
    assert not imported, f"the vLLM side imported this repository's modules: {imported}"


if __name__ == "__main__":  # vLLM starts worker processes: nothing may run on import
    main(sys.argv[1:])
