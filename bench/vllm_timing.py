"""vLLM's side of `python -m bench.vllm_generate`: times vLLM's `generate` on one prompt, in vLLM's environment.

    PYTHONSAFEPATH=1 VLLM_PYTHON bench/vllm_timing.py SETTINGS.json

Runs in vLLM's own environment (`bash bench/vllm_env.sh`, or wherever vllm imports) and imports nothing of this
repository (with PYTHONSAFEPATH set, bench/ is not put on sys.path). SETTINGS.json holds what
bench/vllm_generate.py prepared:
`{"model", "image", "prompt", "dtype", "max_model_len", "batch_sizes", "new_tokens", "repeats",
"gpu_memory_utilization", "output"}`. For each batch size, `repeats + 1` rounds (the first warms up) of one `generate`
with 1 new token (the prefill) and one with `new_tokens` greedy tokens and no early stop; the medians give
prefill_ms, decode_tokens_per_s = batch * (new_tokens - 1) / (full - prefill) and ms_per_decode_step. Writes one
JSON object to `output` (vLLM logs to stdout): the figures, the library versions and the device.
"""

import json
import os
import platform
import sys
import time


def device_name(torch) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return f"CPU {model or platform.processor()} x{os.cpu_count()} cores"


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main(settings_file: str) -> None:
    with open(settings_file, encoding="utf-8") as f:
        settings = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (the default takes far more)

    import torch
    import transformers
    import vllm
    from PIL import Image

    on_gpu = torch.cuda.is_available()
    options = {"gpu_memory_utilization": settings["gpu_memory_utilization"]} if on_gpu else {}
    llm = vllm.LLM(model=settings["model"], load_format="dummy", dtype=settings["dtype"], seed=0,
                   enable_prefix_caching=False, max_model_len=settings["max_model_len"],
                   limit_mm_per_prompt={"image": 1}, **options)
    image = Image.open(settings["image"]).convert("RGB")
    new_tokens = settings["new_tokens"]
    prefill_params = vllm.SamplingParams(temperature=0.0, max_tokens=1)
    full_params = vllm.SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    results = {}
    for batch_size in settings["batch_sizes"]:
        requests = [{"prompt": settings["prompt"], "multi_modal_data": {"image": image}} for _ in range(batch_size)]
        prefill, total = [], []
        for _ in range(settings["repeats"] + 1):  # the first round warms up
            t0 = time.perf_counter()
            llm.generate(requests, prefill_params, use_tqdm=False)
            t1 = time.perf_counter()
            outputs = llm.generate(requests, full_params, use_tqdm=False)
            t2 = time.perf_counter()
            prefill.append(t1 - t0)
            total.append(t2 - t1)
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs), "generation stopped early"
        p, g = median(prefill[1:]), median(total[1:])
        decode_seconds = max(g - p, 1e-9)
        results[f"batch_{batch_size}"] = {
            "prefill_ms": round(p * 1000, 2),
            "decode_tokens_per_s": round(batch_size * (new_tokens - 1) / decode_seconds, 1),
            "ms_per_decode_step": round(decode_seconds / (new_tokens - 1) * 1000, 3),
        }
    record = {
        "device": device_name(torch),
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        **results,
    }
    with open(settings["output"], "w", encoding="utf-8") as f:
        json.dump(record, f)


if __name__ == "__main__":  # vLLM starts worker processes: nothing may run on import
    main(sys.argv[1])
