"""An LLM that sees: the projector, and `VisionLanguageModel`, which holds a language model (any family of
`llm/`), the frozen vision tower and the projector, and changes one thing, the input embeddings.

Each image arrives as N placeholder ids (`image_token_id`, the LLM's reserved image token) that the data
pipeline put in the prompt. The tower turns the image into N patch features, the projector maps them to the
LLM's width, and one `masked_scatter` puts them at the placeholder positions. Everything after the embeddings is
the LLM's own forward, unchanged. Text-only samples and batches mixing text-only and image samples go through
the same path; any number of images per sample works, in order. In generation the images are encoded and
spliced on the prefill step only: `generate` hands the spliced embeddings to the LLM's own `generate`, which
uses them for the prompt and its own embeddings for every new token.

The language model is used through the interface every transformers causal LM has: `get_input_embeddings()`,
`get_decoder()` (embeddings to hidden states), `get_output_embeddings()` (the LM head), `generate()`. LoRA wraps
the language model alone (model/lora.py), so the adapter a bundle holds is an adapter of the plain LLM.

Names: `patch_features` are the tower's output before the projector ([n_images, N, vision_hidden]; what the
feature cache stores), `image_embeds` the projected ones ([n_images, N, llm_hidden]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import skip_init
from transformers.modeling_outputs import CausalLMOutputWithPast

from common.checkpointing import non_reentrant
from common.loss import normalise_loss, supervised_token_losses


class Projector(nn.Module):
    """The bridge from patch features to the LLM's embedding space: Linear -> GELU -> Linear,
    [..., vision_hidden] -> [..., llm_hidden].

    Its own init (small normal weights, zero biases) so that projected features start at the scale of
    word embeddings (Qwen-7B's are about 0.02 per coordinate) instead of the default kaiming scale; the layers
    are built without their default init, so that building a projector draws the random numbers of this init
    and nothing else. The weights stay fp32 (trainable master weights); bf16 compute comes from autocast.
    """

    def __init__(self, vision_hidden_size: int, llm_hidden_size: int, init_std: float = 0.02):
        super().__init__()
        self.linear_1 = skip_init(nn.Linear, vision_hidden_size, llm_hidden_size)
        self.act = nn.GELU()
        self.linear_2 = skip_init(nn.Linear, llm_hidden_size, llm_hidden_size)
        self.init_std = init_std
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for linear in (self.linear_1, self.linear_2):
            nn.init.normal_(linear.weight, mean=0.0, std=self.init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(patch_features)))


@dataclass
class VLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `row_loss_sums` [B]: each row's summed (not averaged) token losses, given
    with `return_row_loss_sums=True`, so that an evaluation can weigh every supervised token the same."""

    row_loss_sums: torch.Tensor | None = None


class VisionLanguageModel(nn.Module):
    """`language_model` (a causal LM, or a peft model of one) + frozen `vision_tower` + a fresh fp32 projector.

    The Trainer sees a plain module whose forward takes the batch keys (`input_ids`, `attention_mask`, `labels`,
    `pixel_values` or `patch_features`) and returns `.loss`; `config` is the language model's config.
    """

    # forward takes `num_items_in_batch` and normalises the loss by it: the Trainer then weighs every supervised
    # token equally across gradient-accumulation steps and ranks (and does not divide by the steps again).
    accepts_loss_kwargs = True

    def __init__(self, language_model: nn.Module, vision_tower: nn.Module, *, image_token_id: int):
        super().__init__()
        self.language_model = language_model
        self.projector = Projector(vision_tower.hidden_size, language_model.config.hidden_size)
        self.vision_tower = vision_tower  # frozen; never saved with the trainable weights
        self.image_token_id = image_token_id

    # ------------------------------------------------------------------ the parts

    @property
    def config(self):
        """The language model's config (hidden size, vocabulary rows): what the Trainer, generation and DeepSpeed
        read. The multimodal description is the bundle's `model.config.VLMConfig`."""
        return self.language_model.config

    @property
    def _no_split_modules(self) -> list[str]:
        """The LLM's decoder layer class (QWenBlock, Qwen2DecoderLayer, ...): what FSDP wraps one unit at a time
        when its config names no class (configs/fsdp.json), as accelerate reads it from the model."""
        return list(getattr(self.llm, "_no_split_modules", None) or [])

    @property
    def generation_config(self):
        """The language model's generation defaults (generation passes every setting explicitly)."""
        return self.llm.generation_config

    @property
    def llm(self) -> nn.Module:
        """The causal LM itself (inside its peft wrapper when LoRA is applied)."""
        lm = self.language_model
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.language_model, "peft_config")

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def merge_adapter(self) -> None:
        """Fold the LoRA adapter into the language model's weights (a plain causal LM again)."""
        if self.has_adapter:
            self.language_model = self.language_model.merge_and_unload()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """Activation checkpointing of the language model's layers, always non-reentrant, so that it is correct by
        construction: reentrant checkpointing needs an input that requires grad (with frozen embeddings a text-only
        batch would give a loss without a graph) and under DDP marks LoRA weights ready twice."""
        kwargs = non_reentrant(activation_checkpointing_kwargs)  # (ValueError for use_reentrant=True)
        self.llm.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.llm.is_activation_checkpointing

    # ------------------------------------------------------------------ the one change: the embeddings

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> frozen patch features [n_images, N, vision_hidden] (no grad)."""
        return self.vision_tower(pixel_values)

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        patch_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the projected image features at the placeholder positions. [B, T, hidden]

        `patch_features` are precomputed tower outputs [n_images, N, vision_hidden] (the feature cache);
        `pixel_values` are encoded here. Raises ValueError when placeholders and feature rows disagree.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, T, hidden]
        is_image = input_ids == self.image_token_id  # [B, T]
        if pixel_values is None and patch_features is None:
            if bool(is_image.any()):
                raise ValueError(
                    f"the input has {int(is_image.sum())} image placeholder tokens but no images were given"
                )
            return embeds
        if patch_features is None:
            patch_features = self.encode_images(pixel_values)
        n_images, n_per_image = patch_features.shape[:2]
        n_slots = int(is_image.sum())
        if n_slots != n_images * n_per_image:
            raise ValueError(
                f"image placeholder tokens ({n_slots}) != image feature rows ({n_images} images x "
                f"{n_per_image} = {n_images * n_per_image}): each image tag must expand to {n_per_image} placeholders"
            )
        image_embeds = self.projector(patch_features.to(self.projector.linear_1.weight.dtype))  # [n, N, hidden]
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    # ------------------------------------------------------------------ forward and generation

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_features: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_items_in_batch=None,
        label_smoothing: float = 0.0,
        return_row_loss_sums: bool = False,
        **kwargs,
    ):
        """With `labels`: the loss from the supervised positions only (`common.loss`: no [B, T, vocab] logits, no
        KV cache), normalised by `num_items_in_batch` when the Trainer gives it: a `VLMOutput`. Without: the language
        model's own output (logits) on the spliced embeddings; other keyword arguments go to it."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (with image placeholders) or inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, patch_features)
        if labels is None:
            return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        hidden_states = self.llm.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # [B, T, hidden]
        losses, keep = supervised_token_losses(hidden_states, labels, self.llm.get_output_embeddings(),
                                               label_smoothing)
        loss = normalise_loss(losses.sum(), keep, num_items_in_batch)
        row_loss_sums = None
        if return_row_loss_sums:
            row_loss_sums = losses.new_zeros(keep.shape).masked_scatter(keep, losses).sum(-1)  # [B]
        return VLMOutput(loss=loss, row_loss_sums=row_loss_sums)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_features: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """The language model's `generate` on the prompt's spliced embeddings; returns the prompt ids followed by
        the new ones, as `generate` does for ids."""
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, patch_features)
        return self.language_model.generate(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                            attention_mask=attention_mask, **kwargs)
