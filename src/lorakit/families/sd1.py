"""Stable Diffusion 1.x and 2.x (sd-scripts' `train_network.py`; `--v2` for 2.x): an LDM single file or a diffusers
folder with one text encoder — CLIP ViT-L/14 (1.x) or OpenCLIP ViT-H/14 run one layer short (2.x) — conditioned
on its last layer's states (or the one --clip_skip names), without SDXL's pooled vector and size embedding.
2.x 768 models predict v (`--v_parameterization`, as sd-scripts: the checkpoint does not say).

LoRA files use sd-scripts' names for these models: diffusers module paths for the U-Net
(`lora_unet_down_blocks_0_attentions_0_proj_in`) and `lora_te_` for the text encoder.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

from lorakit.data.text_cache import CaptionEncoder
from lorakit.data.weighted_captions import weighted_tokens
from lorakit.errors import LorakitError
from lorakit.families.base import ModelFamily, TextOutputs, autocast, token_budget
from lorakit.models import text_encoders, unet, vae
from lorakit.models.components import Components, ModelIdentity, ModelPart
from lorakit.models.detect import checkpoint_kind
from lorakit.models.loading import ModelLayout
from lorakit.models.prefixes import SD1_TE_PREFIX, SD2_TE_PREFIX, UNET_PREFIX, VAE_PREFIX
from lorakit.models.text_encoding import encode_single
from lorakit.models.tokenizers import cached_tokenizers, load_tokenizers
from lorakit.network.targets import LoRALayout, Target, text_encoder_targets, unet_targets

LATENT_SCALE = 0.18215  # SD 1.x/2.x's VAE scaling factor
SD1_HEADS = 8  # SD 1.x's attention has 8 heads at every level; SD 2.x's heads are 64 wide


@dataclass
class SDComponents(Components):
    """SD 1.x/2.x as diffusers and transformers modules (`text_encoder` is a `CLIPTextModel` either way)."""

    unet: nn.Module | None
    vae: nn.Module | None
    text_encoder: nn.Module | None
    tokenizer: CLIPTokenizer
    identity: ModelIdentity
    vae_identity: ModelIdentity | None = None
    v2: bool = False

    TEXT_ENCODERS: ClassVar[tuple[str, ...]] = ("text_encoder",)
    TOKENIZERS: ClassVar[tuple[str, ...]] = ("tokenizer",)

    def networks(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}

    def parts(self) -> tuple[ModelPart, ...]:
        return sd_parts(self.v2)


@functools.cache
def sd_parts(v2: bool) -> tuple[ModelPart, ...]:
    """The U-Net, the text encoder and the VAE in the order of an LDM checkpoint."""
    heads = None if v2 else SD1_HEADS

    def unet_config(size: str) -> dict:
        channels, attention = ([320, 640, 1280, 1280], [True, True, True, False]) if size == "full" else (
            [32, 64, 64], [True, True, False])
        return unet.sd_unet_config(channels, attention, layers_per_block=2 if size == "full" else 1,
                                   cross_attention_dim=(1024 if v2 else 768) if size == "full" else 64,
                                   heads=heads, use_linear_projection=v2,
                                   sample_size=(96 if v2 else 64) if size == "full" else 8)

    def vae_config(size: str) -> dict:
        return vae.vae_config(size) | {"scaling_factor": LATENT_SCALE, "sample_size": 768 if v2 else 512}

    def vae_config_from_sgm(shapes: Mapping[str, tuple[int, ...]]) -> dict:
        return vae.vae_config_from_sgm(shapes) | {"scaling_factor": LATENT_SCALE, "sample_size": 768 if v2 else 512}

    if v2:
        text_encoder = ModelPart("text_encoder", "text_encoder", SD2_TE_PREFIX, CLIPTextModel,
                                 text_encoders.sd2_te_config, text_encoders.sd2_te_config_from_sgm,
                                 text_encoders.sd2_te_to_diffusers, text_encoders.sd2_te_to_sgm)
    else:
        text_encoder = ModelPart("text_encoder", "text_encoder", SD1_TE_PREFIX, CLIPTextModel,
                                 text_encoders.te1_config, text_encoders.te1_config_from_sgm,
                                 text_encoders.te1_to_diffusers, text_encoders.te1_to_sgm)
    return (
        ModelPart("unet", "unet", UNET_PREFIX, UNet2DConditionModel, unet_config,
                  functools.partial(unet.sd_unet_config_from_ldm, heads=heads), unet.unet_to_diffusers,
                  unet.unet_to_sgm),
        text_encoder,
        ModelPart("vae", "vae", VAE_PREFIX, AutoencoderKL, vae_config, vae_config_from_sgm,
                  vae.vae_to_diffusers, vae.vae_to_sgm),
    )


def sd_layout(v2: bool) -> ModelLayout:
    title = "SD 2.x" if v2 else "SD 1.x"

    def assemble(modules: dict, tokenizers: tuple, identity: ModelIdentity,
                 vae_identity: ModelIdentity | None) -> SDComponents:
        return SDComponents(**modules, tokenizer=tokenizers[0], identity=identity, vae_identity=vae_identity, v2=v2)

    def tokenizers(cache_dir) -> tuple:
        """CLIP ViT-L's tokenizer (1.x) or OpenCLIP's, which pads with "!" (2.x): lorakit's TE1 and TE2 ones."""
        pair = cached_tokenizers(cache_dir) if cache_dir else load_tokenizers()
        return (pair[1 if v2 else 0],)

    def check(shapes: Mapping[str, Sequence[int]], source: str) -> None:
        kind = checkpoint_kind(shapes)
        if kind.name != title:
            hint = {"SD 2.x": "; add --v2 for SD 2.x", "SD 1.x": "; drop --v2 for SD 1.x",
                    "SDXL": "; train SDXL with sdxl_train_network.py"}.get(kind.name, "")
            raise LorakitError(f"{source} does not look like an {title} checkpoint: it looks like {kind.name} "
                               f"({kind.evidence}){hint}")

    def folder_check(index: dict, folder: str) -> None:
        if "text_encoder_2" in index or "text_encoder" not in index:
            encoders = "two text encoders" if "text_encoder_2" in index else "no text_encoder"
            raise LorakitError(f"{folder} does not look like an {title} model: its model_index.json names "
                               f"{index.get('_class_name', '?')} with {encoders}")

    example = "stabilityai/stable-diffusion-2-1" if v2 else "stable-diffusion-v1-5/stable-diffusion-v1-5"
    return ModelLayout(title, functools.partial(sd_parts, v2), assemble, tokenizers, check, folder_check, example)


