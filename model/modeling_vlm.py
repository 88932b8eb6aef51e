"""QWen that sees: a projector, and `QWenVLForCausalLM`, which subclasses `QWenLMHeadModel` and changes one
thing, the input embeddings.

Each image arrives as N placeholder ids (`config.image_token_id`: `<|extra_0|>`, 151646) that the data
pipeline put in the prompt. The frozen CLIP tower turns the image into N patch features, the projector maps
them to the LLM width, and one `masked_scatter` puts them at the placeholder positions. Everything after the
embeddings is QWen's own forward, unchanged. Text-only samples and batches mixing text-only and image
samples go through the same path; any number of images per sample works, in order. During generation the
image is encoded and spliced on the prefill step only.

Names: `patch_features` are the tower's output before the projector ([n_images, N, vision_hidden]; what
the feature cache stores), `image_embeds` the projected ones ([n_images, N, llm_hidden]).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen import QWenConfig, QWenLMHeadModel


class Projector(nn.Module):
    """The bridge from CLIP patch features to the LLM's embedding space: Linear -> GELU -> Linear,
    [..., vision_hidden] -> [..., llm_hidden].

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

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(patch_features)))


class QWenVLForCausalLM(QWenLMHeadModel):
    # The LLM checkpoint has no projector: it starts from its own init, and the strict loader knows to expect that.
    _keys_to_ignore_on_load_missing = [r"^projector\."]

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        for name in ("vision_hidden_size", "image_token_id"):
            if not hasattr(config, name):
                raise ValueError(f"QWenVLForCausalLM needs config.{name} (set by model.build_vlm)")
        self.image_token_id = config.image_token_id
        self.projector = Projector(config.vision_hidden_size, config.hidden_size)
        self.vision_tower: nn.Module | None = None  # attached after loading; frozen; never saved with the LLM
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, Projector):
            module.reset_parameters()
        else:
            super()._init_weights(module)

    def attach_vision_tower(self, tower: nn.Module) -> None:
        if tower.hidden_size != self.config.vision_hidden_size:
            raise ValueError(
                f"vision tower width {tower.hidden_size} != config.vision_hidden_size {self.config.vision_hidden_size}"
            )
        self.vision_tower = tower

    # ------------------------------------------------------------------ the one change: the embeddings

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> frozen CLIP patch features [n_images, N, vision_hidden] (no grad)."""
        if self.vision_tower is None:
            raise RuntimeError("no vision tower attached: build the model with model.build_vlm / load_vlm")
        return self.vision_tower(pixel_values)

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        patch_features: torch.Tensor | None = None,
        decoding: bool = False,
    ) -> torch.Tensor:
        """Token embeddings with the projected image features at the placeholder positions. [B, T, hidden]

        `patch_features` are precomputed tower outputs [n_images, N, vision_hidden] (the feature cache);
        `pixel_values` are encoded here. Raises ValueError when placeholders and feature rows disagree.
        """
        embeds = self.get_input_embeddings()(input_ids)  # [B, T, hidden]
        is_image = input_ids == self.image_token_id  # [B, T]
        if pixel_values is None and patch_features is None:
            if not decoding and bool(is_image.any()):
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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_features: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values=None,
        return_logits: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        """QWen's forward on spliced embeddings. With labels, only the loss is computed (no [B, T, vocab]
        logits) unless `return_logits=True`."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (with image placeholders) or inputs_embeds")
            decoding = cache is not None and cache.get_seq_length() > 0
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, patch_features, decoding=decoding)
        if return_logits is None:
            return_logits = labels is None
        return super().forward(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            labels=labels,
            cache=cache,
            use_cache=use_cache,
            return_logits=return_logits,
            logits_to_keep=logits_to_keep,  # generate() asks for the last position only
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration:  # images are spliced on the prefill only
            inputs.pop("pixel_values", None)
            inputs.pop("patch_features", None)
        return inputs
