"""One side of `python -m demo.check_export` (`--engine transformers`): stock transformers alone answers the
requests on an exported folder.

    python demo/engines/transformers_answers.py EXPORT REQUESTS.jsonl ANSWERS.jsonl MAX_NEW_TOKENS TOP_K OURS_JSON

Imports transformers, torch and PIL only, nothing of this repository (checked at the end against OURS_JSON, the
repository's top-level module names). The folder loads in fp32 with `AutoModelForImageTextToText` and
`AutoProcessor` (PIL image processing: the pixels of training); each request (`{"id", "images", "prompt"}`) is
one user message, its images in front of its text, rendered by the folder's chat template and answered by
`generate()` with generation_config.json's settings. Writes one `{"id", "answer", "first_token_logprobs"}` line
per request: the answer without special tokens, stripped, and the log-probabilities of the first generated
token's TOP_K best candidates (id -> log-prob, of the raw logits, before generation_config's suppress_tokens).
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor


def main(argv: list[str]) -> None:
    folder, requests, answers, max_new_tokens, top_k, ours = argv
    max_new_tokens, top_k = int(max_new_tokens), int(top_k)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    rows = [json.loads(line) for line in Path(requests).read_text(encoding="utf-8").splitlines()]
    with open(answers, "w", encoding="utf-8") as out:
        for row in rows:
            content = [{"type": "image", "path": p} for p in row["images"]] + [{"type": "text", "text": row["prompt"]}]
            inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True, return_tensors="pt")
            with torch.no_grad():
                result = model.generate(**inputs, max_new_tokens=max_new_tokens, output_logits=True,
                                        return_dict_in_generate=True)
            answer = result.sequences[0, inputs["input_ids"].shape[1]:]
            best = torch.log_softmax(result.logits[0][0].float(), dim=-1).topk(top_k)
            out.write(json.dumps({"id": row["id"], "answer": processor.decode(answer, skip_special_tokens=True).strip(),
                                  "first_token_logprobs": dict(zip(map(str, best.indices.tolist()),
                                                                   best.values.tolist(), strict=True))},
                                 ensure_ascii=False) + "\n")
    imported = sorted(name for name in sys.modules if name.split(".")[0] in set(json.loads(ours)))
    assert not imported, f"the stock-transformers side imported this repository's modules: {imported}"


if __name__ == "__main__":
    main(sys.argv[1:])
