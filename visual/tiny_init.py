"""The seeded init of the tiny test checkpoints (visual.tiny_clip, visual.tiny_siglip), independent of
transformers' initialisers: the same seed gives byte-identical files whatever transformers does to its init code.

Tensors are drawn in sorted name order from one generator (the order is part of the seed). Linear and
convolution weights are N(0, 1/fan_in), so activations keep unit scale through the layers; LayerNorms start at
weight 1, bias 0; biases are 0. A family's own tensors (embeddings, logit scale, ...) come from its `special` rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# (name, shape, generator) -> the tensor, or None to fall back on the common rules
SpecialRule = Callable[[str, tuple[int, ...], torch.Generator], "torch.Tensor | None"]


def fan_in_normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """N(0, 1/fan_in) for a Linear [out, in] or Conv2d [out, in, kh, kw] weight."""
    fan_in = int(torch.tensor(shape[1:]).prod())
    return torch.randn(shape, generator=generator) * fan_in**-0.5


def seeded_state_dict(skeleton: nn.Module, *, seed: int, special: SpecialRule) -> dict[str, torch.Tensor]:
    """Every tensor of `skeleton.state_dict()` (a model built on the meta device: names, shapes and module types
    only), float32, drawn from a generator seeded with `seed`."""
    layer_norm_weights = {
        f"{name}.weight" for name, module in skeleton.named_modules() if isinstance(module, nn.LayerNorm)
    }
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, meta in sorted(skeleton.state_dict().items()):  # sorted: draw order is part of the seed
        shape = tuple(meta.shape)
        tensor = special(name, shape, generator)
        if tensor is not None:
            pass
        elif name in layer_norm_weights:
            tensor = torch.ones(shape)
        elif name.endswith(".bias"):
            tensor = torch.zeros(shape)
        else:
            assert len(shape) in (2, 4), f"no init rule for {name} {shape}"
            tensor = fan_in_normal(shape, generator)
        assert tensor.dtype == torch.float32, name
        state_dict[name] = tensor.contiguous()
    return state_dict
