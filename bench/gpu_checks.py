"""Numerical checks that need a GPU: `python -m bench.gpu_checks` (prints one JSON line).

- fp32 on the GPU (TF32 off) against fp32 on the CPU: the same logits;
- bf16 on the GPU against fp32: the relative error stays at bf16's level (norms and rotary are fp32);
- SDPA's flash kernel accepts our attention (bf16, causal, no mask) and agrees with the default dispatch;
- cached decoding equals the full forward on the GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.harness import device_name, emit, versions
from qwen import QWenConfig, QWenLMHeadModel


def main(argv: list[str] | None = None) -> dict:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False).parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.gpu_checks: error: these checks need a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    config = QWenConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, kv_channels=64,
                        intermediate_size=2752, seq_length=256)
    cpu = QWenLMHeadModel(config).eval()
    ids = torch.randint(0, 4096, (2, 300))  # past seq_length: dynamic NTK and logn are exercised
    with torch.no_grad():
        reference = cpu(ids).logits
        gpu32 = QWenLMHeadModel(config).eval()
        gpu32.load_state_dict(cpu.state_dict())
        gpu32.cuda()
        out32 = gpu32(ids.cuda()).logits.float().cpu()
        gpu16 = gpu32.to(torch.bfloat16)
        out16 = gpu16(ids.cuda()).logits.float().cpu()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            flash = gpu16(ids.cuda()).logits.float().cpu()
        full = gpu16(ids[:, :200].cuda()).logits.float().cpu()
        prefill = gpu16(ids[:, :150].cuda(), use_cache=True)
        steps = [prefill.logits.float().cpu()]
        for t in range(150, 200, 10):
            steps.append(gpu16(ids[:, t:t + 10].cuda(), cache=prefill.cache, use_cache=True).logits.float().cpu())
        cached = torch.cat(steps, dim=1)

    scale = reference.abs().max().item()
    record = {
        "bench": "gpu_checks",
        "device": device_name(torch.device("cuda")),
        "versions": versions(),
        "fp32_gpu_vs_cpu_max_abs": (out32 - reference).abs().max().item(),
        "bf16_vs_fp32_max_abs_over_max": (out16 - reference).abs().max().item() / scale,
        "flash_vs_default_bf16_max_abs": (flash - out16).abs().max().item(),
        "cached_vs_full_bf16_max_abs_over_max": (cached - full).abs().max().item() / scale,
        "argmax_agreement_bf16": (out16.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }
    record["ok"] = (record["fp32_gpu_vs_cpu_max_abs"] < 1e-4 and record["bf16_vs_fp32_max_abs_over_max"] < 0.05
                    and record["flash_vs_default_bf16_max_abs"] < 0.05 * scale)
    emit(record)
    return record


if __name__ == "__main__":
    main()
