"""The bridge from CLIP patch features to the LLM's embedding space: Linear -> GELU -> Linear."""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """Maps [..., vision_hidden] patch features to [..., llm_hidden] token embeddings.

    Its own init (small normal weights, zero biases) so that projected features start at the scale of
    word embeddings (Qwen-7B's are about 0.02 per coordinate) instead of the default kaiming scale.
    The weights stay fp32 (trainable master weights); bf16 compute comes from autocast.
    """

    def __init__(self, vision_hidden_size: int, llm_hidden_size: int, init_std: float = 0.02):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden_size, llm_hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_hidden_size, llm_hidden_size)
        self.init_std = init_std
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for linear in (self.linear_1, self.linear_2):
            nn.init.normal_(linear.weight, mean=0.0, std=self.init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))
