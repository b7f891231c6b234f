"""The key prefixes of each model part in an original-layout (LDM / SGM) single-file checkpoint, declared once for
the loaders, the converters, checkpoint detection and the random-model writer."""

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's CLIP ViT-L
TE2_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP ViT-bigG
REFINER_TE_PREFIX = "conditioner.embedders.0.model."  # the SDXL refiner's only text encoder (OpenCLIP)
SD1_TE_PREFIX = "cond_stage_model.transformer."  # SD 1.x: CLIP ViT-L in transformers' layout
SD2_TE_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H
