"""SDXL base: an SGM single file or a diffusers folder with two CLIP text encoders (ViT-L and OpenCLIP ViT-bigG),
conditioned on both encoders' penultimate states, TE2's pooled vector and the images' size and crop
(sd-scripts' `sdxl_train_network.py`).

The model code is SDXL's own modules under `lorakit.models` (loading, name maps, text encoding, conditioning);
this adapter is what the trainer sees of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from torch import Tensor, nn

from lorakit.data.text_cache import CaptionEncoder
from lorakit.data.weighted_captions import weighted_tokens
from lorakit.families.base import ModelFamily, TextOutputs, autocast, token_budget
from lorakit.models.components import Components
from lorakit.models.conditioning import predict
from lorakit.models.loading import SDXL_LAYOUT
from lorakit.models.text_encoding import encode_tokens
from lorakit.models.vae import LATENT_SCALE
from lorakit.network.targets import SDXL_LORA

BASE_MODEL_VERSION = "sdxl_base_v1-0"
LORA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"


class SDXL(ModelFamily):
    name = "sdxl"
    title = "SDXL"
    layout = SDXL_LAYOUT
    latent_scale = LATENT_SCALE
    bucket_multiple = 32  # the U-Net halves the latent twice
    text_encoder_labels = ("TE1", "TE2")
    text_encoder_lr_flags = ("--text_encoder_lr1", "--text_encoder_lr2")
    lora = SDXL_LORA  # U-Net layers in sd-scripts' SGM names (files with diffusers-style names are renamed)

    def caption_encoder(self, components: Components, *, max_token_length: int | None, weighted: bool,
                        clip_skip: int | None) -> CaptionEncoder:
        """Both encoders' penultimate states and TE2's pooled vector; --clip_skip does not change SDXL's."""
        return CaptionEncoder(tuple(components.tokenizers), tuple(components.text_encoders), max_token_length,
                              weighted)

    def predict(self, unet: nn.Module, noisy: Tensor, timesteps: Tensor, text: TextOutputs,
                sizes: Tensor) -> Tensor:
        context, pooled = text
        return predict(unet, noisy, timesteps, context, pooled, sizes)

    def text_stand_in(self, unet: nn.Module, batch_size: int, tokens: int) -> TextOutputs:
        config = unet.config
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        like = {"device": unet.device, "dtype": unet.dtype}
        return (torch.empty(batch_size, tokens, config.cross_attention_dim, **like),
                torch.empty(batch_size, pooled, **like))

    def sample(self, components: Components, unet: nn.Module, text_encoders: Sequence[nn.Module], prompt,
               seed: int, *, v_parameterization: bool, device: torch.device, dtype: torch.dtype, scheduler,
               clip_skip: int | None = None) -> Image.Image:
        """SDXL's pipeline with prompts encoded as training encodes captions (--clip_skip does not apply)."""
        tokenizer1, tokenizer2 = components.tokenizers
        text_encoder1, text_encoder2 = text_encoders
        pipeline = StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=text_encoder1, text_encoder_2=text_encoder2, tokenizer=tokenizer1,
            tokenizer_2=tokenizer2, unet=unet, scheduler=scheduler, add_watermarker=False)
        pipeline.set_progress_bar_config(disable=True)
        texts = [prompt.prompt, prompt.negative_prompt]
        max_tokens = token_budget(tokenizer1, texts)
        tokens1, weights1 = weighted_tokens(tokenizer1, texts, max_tokens)
        tokens2, weights2 = weighted_tokens(tokenizer2, texts, max_tokens)
        context, pooled = encode_tokens(text_encoder1, text_encoder2, tokens1, tokens2, weights1, weights2)
        context, pooled = context.to(device), pooled.to(device)
        # A CPU generator gives the same starting noise for a seed on any device.
        generator = torch.Generator("cpu").manual_seed(seed)
        size = (prompt.height, prompt.width)
        with autocast(device, dtype):
            return pipeline(
                prompt_embeds=context[:1], pooled_prompt_embeds=pooled[:1], negative_prompt_embeds=context[1:],
                negative_pooled_prompt_embeds=pooled[1:], height=prompt.height, width=prompt.width,
                num_inference_steps=prompt.steps, guidance_scale=prompt.scale, generator=generator,
                original_size=size, target_size=size, crops_coords_top_left=(0, 0), output_type="pil",
            ).images[0]

    def metadata(self, v_parameterization: bool) -> dict[str, object]:
        return {"ss_v2": False, "ss_base_model_version": BASE_MODEL_VERSION}

    def modelspec(self, v_parameterization: bool) -> tuple[str, tuple[int, int]]:
        return LORA_ARCHITECTURE, (1024, 1024)
