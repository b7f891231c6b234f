"""What a checkpoint looks like, from key names and shapes alone."""

from __future__ import annotations

import pytest

from lorakit.errors import LorakitError
from lorakit.models import detect

SDXL = {
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
}

CASES = [
    (SDXL, "SDXL", "model.diffusion_model.*"),
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
      "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)},
     "SD 1.x", "cross-attention width 768"),
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
      "cond_stage_model.model.ln_final.weight": (1024,)},
     "SD 2.x", "cross-attention width 1024"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, "Stable Diffusion 3",
     "joint_blocks"),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "Flux", "double_blocks"),
    ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 640),
      "lora_unet_input_blocks_4_1_proj_in.alpha": ()}, "a LoRA file", "lora_unet_"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320)}, "a LoRA file", "lora_A"),
    ({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280),
      "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}, "the SDXL refiner",
     "cross-attention width 1280"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.bias": (3,)}, "a VAE only", "encoder/decoder"),
    ({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, "a VAE only", "encoder/decoder"),
    ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "a diffusers-format state dict", "down_blocks"),
    ({"model.diffusion_model.out.2.weight": (4, 320, 3, 3)}, "a U-Net without SDXL's two text encoders",
     "conditioner.embedders.0.transformer."),
    ({"foo.bar": (1,)}, "an unknown model", "foo.bar"),
    ({}, "an empty file", "no tensors"),
]


@pytest.mark.parametrize("shapes, name, evidence", CASES, ids=[case[1] for case in CASES])
def test_checkpoint_kind(shapes, name, evidence) -> None:
    kind = detect.checkpoint_kind(shapes)
    assert kind.name == name
    assert evidence in kind.evidence


def test_require_sdxl_says_what_the_file_looks_like() -> None:
    detect.require_sdxl(SDXL, "base.safetensors")
    with pytest.raises(LorakitError) as error:
        detect.require_sdxl({"double_blocks.0.x": (1,)}, "flux1-dev.safetensors")
    assert str(error.value) == ("flux1-dev.safetensors does not look like an SDXL checkpoint: it looks like Flux "
                                "(key double_blocks.0.x)")


@pytest.mark.parametrize("shapes, prefix", [
    ({"encoder.conv_in.weight": (1,), "post_quant_conv.weight": (1,)}, ""),
    ({"first_stage_model.decoder.conv_out.weight": (1,)}, "first_stage_model."),
    (SDXL, None),
    ({}, None),
])
def test_vae_prefix(shapes, prefix) -> None:
    assert detect.vae_prefix(shapes) == prefix