def sd_targets(unet_model: nn.Module | None, encoders: Sequence[nn.Module], include_conv: bool) -> list[Target]:
    """sd-scripts' SD 1.x/2.x LoRA layers: the text encoder as `lora_te_…`, the U-Net in diffusers names."""
    targets = [t for encoder in encoders for t in text_encoder_targets(encoder, 1, prefix="lora_te", part="te")]
    if unet_model is not None:
        targets += unet_targets(unet_model, include_conv, sgm_names=False)
    return targets


def same_names(state: Mapping[str, Tensor], unet_model: nn.Module | None) -> dict[str, Tensor]:
    """SD 1.x/2.x LoRA files already use the network's names."""
    return dict(state)


SD_LORA = LoRALayout(sd_targets, same_names, block_args=False)


class StableDiffusion(ModelFamily):
    latent_scale = LATENT_SCALE
    bucket_multiple = 8  # the VAE's factor: diffusers' U-Net takes any latent size
    text_encoder_labels = ("TE",)
    text_encoder_lr_flags = ("--text_encoder_lr",)
    lora = SD_LORA

    def __init__(self, v2: bool) -> None:
        self.v2 = v2
        self.name = "sd2" if v2 else "sd1"
        self.title = "SD 2.x" if v2 else "SD 1.x"
        self.layout = sd_layout(v2)

    def caption_encoder(self, components: Components, *, max_token_length: int | None, weighted: bool,
                        clip_skip: int | None) -> CaptionEncoder:
        return CaptionEncoder(tuple(components.tokenizers), tuple(components.text_encoders), max_token_length,
                              weighted, clip_skip)

    def predict(self, unet_model: nn.Module, noisy: Tensor, timesteps: Tensor, text: TextOutputs,
                sizes: Tensor) -> Tensor:
        (context,) = text
        dtype = unet_model.dtype if unet_model.dtype.is_floating_point and unet_model.dtype.itemsize > 1 else (
            noisy.dtype)
        return unet_model(noisy.to(dtype), timesteps, context.to(dtype)).sample

    def text_stand_in(self, unet_model: nn.Module, batch_size: int, tokens: int) -> TextOutputs:
        return (torch.empty(batch_size, tokens, unet_model.config.cross_attention_dim, device=unet_model.device,
                            dtype=unet_model.dtype),)

    def sample(self, components: Components, unet_model: nn.Module, encoders: Sequence[nn.Module], prompt,
               seed: int, *, v_parameterization: bool, device: torch.device, dtype: torch.dtype, scheduler,
               clip_skip: int | None = None) -> Image.Image:
        (tokenizer,), (text_encoder,) = components.tokenizers, encoders
        pipeline = StableDiffusionPipeline(
            vae=components.vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet_model, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        texts = [prompt.prompt, prompt.negative_prompt]
        tokens, weights = weighted_tokens(tokenizer, texts, token_budget(tokenizer, texts))
        context = encode_single(text_encoder, tokens, weights, clip_skip).to(device)
        generator = torch.Generator("cpu").manual_seed(seed)  # the same starting noise on any device
        with autocast(device, dtype):
            return pipeline(prompt_embeds=context[:1], negative_prompt_embeds=context[1:], height=prompt.height,
                            width=prompt.width, num_inference_steps=prompt.steps, guidance_scale=prompt.scale,
                            generator=generator, output_type="pil").images[0]

    def metadata(self, v_parameterization: bool) -> dict[str, object]:
        """sd-scripts' `get_model_version_str_for_sd1_sd2`: sd_v1, sd_v2, and `_v` for v-prediction."""
        version = ("sd_v2" if self.v2 else "sd_v1") + ("_v" if v_parameterization else "")
        return {"ss_v2": self.v2, "ss_base_model_version": version}

    def modelspec(self, v_parameterization: bool) -> tuple[str, tuple[int, int]]:
        if not self.v2:
            return "stable-diffusion-v1/lora", (512, 512)
        if v_parameterization:
            return "stable-diffusion-v2-768-v/lora", (768, 768)
        return "stable-diffusion-v2-512/lora", (512, 512)
