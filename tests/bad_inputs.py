"""A deterministic generator of bad, odd and good inputs for `sdxl_train_network.py`, and its runner.

Each case is a command line over a world of files made here: a tiny SDXL checkpoint and a diffusers folder, a
good dataset, and every kind of broken file (truncated checkpoints and images, text in the wrong encoding, TOML
and JSON nested 100,000 deep, LoRA files of the wrong shapes, a pickle with a payload, ...). Cases cover every
flag of the table (bad values by type and range, refused flags, a good value of each), config and dataset
files, paths, images, captions, checkpoints, LoRA files, optimizer/scheduler/network arguments, and good inputs
that must be accepted. Every case is a `--dry_run` unless marked real (one training step).

A bad case passes when the command exits 2 with exactly one error line naming its culprit and no traceback; a
good case when it exits 0 ("all inputs checked" for a dry run). A case that runs past its time limit is a hang.

`python tests/bad_inputs.py` prints the summary per category; `tests/test_bad_inputs.py` runs it in the suite.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import signal
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from lorakit.config.flags import float_range, number, resolution, steps_or_ratio
from lorakit.config.train_config import iter_flags
from lorakit.testing.datasets import write_dataset_toml, write_image_folder
from lorakit.train.sampling import SAMPLERS

PROG = "sdxl_train_network.py"
CASE_SECONDS = 60  # a case running longer is a hang


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    argv: tuple[str, ...]
    culprit: str | None  # None: a good input, to be accepted; else text the one error line must contain
    real: bool = False  # one real training step instead of a dry run
    base: bool = True  # prepend the world's model, (dataset) and output flags
    dataset: bool = True  # the world's dataset TOML is part of the base


@dataclass
class Outcome:
    case: Case
    code: int | None
    error_lines: list[str]
    stderr: str
    seconds: float
    problem: str | None = None  # None: the case passed


@dataclass
class World:
    root: Path
    model: Path
    diffusers: Path
    dataset: Path
    images: Path
    output: Path
    files: dict[str, Path] = field(default_factory=dict)

    def base(self, dataset: bool = True) -> list[str]:
        """The model, outputs and quick settings; the dataset TOML unless the case gives its own data flags."""
        return (["--pretrained_model_name_or_path", str(self.model)]
                + (["--dataset_config", str(self.dataset)] if dataset else ["--resolution", "64"])
                + ["--output_dir", str(self.output), "--output_name", "lora", "--network_train_unet_only",
                   "--max_data_loader_n_workers", "0", "--seed", "1"])


# ---------------------------------------------------------------------------------------------------- the world


def build_world(root: Path, model: Path, diffusers: Path) -> World:
    """Good inputs and every kind of broken file, under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    write_image_folder(images, 3, sizes=((64, 64), (96, 64), (64, 96)))
    write_image_folder(root / "repeat-folders" / "2_lkt style", 2, sizes=((64, 64),))
    dataset = write_dataset_toml(root / "dataset.toml", images, resolution=64)
    world = World(root, model, diffusers, dataset, images, root / "out")
    f = world.files
    f["folder"] = root
    f["repeat_folders"] = root / "repeat-folders"
    f["missing"] = root / "does-not-exist.safetensors"
    f["long"] = root / ("x" * 5000)
    f["a_file"] = root / "plain.txt"
    f["a_file"].write_text("just text\n")
    f["latin1"] = root / "latin1.txt"
    f["latin1"].write_bytes("café, crème brûlée\n".encode("latin-1"))
    f["bom"] = root / "bom.txt"
    f["bom"].write_bytes("\ufeffa photo, lkt style --w 64 --h 64 --s 2\n".encode("utf-8"))
    f["deep_toml"] = root / "deep.toml"
    f["deep_toml"].write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    f["deep_json"] = root / "deep.json"
    f["deep_json"].write_text("[" * 100_000 + "]" * 100_000)
    f["prompts"] = root / "prompts.txt"
    f["prompts"].write_text("lkt style, a red circle --w 64 --h 64 --s 2 --d 1\n")
    _checkpoints(root, model, diffusers, f)
    _lora_files(root, model, f)
    _images(root, f)
    return world


def _checkpoints(root: Path, model: Path, diffusers: Path, f: dict[str, Path]) -> None:
    data = model.read_bytes()
    f["truncated_model"] = root / "truncated.safetensors"
    f["truncated_model"].write_bytes(data[: len(data) // 2])
    f["header_only_model"] = root / "header-only.safetensors"
    f["header_only_model"].write_bytes(data[:100])
    f["empty_model"] = root / "empty.safetensors"
    f["empty_model"].write_bytes(b"")
    f["random_model"] = root / "random.safetensors"
    f["random_model"].write_bytes(os.urandom(4096))
    header_size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_size])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    # One U-Net tensor claims another shape: the header stays consistent, the architecture does not.
    key = next(k for k in sorted(tensors) if k.startswith("model.diffusion_model.") and k.endswith("proj_in.weight"))
    odd = dict(tensors)
    shape = list(odd[key]["shape"])
    odd[key] = dict(odd[key], shape=[shape[0], shape[1] // 2] + shape[2:])
    begin, end = odd[key]["data_offsets"]
    odd[key]["data_offsets"] = [begin, begin + (end - begin) // 2]
    _write_header(root / "wrong-shape.safetensors", odd, data[8 + header_size:])
    f["wrong_shape_model"] = root / "wrong-shape.safetensors"
    extra = dict(tensors)
    extra["model.diffusion_model.extra.weight"] = dict(tensors[key])
    _write_header(root / "extra-module.safetensors", extra, data[8 + header_size:])
    f["extra_module_model"] = root / "extra-module.safetensors"
    sd15 = {k.replace("conditioner.embedders.0.transformer.", "cond_stage_model.transformer."): v
            for k, v in tensors.items() if not k.startswith("conditioner.embedders.1.")}
    _write_header(root / "sd15-like.safetensors", sd15, data[8 + header_size:])
    f["sd15_model"] = root / "sd15-like.safetensors"
    marker = root / "PICKLE-PAYLOAD-RAN"
    f["pickle_marker"] = marker
    f["pickle_model"] = root / "payload.ckpt"
    with open(f["pickle_model"], "wb") as handle:
        pickle.dump(_Payload(str(marker)), handle)
    f["bad_index"] = root / "bad-index"
    f["bad_index"].mkdir()
    (f["bad_index"] / "model_index.json").write_text("[1, 2, 3]")
    f["no_index"] = root / "no-index"
    f["no_index"].mkdir()
    f["not_json_index"] = root / "not-json-index"
    f["not_json_index"].mkdir()
    (f["not_json_index"] / "model_index.json").write_text("{not json")
    f["diffusers_bad_config"] = root / "diffusers-bad-config"
    f["diffusers_bad_config"].mkdir()
    (f["diffusers_bad_config"] / "model_index.json").write_text((diffusers / "model_index.json").read_text())
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (f["diffusers_bad_config"] / part).mkdir()
        (f["diffusers_bad_config"] / part / "config.json").write_text("{broken")
    f["diffusers_empty_unet_config"] = root / "diffusers-empty-unet-config"
    shutil.copytree(diffusers, f["diffusers_empty_unet_config"])
    (f["diffusers_empty_unet_config"] / "unet" / "config.json").write_text("{}")
    f["diffusers_no_te2_weights"] = root / "diffusers-no-te2-weights"
    shutil.copytree(diffusers, f["diffusers_no_te2_weights"])
    for weights in (f["diffusers_no_te2_weights"] / "text_encoder_2").glob("*.safetensors"):
        weights.unlink()


class _Payload:
    """Unpickling this creates a marker file: no loader may ever run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_header(path: Path, tensors: dict, body: bytes) -> None:
    header = json.dumps(tensors).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)


def _lora_files(root: Path, model: Path, f: dict[str, Path]) -> None:
    from lorakit.models.loading import load_sdxl
    from lorakit.network.network import build_network

    unet = load_sdxl(str(model), device="meta").unet
    network = build_network(unet, [], network_dim=2, network_alpha=1)
    names = [lora.lora_name for lora in network.loras]
    shapes = {f"{lora.lora_name}.lora_down.weight": tuple(lora.lora_down.weight.shape) for lora in network.loras}
    shapes |= {f"{lora.lora_name}.lora_up.weight": tuple(lora.lora_up.weight.shape) for lora in network.loras}
    good = {key: torch.full(shape, 0.01) for key, shape in shapes.items()}
    good |= {f"{name}.alpha": torch.tensor(1.0) for name in names}
    save_file(good, root / "good-lora.safetensors")
    f["good_lora"] = root / "good-lora.safetensors"
    wrong = dict(good)
    first_up = f"{names[0]}.lora_up.weight"
    wrong[first_up] = torch.zeros(wrong[first_up].shape[0] + 3, *wrong[first_up].shape[1:])
    save_file(wrong, root / "wrong-shape-lora.safetensors")
    f["wrong_shape_lora"] = root / "wrong-shape-lora.safetensors"
    nan = dict(good)
    nan[first_up] = torch.full(good[first_up].shape, float("nan"))
    save_file(nan, root / "nan-lora.safetensors")
    f["nan_lora"] = root / "nan-lora.safetensors"
    ints = dict(good)
    ints[first_up] = torch.zeros(good[first_up].shape, dtype=torch.int32)
    save_file(ints, root / "int-lora.safetensors")
    f["int_lora"] = root / "int-lora.safetensors"
    flat = dict(good)
    first_down = f"{names[0]}.lora_down.weight"
    flat[first_down] = torch.zeros(8)
    save_file(flat, root / "flat-lora.safetensors")
    f["flat_lora"] = root / "flat-lora.safetensors"
    save_file({"some.other.tensor": torch.zeros(2, 2)}, root / "foreign.safetensors")
    f["foreign_lora"] = root / "foreign.safetensors"
    data = (root / "good-lora.safetensors").read_bytes()
    f["truncated_lora"] = root / "truncated-lora.safetensors"
    f["truncated_lora"].write_bytes(data[: len(data) // 2])


def _images(root: Path, f: dict[str, Path]) -> None:
    def folder(name: str, make) -> Path:
        path = root / "img" / name
        path.mkdir(parents=True)
        write_image_folder(path, 2, sizes=((64, 64),))
        make(path)
        f[f"images_{name}"] = path
        return path

    def truncated_png(path: Path) -> None:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="PNG")
        (path / "cut.png").write_bytes(_cut_idat(buffer.getvalue()))
    folder("truncated_png", truncated_png)
    folder("zero_bytes", lambda path: (path / "empty.png").write_bytes(b""))
    folder("text_as_png", lambda path: (path / "words.png").write_text("not an image"))
    folder("cut_file", lambda path: (path / "cut.jpg").write_bytes(_jpeg()[:300]))
    folder("cut_scan", lambda path: (path / "half.jpg").write_bytes(_jpeg()[: len(_jpeg()) * 3 // 5]))
    folder("one_pixel", lambda path: Image.new("RGB", (1, 1)).save(path / "dot.png"))
    folder("latin1_caption", lambda path: (path / "image_000.txt").write_bytes("crème".encode("latin-1")))
    folder("empty_caption", lambda path: (path / "image_000.txt").write_text(""))
    folder("caption_folder", lambda path: ((path / "image_000.txt").unlink(), (path / "image_000.txt").mkdir()))
    folder("bomb", lambda path: (path / "huge.png").write_bytes(_png_header(40000, 40000)))

    def other_formats(path: Path) -> None:
        for name, options in (("photo.jpg", {"quality": 90}), ("photo.webp", {}), ("photo.bmp", {}),
                              ("alpha.png", {})):
            mode = "RGBA" if name == "alpha.png" else "RGB"
            Image.new(mode, (80, 64), (30, 90, 200)).save(path / name, **options)
        exif = Image.Exif()
        exif[0x0112] = 6  # stored landscape, shown portrait
        Image.new("RGB", (96, 64), (200, 90, 30)).save(path / "rotated.jpg", exif=exif)
    folder("formats", other_formats)
    empty = root / "img" / "no_images"
    empty.mkdir(parents=True)
    f["images_none"] = empty


def _fifo(path: Path) -> Path:
    """A named pipe: reading it would block until a writer comes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _cut_idat(png: bytes) -> bytes:
    """A PNG whose compressed pixel stream stops half-way, in chunks with valid CRCs (verify() passes)."""
    out, pos = bytearray(png[:8]), 8
    while pos < len(png):
        length = struct.unpack(">I", png[pos:pos + 4])[0]
        kind, body = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            body = body[: len(body) // 2]
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        pos += 12 + length
    return bytes(out)


def _jpeg() -> bytes:
    """A JPEG with enough detail that its coded data is most of the file."""
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size far beyond Pillow's decompression-bomb limit."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"")
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return (b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", len(idat)) + b"IDAT" + idat
            + struct.pack(">I", zlib.crc32(b"IDAT" + idat)) + end)


# ---------------------------------------------------------------------------------------------------- the cases


def cases(world: World) -> list[Case]:
    return (flag_cases(world) + config_file_cases(world) + dataset_cases(world) + path_cases(world)
            + image_cases(world) + text_file_cases(world) + checkpoint_cases(world) + lora_cases(world)
            + argument_cases(world) + family_cases(world) + state_cases(world) + good_cases(world))


# Flags whose good value needs partners, or a file of the world, or cannot be walked with a plain value.
PARTNERS = {
    "adaptive_noise_scale": ["--noise_offset", "0.03"],
    "full_bf16": ["--mixed_precision", "bf16"],
    "fp8_base": ["--mixed_precision", "bf16"], "fp8_base_unet": ["--mixed_precision", "bf16"],
    "scale_v_pred_loss_like_noise_pred": ["--v_parameterization"],
    "lr_warmup_steps": ["--lr_scheduler", "constant_with_warmup"],
    "lr_decay_steps": ["--lr_scheduler", "warmup_stable_decay"],
    "lr_scheduler_min_lr_ratio": ["--lr_scheduler", "cosine_with_min_lr"],
    "lr_scheduler_timescale": ["--lr_scheduler", "inverse_sqrt"],
    "lr_scheduler_power": ["--lr_scheduler", "polynomial"],
    "lr_scheduler_num_cycles": ["--lr_scheduler", "cosine_with_restarts"],
    "zero_terminal_snr": ["--v_parameterization"],
    "base_weights_multiplier": [],  # set in good_flag_value with its file
    "max_bucket_reso": ["--enable_bucket", "--min_bucket_reso", "64"], "min_bucket_reso": ["--enable_bucket"],
    "lr_scheduler_type": ["--lr_scheduler_args", "step_size=10"], "lr_scheduler_args": ["--lr_scheduler_type", "StepLR"],
    "log_with": ["--logging_dir", "LOGS"],
    **{name: ["--ema_decay", "0.99"] for name in ("ema_update_after_step", "ema_update_every", "ema_on_cpu")},
    "memory_budget_gb": ["--gradient_checkpointing"], "gradient_checkpointing_blocks": ["--gradient_checkpointing"],
}
GOOD_VALUES = {
    "memory_budget_gb": ["8"],
    "resolution": ["64"], "train_batch_size": ["2"], "min_bucket_reso": ["64"], "max_bucket_reso": ["128"],
    "bucket_reso_steps": ["32"], "max_train_steps": ["3"], "max_train_epochs": ["2"], "min_timestep": ["100"],
    "max_timestep": ["900"], "lr_warmup_steps": ["0.1"], "lr_decay_steps": ["10%"], "mixed_precision": ["no"],
    "network_dim": ["8"], "network_alpha": ["4"], "ema_decay": ["0.99"], "caption_extension": [".txt"], "caption_extention": [".txt"],
    "caption_separator": [";"], "keep_tokens_separator": ["|||"], "secondary_separator": [";;;"],
    "lr_scheduler_min_lr_ratio": ["0.1"], "lr_scheduler_timescale": ["10"], "resize_interpolation": ["bicubic"],
    "optimizer_type": ["Lion"], "lr_scheduler": ["cosine"], "network_module": ["networks.lora"],
    "sample_sampler": ["euler_a"], "save_model_as": ["safetensors"], "save_precision": ["fp16"],
    "max_token_length": ["150"], "log_with": ["tensorboard"], "dynamo_backend": ["eager"],
    "console_log_level": ["WARNING"], "validation_split": ["0.3"], "lr_scheduler_type": ["StepLR"],
    "lr_scheduler_args": ["step_size=10"], "optimizer_args": ["weight_decay=0.01"], "network_args": ["conv_dim=2"],
    "huber_schedule": ["exponential"], "loss_type": ["huber"], "text_encoder_lr": ["1e-5", "2e-5"],
    "token_warmup_min": ["2"], "token_warmup_step": ["3"], "keep_tokens": ["1"], "caption_dropout_every_n_epochs": ["2"],
    "max_data_loader_n_workers": ["0"], "seed": ["7"], "clip_skip": ["2"], "initial_epoch": ["1"], "initial_step": ["1"],
}
# Flags a plain good value cannot be walked with here: the model, the dataset and outputs are the world's;
# each file flag has cases of its own; these switches or values change what the dry run reads.
NOT_WALKED = {"pretrained_model_name_or_path", "dataset_config", "output_dir", "output_name", "config_file",
              "output_config", "train_data_dir", "reg_data_dir", "in_json", "vae", "network_weights",
              "base_weights", "resume", "sample_prompts", "logging_dir", "log_tracker_config", "console_log_file",
              "tokenizer_cache_dir", "conditioning_data_dir", "metadata_thumbnail", "dim_from_weights", "dry_run",
              "network_train_unet_only", "network_train_text_encoder_only", "full_fp16", "xformers",
              "wandb_api_key", "wandb_run_name", "masked_loss", "mixed_precision", "torch_compile",
              "base_weights_multiplier", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
              "shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate", "token_warmup_step",
              "color_aug", "random_crop", "skip_until_initial_step", "sdpa", "sample_with_ema"}
INPUT_PATHS = {"vae": "--vae", "network_weights": "--network_weights", "resume": "--resume",
               "sample_prompts": "--sample_prompts", "log_tracker_config": "--log_tracker_config",
               "in_json": "--in_json", "train_data_dir": "--train_data_dir", "reg_data_dir": "--reg_data_dir",
               "metadata_thumbnail": "--metadata_thumbnail", "dataset_config": "--dataset_config",
               "config_file": "--config_file", "base_weights": "--base_weights"}


def flag_cases(world: World) -> list[Case]:
    """Every flag of the table: bad values by type and range, the refusal of refused flags, a good value."""
    result = []
    for flag in iter_flags():
        option = flag.option

        # --train_data_dir, --reg_data_dir and --in_json are ignored beside --dataset_config (with a warning).
        own_data = flag.name in ("train_data_dir", "reg_data_dir", "in_json")

        def bad(name: str, *words: str, culprit: str = option) -> None:
            result.append(Case("flags", f"{flag.name}: {name}", words, culprit, dataset=not own_data))

        if flag.refused:
            value = [option] if flag.is_switch else [option, str(next(c for c in flag.choices if c != flag.default))
                                                     if flag.choices else "value"]
            bad("refused", *value)
            continue
        if flag.is_switch:
            bad("switch given a value", f"{option}=yes")
        elif flag.choices:
            bad("unknown choice", option, "no_such_choice")
        elif flag.parse is int:
            bad("not an integer", option, "x")
            bad("a fraction", option, "1.5")
            bad("beyond 64 bits", option, str(2**80))
            if flag.bounds is not None and flag.bounds.low is not None:
                bad("below its range", f"{option}={int(flag.bounds.low) - 1}")
            if flag.bounds is not None and flag.bounds.high is not None:
                bad("above its range", option, str(int(flag.bounds.high) + 1))
        elif flag.parse is number:
            bad("not a number", option, "x")
            bad("nan", option, "nan")
            bad("inf", option, "inf")
            if flag.bounds is not None and flag.bounds.low is not None:
                bad("below its range", f"{option}={flag.bounds.low - 1}")
        elif flag.parse is resolution:
            bad("zero", option, "0")
            bad("WxH", option, "1024x768")
            bad("too large", option, "100000")
        elif flag.parse is float_range:
            bad("reversed", option, "2,1")
        elif flag.parse is steps_or_ratio:
            bad("negative", f"{option}=-1")
            bad("over 100%", option, "200%")
        if flag.name in INPUT_PATHS and flag.name not in ("dataset_config", "config_file"):
            # --reg_data_dir goes with training images of the command line; the others stand alone.
            partner = ("--train_data_dir", str(world.files["repeat_folders"])) if flag.name == "reg_data_dir" else ()
            bad("missing path", *partner, option, str(world.files["missing"]), culprit=str(world.files["missing"]))
            # --in_json becomes a fine-tuning subset, and its messages name the subset's metadata_file.
            culprit = "metadata_file" if flag.name == "in_json" else option
            bad("5000-character path", *partner, option, str(world.files["long"]), culprit=culprit)
        if flag.name not in NOT_WALKED and flag.implemented:
            words = [option] if flag.is_switch else [option, *GOOD_VALUES.get(flag.name, [_good_word(flag)])]
            partners = [str(world.root / "logs") if word == "LOGS" else word for word in PARTNERS.get(flag.name, [])]
            result.append(Case("flags", f"{flag.name}: good value", tuple(partners + words), None))
    return result


def _good_word(flag) -> str:
    if flag.choices:
        return str(next(choice for choice in flag.choices if choice != flag.default))
    return {int: "3", number: "0.5", str: "some_text", float_range: "1,2"}.get(flag.parse, "64")


def config_file_cases(world: World) -> list[Case]:
    root = world.root

    def toml(name: str, text: str | bytes) -> Path:
        path = root / "config" / f"{name}.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    bad = [
        ("not TOML", toml("not-toml", "learning_rate = = 1\n"), "not-toml.toml"),
        ("latin-1", toml("latin1", "metadata_author = 'café'\n".encode("latin-1")), "latin1.toml"),
        ("deep nesting", world.files["deep_toml"], "deep.toml"),
        ("a folder", root / "config", "config"),
        ("missing", root / "config" / "absent.toml", "absent.toml"),
        ("nan value", toml("nan", "learning_rate = nan\n"), "learning_rate"),
        ("inf value", toml("inf", "max_grad_norm = inf\n"), "max_grad_norm"),
        ("wrong type", toml("type", "network_dim = 'eight'\n"), "network_dim"),
        ("list for a number", toml("list", "learning_rate = [1, 2]\n"), "learning_rate"),
        ("bool for a number", toml("bool", "seed = true\n"), "seed"),
        ("out of range", toml("range", "caption_dropout_rate = 2.0\n"), "caption_dropout_rate"),
        ("negative value", toml("negative", "save_every_n_steps = -1\n"), "save_every_n_steps"),
        ("refused flag", toml("refused", "deepspeed = true\n"), "--deepspeed"),
        ("bad choice", toml("choice", "mixed_precision = 'fp32'\n"), "mixed_precision"),
        ("resolution string", toml("reso", "resolution = 'big'\n"), "resolution"),
    ]
    fifo = root / "config" / "fifo.toml"
    os.mkfifo(fifo)
    bad += [
        ("a named pipe", fifo, "fifo.toml"),
        ("NUL in a path", toml("nul", 'sample_prompts = "a\\u0000b"\n'), "--sample_prompts"),
        ("NUL in a text value", toml("nultext", 'metadata_author = "a\\u0000b"\n'), "--metadata_author"),
    ]
    result = [Case("config_file", name, ("--config_file", str(path)), culprit) for name, path, culprit in bad]
    good = toml("good", "[model]\nnetwork_dim = 8\n[training]\nlearning_rate = 1e-4\nlr_warmup_steps = '10%'\n"
                        "lr_scheduler = 'cosine'\nunknown_key = 1\n")
    result.append(Case("config_file", "good with tables and an unknown key", ("--config_file", str(good)), None))
    bom = toml("bom", "\ufeffnetwork_dim = 4\n")
    result.append(Case("config_file", "UTF-8 with a byte-order mark", ("--config_file", str(bom)), None))
    return result


def dataset_cases(world: World) -> list[Case]:
    root, images = world.root, world.images

    def dataset(name: str, general: str = "", datasets: str = "", subset: str = "", *, text: str | None = None,
                suffix: str = ".toml") -> Path:
        path = root / "datasets" / f"{name}{suffix}"
        path.parent.mkdir(exist_ok=True)
        if text is None:
            text = (f"[general]\ncaption_extension = '.txt'\n{general}\n[[datasets]]\nresolution = 64\n{datasets}\n"
                    f"[[datasets.subsets]]\nimage_dir = '{images}'\n{subset}\n")
        path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        return path

    bad = [
        ("not TOML", dataset("syntax", text="[general\n"), "syntax.toml"),
        ("latin-1", dataset("latin1", text="[general]\ncaption_prefix = 'café'\n".encode("latin-1")), "latin1.toml"),
        ("deep TOML", world.files["deep_toml"], "deep.toml"),
        ("deep JSON", world.files["deep_json"], "deep.json"),
        ("JSON not an object", dataset("array", text="[1, 2]", suffix=".json"), "array.json"),
        ("bad JSON", dataset("badjson", text="{'a': 1}", suffix=".json"), "badjson.json"),
        ("YAML file", dataset("yaml", text="a: 1", suffix=".yaml"), "yaml"),
        ("no datasets", dataset("nodatasets", text="[general]\nresolution = 64\n"), "datasets"),
        ("no subsets", dataset("nosubsets", text="[[datasets]]\nresolution = 64\n"), "subsets"),
        ("unknown key", dataset("unknown", subset="colour_aug = true"), "colour_aug"),
        ("key at the wrong level", dataset("level", subset="batch_size = 2"), "batch_size"),
        ("command-line key", dataset("cli", general="learning_rate = 1e-4"), "learning_rate"),
        ("missing image_dir", dataset("nodir", text="[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                                                  "num_repeats = 1\n"), "image_dir"),
        ("image_dir missing", dataset("absentdir", text=f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                                                       f"image_dir = '{root / 'nowhere'}'\n"), "nowhere"),
        ("image_dir a file", dataset("dirfile", text=f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                                                     f"image_dir = '{world.files['a_file']}'\n"), "plain.txt"),
        ("image_dir 5000 characters", dataset("longdir", text=f"[[datasets]]\nresolution = 64\n"
                                                              f"[[datasets.subsets]]\nimage_dir = "
                                                              f"'{world.files['long']}'\n"), "image_dir"),
        ("no images", dataset("noimages", text=f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                                               f"image_dir = '{world.files['images_none']}'\n"), "no_images"),
        ("nan", dataset("nan", subset="caption_dropout_rate = nan"), "caption_dropout_rate"),
        ("inf", dataset("inf", subset="token_warmup_step = inf"), "token_warmup_step"),
        ("nan multiplier", dataset("nanmult", datasets="network_multiplier = nan"), "network_multiplier"),
        ("negative repeats", dataset("negrepeats", subset="num_repeats = -1"), "num_repeats"),
        ("a billion repeats", dataset("billion", subset="num_repeats = 1000000000"), "num_repeats"),
        ("string repeats", dataset("strrepeats", subset="num_repeats = '2'"), "num_repeats"),
        ("zero batch", dataset("zerobatch", datasets="batch_size = 0"), "batch_size"),
        ("huge max bucket", dataset("hugebucket", datasets="enable_bucket = true\nmax_bucket_reso = "
                                                            f"{2**62}"), "max_bucket_reso"),
        ("min bucket below step", dataset("minstep", text=f"[[datasets]]\nresolution = 256\nenable_bucket = true\n"
                                                          "min_bucket_reso = 64\nbucket_reso_steps = 128\n"
                                                          f"max_bucket_reso = 256\n[[datasets.subsets]]\n"
                                                          f"image_dir = '{images}'\n"), "min_bucket_reso"),
        ("step not a multiple of 32", dataset("step48", datasets="bucket_reso_steps = 48"), "bucket_reso_steps"),
        ("min above resolution", dataset("minreso", datasets="enable_bucket = true\nmin_bucket_reso = 128"),
         "min_bucket_reso"),
        ("resolution zero", dataset("reso0", text=f"[[datasets]]\nresolution = 0\n[[datasets.subsets]]\n"
                                                  f"image_dir = '{images}'\n"), "resolution"),
        ("resolution huge", dataset("resohuge", text=f"[[datasets]]\nresolution = 100000\n[[datasets.subsets]]\n"
                                                     f"image_dir = '{images}'\n"), "resolution"),
        ("no resolution", dataset("noreso", text=f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{images}'\n"),
         "resolution"),
        ("caption_extension with a slash", dataset("slash", subset="caption_extension = '.txt/x'"),
         "caption_extension"),
        ("empty caption_separator", dataset("emptysep", subset="caption_separator = ''\nshuffle_caption = true"),
         "caption_separator"),
        ("bad interpolation", dataset("interp", subset="resize_interpolation = 'sharp'"), "resize_interpolation"),
        ("validation_split 1", dataset("split1", subset="validation_split = 1.0"), "validation_split"),
        ("face crop", dataset("face", subset="face_crop_aug_range = [2.0, 4.0]"), "face_crop_aug_range"),
        ("only regularisation", dataset("onlyreg", subset="is_reg = true"), "regularisation"),
        ("metadata_file missing", dataset("nometa", text=f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                                                         f"metadata_file = '{root / 'meta-absent.json'}'\n"),
         "meta-absent.json"),
        ("conditioning without --masked_loss", dataset("cond", subset=f"conditioning_data_dir = '{images}'"),
         "conditioning_data_dir"),
        ("datasets not an array", dataset("notarray", text="datasets = 3\n"), "datasets"),
        ("subset not a table", dataset("subsetint", text="[[datasets]]\nresolution = 64\nsubsets = [1]\n"),
         "subsets"),
        ("resolution 8 without buckets", dataset("reso8", text=f"[[datasets]]\nresolution = 8\n"
                                                              f"[[datasets.subsets]]\nimage_dir = '{images}'\n"),
         "resolution"),
        ("resolution 100 without buckets", dataset("reso100", text=f"[[datasets]]\nresolution = 100\n"
                                                                  f"[[datasets.subsets]]\nimage_dir = '{images}'\n"),
         "resolution"),
        ("resolution below the step", dataset("reso31", datasets="enable_bucket = true\nbucket_no_upscale = true\n"
                                                                 "bucket_reso_steps = 32", text=None).parent
         / "reso31.toml", "resolution"),
        ("a named pipe", _fifo(root / "datasets" / "pipe.toml"), "pipe.toml"),
    ]
    (root / "datasets" / "reso31.toml").write_text(
        f"[[datasets]]\nresolution = 31\nenable_bucket = true\nbucket_no_upscale = true\nbucket_reso_steps = 32\n"
        f"[[datasets.subsets]]\nimage_dir = '{images}'\n")
    result = [Case("dataset_toml", name, ("--dataset_config", str(path)), culprit) for name, path, culprit in bad]
    good = [
        ("bucketing", dataset("bucket", datasets="enable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 128\n"
                                                 "bucket_reso_steps = 32")),
        ("no upscale", dataset("noup", datasets="enable_bucket = true\nbucket_no_upscale = true\n"
                                                "bucket_reso_steps = 32")),
        ("caption options", dataset("captions", subset="keep_tokens = 1\ncaption_prefix = 'a, '\n"
                                                       "flip_aug = true\nnum_repeats = 3")),
        ("validation split", dataset("valsplit", subset="validation_split = 0.34\nvalidation_seed = 3")),
        ("JSON", dataset("json", text=json.dumps({"general": {"caption_extension": ".txt"}, "datasets": [
            {"resolution": [64, 64], "subsets": [{"image_dir": str(images)}]}]}), suffix=".json")),
        ("byte-order mark", dataset("bom", text="\ufeff" + dataset("plain").read_text())),
        ("a million repeats", dataset("million", subset="num_repeats = 1000000")),
    ]
    result += [Case("dataset_toml", name, ("--dataset_config", str(path)), None) for name, path in good]
    return result


def path_cases(world: World) -> list[Case]:
    files, root = world.files, world.root
    a_file = str(files["a_file"])
    result = [
        Case("paths", "output_dir is a file", ("--output_dir", a_file), "--output_dir"),
        Case("paths", "output_dir inside a file", ("--output_dir", f"{a_file}/sub"), "--output_dir"),
        Case("paths", "output_dir 5000 characters", ("--output_dir", str(files["long"])), "--output_dir"),
        Case("paths", "logging_dir is a file", ("--logging_dir", a_file), "--logging_dir"),
        Case("paths", "tokenizer_cache_dir is a file", ("--tokenizer_cache_dir", a_file), "--tokenizer_cache_dir"),
        Case("paths", "output_name too long", ("--output_name", "n" * 300), "--output_name"),
        Case("paths", "console_log_file is a folder", ("--console_log_file", str(root)), "--console_log_file"),
        Case("paths", "console_log_file under a file", ("--console_log_file", f"{a_file}/log.txt"),
             "--console_log_file"),
        Case("paths", "vae a text file", ("--vae", a_file), "plain.txt"),
        Case("paths", "network_weights a folder", ("--network_weights", str(root)), "--network_weights"),
        Case("paths", "resume a file", ("--resume", a_file), "--resume"),
        Case("paths", "resume a folder that is no state", ("--resume", str(world.images)), "--resume"),
        Case("paths", "train_data_dir without repeat folders", ("--train_data_dir", str(world.images)),
             "--train_data_dir", dataset=False),
        Case("paths", "metadata_thumbnail not an image", ("--metadata_thumbnail", a_file), "--metadata_thumbnail"),
        Case("paths", "sample_prompts a folder", ("--sample_prompts", str(root)), "--sample_prompts"),
        Case("paths", "metadata_thumbnail a text data URL", ("--metadata_thumbnail", "data:text/plain,hi"),
             "--metadata_thumbnail"),
        Case("paths", "console_log_file a device", ("--console_log_file", "/dev/null"), "--console_log_file"),
        Case("paths", "output_dir empty", ("--output_dir=",), "--output_dir"),
        Case("paths", "conditioning_data_dir missing", ("--conditioning_data_dir", str(files["missing"]),
                                                        "--masked_loss"), None),
    ]
    # conditioning_data_dir on the command line is only a default for mask subsets, which this dataset is not.
    good = [
        Case("paths", "output_dir to create", ("--output_dir", str(root / "new" / "deeper")), None),
        Case("paths", "spaces and unicode", ("--output_dir", str(root / "out dir é"), "--output_name", "ロラ lora"),
             None),
        Case("paths", "metadata_thumbnail an image", ("--metadata_thumbnail", str(world.images / "image_000.png")),
             None),
        Case("paths", "metadata_thumbnail a data URL", ("--metadata_thumbnail", "data:image/png;base64,AAAA"), None),
        Case("paths", "console_log_file in a new folder", ("--console_log_file", str(root / "logs" / "x.log")),
             None),
    ]
    return result + good


def image_cases(world: World) -> list[Case]:
    made: list[Path] = []

    def with_images(name: str, extra: str = "") -> tuple[str, ...]:
        folder = world.files[f"images_{name}"]
        path = world.root / "datasets" / f"images-{name}-{len(made)}.toml"
        made.append(path)
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 64\n{extra}\n"
                        f"[[datasets.subsets]]\nimage_dir = '{folder}'\n")
        return "--dataset_config", str(path)

    return [
        Case("images", "PNG pixel data cut", with_images("truncated_png"), "cut.png"),
        Case("images", "zero-byte PNG", with_images("zero_bytes"), "empty.png"),
        Case("images", "text named .png", with_images("text_as_png"), "words.png"),
        Case("images", "JPEG cut short", with_images("cut_file"), "cut.jpg"),
        Case("images", "JPEG cut in its scan data", with_images("cut_scan"), "half.jpg"),
        Case("images", "1x1 image with bucket_no_upscale",
             with_images("one_pixel", "enable_bucket = true\nbucket_no_upscale = true\nbucket_reso_steps = 32"),
             "dot.png"),
        Case("images", "1x1 image with buckets", with_images("one_pixel", "enable_bucket = true\nmin_bucket_reso = 32"
                                                                          "\nbucket_reso_steps = 32"), None),
        Case("images", "latin-1 caption", with_images("latin1_caption"), "image_000.txt"),
        Case("images", "empty caption file", with_images("empty_caption"), "image_000.txt"),
        # A folder is not a caption file: the image falls back to class_tokens, with a warning naming it.
        Case("images", "caption file is a folder", with_images("caption_folder"), None),
        Case("images", "decompression bomb", with_images("bomb"), "huge.png"),
        Case("images", "JPEG, WebP, BMP, alpha PNG, EXIF-rotated JPEG", with_images("formats", "enable_bucket = true\n"
                                                                           "min_bucket_reso = 32\nbucket_reso_steps = 32"),
             None),
    ]


def text_file_cases(world: World) -> list[Case]:
    files, root = world.files, world.root

    def text(name: str, content: str | bytes) -> str:
        path = root / "text" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def metadata(name: str, content: str | bytes) -> tuple[str, ...]:
        path = text(name, content)
        toml = root / "datasets" / f"meta-{name}.toml"
        toml.parent.mkdir(exist_ok=True)
        toml.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = '{path}'\n"
                        f"image_dir = '{world.images}'\n")
        return "--dataset_config", str(toml)

    return [
        Case("text_files", "sample_prompts latin-1", ("--sample_prompts", str(files["latin1"])), "latin1.txt"),
        Case("text_files", "sample_prompts bad TOML", ("--sample_prompts", text("p.toml", "[prompt\n")), "p.toml"),
        Case("text_files", "sample_prompts bad JSON", ("--sample_prompts", text("p.json", "[{")), "p.json"),
        Case("text_files", "sample_prompts deep JSON", ("--sample_prompts", str(files["deep_json"])), "deep.json"),
        Case("text_files", "sample_prompts deep TOML", ("--sample_prompts", str(files["deep_toml"])), "deep.toml"),
        Case("text_files", "sample_prompts .md", ("--sample_prompts", text("p.md", "a cat")), "p.md"),
        Case("text_files", "sample_prompts bad option", ("--sample_prompts", text("bad.txt", "a cat --w wide")),
             "bad.txt"),
        Case("text_files", "sample_prompts BOM", ("--sample_prompts", str(files["bom"])), None),
        Case("text_files", "sample_prompts good", ("--sample_prompts", str(files["prompts"])), None),
        Case("text_files", "sample_prompts with lms", ("--sample_prompts", text("lms.txt", "a cat --ss k_lms\n")),
             None if importlib.util.find_spec("scipy") else "scipy"),
        Case("text_files", "sample_prompts every sampler but lms", ("--sample_prompts", text("all.txt", "".join(
            f"a cat --ss {name}\n" for name in SAMPLERS if "lms" not in name))), None),
        Case("text_files", "metadata_file latin-1", metadata("m1.json", '{"a": {"caption": "é"}}'.encode("latin-1")),
             "m1.json"),
        Case("text_files", "metadata_file deep", metadata("m2.json", "[" * 100_000 + "]" * 100_000), "m2.json"),
        Case("text_files", "metadata_file a list", metadata("m3.json", "[1]"), "m3.json"),
        Case("text_files", "metadata_file bad JSONL", metadata("m4.jsonl", '{"image_path": 1}\n'), "m4.jsonl"),
        Case("text_files", "metadata_file long key", metadata("m5.json", json.dumps({"k" * 5000: {"caption": "a"}})),
             "m5.json"),
        Case("text_files", "metadata_file caption a number", metadata("m7.json", '{"image_000": {"caption": 5}}'),
             "m7.json"),
        Case("text_files", "sample_prompts a named pipe", ("--sample_prompts", str(_fifo(root / "text" / "p.fifo"))),
             "p.fifo"),
        Case("text_files", "sample_prompts scale nan", ("--sample_prompts", text("nan.txt", "a cat --l nan")),
             "nan.txt"),
        Case("text_files", "sample_prompts width huge", ("--sample_prompts", text("wide.txt", "a cat --w 100000000")),
             "wide.txt"),
        Case("text_files", "sample_prompts seed huge", ("--sample_prompts", text("seed.txt", "a cat --d " + "9" * 30)),
             "seed.txt"),
        Case("text_files", "log_tracker_config option of the wrong type",
             ("--logging_dir", str(root / "tb"), "--log_tracker_config",
              text("t3.toml", "[tensorboard]\nflush_secs = 'x'\n")), "flush_secs"),
        Case("text_files", "metadata_file good", metadata("m6.json", json.dumps(
            {"image_000": {"caption": "a red thing"}, "image_001.png": {"tags": "x, y"}})), None),
        Case("text_files", "log_tracker_config latin-1", ("--logging_dir", str(root / "tb"), "--log_tracker_config",
                                                          text("t.toml", "[wandb]\nname = 'é'\n".encode("latin-1"))),
             "t.toml"),
        Case("text_files", "log_tracker_config wrong table", ("--logging_dir", str(root / "tb"), "--log_tracker_config",
                                                              text("t2.toml", "[other]\na = 1\n")), "t2.toml"),
        Case("text_files", "log_with wandb not installed", ("--log_with", "wandb"), "wandb"),
    ]


def checkpoint_cases(world: World) -> list[Case]:
    f = world.files

    def model(path: Path, culprit: str | None) -> Case:
        return Case("checkpoints", path.name, ("--pretrained_model_name_or_path", str(path)), culprit)

    return [
        model(f["truncated_model"], "truncated.safetensors"),
        model(f["header_only_model"], "header-only.safetensors"),
        model(f["empty_model"], "empty.safetensors"),
        model(f["random_model"], "random.safetensors"),
        model(f["wrong_shape_model"], "wrong-shape.safetensors"),
        model(f["extra_module_model"], "extra-module.safetensors"),
        model(f["sd15_model"], "sd15-like.safetensors"),
        model(f["pickle_model"], "payload.ckpt"),
        model(f["bad_index"], "model_index.json"),
        model(f["no_index"], "no-index"),
        model(f["not_json_index"], "model_index.json"),
        model(f["diffusers_bad_config"], "diffusers-bad-config"),
        model(f["good_lora"], "good-lora.safetensors"),
        model(f["missing"], "does-not-exist.safetensors"),
        model(f["long"], "--pretrained_model_name_or_path"),
        model(world.root / "no-such-dir" / "model", "no-such-dir/model"),
        Case("checkpoints", "vae truncated", ("--vae", str(f["truncated_model"])), "truncated.safetensors"),
        Case("checkpoints", "vae is a LoRA", ("--vae", str(f["good_lora"])), "good-lora.safetensors"),
        model(f["diffusers_empty_unet_config"], "diffusers-empty-unet-config"),
        model(f["diffusers_no_te2_weights"], "text_encoder_2"),
        Case("checkpoints", "diffusers folder", ("--pretrained_model_name_or_path", str(world.diffusers)), None),
        Case("checkpoints", "vae from the checkpoint", ("--vae", str(world.model)), None),
    ]


def lora_cases(world: World) -> list[Case]:
    f = world.files
    result = []
    for flag in ("--network_weights", "--base_weights"):
        for key, culprit in (("wrong_shape_lora", "wrong-shape-lora"), ("nan_lora", "nan-lora"),
                             ("int_lora", "int-lora"), ("flat_lora", "flat-lora"), ("foreign_lora", "foreign"),
                             ("truncated_lora", "truncated-lora"), ("truncated_model", "truncated.safetensors"),
                             ("pickle_model", "payload.ckpt")):
            result.append(Case("lora_files", f"{flag} {key}", (flag, str(f[key])), culprit))
        result.append(Case("lora_files", f"{flag} good", (flag, str(f["good_lora"]), "--network_dim", "2"), None))
    result += [
        Case("lora_files", "dim_from_weights wrong shapes", ("--network_weights", str(f["wrong_shape_lora"]),
                                                             "--dim_from_weights"), "wrong-shape-lora"),
        Case("lora_files", "dim_from_weights flat down", ("--network_weights", str(f["flat_lora"]),
                                                          "--dim_from_weights"), "flat-lora"),
        Case("lora_files", "dim_from_weights good", ("--network_weights", str(f["good_lora"]), "--dim_from_weights"),
             None),
        Case("lora_files", "base_weights_multiplier count", ("--base_weights", str(f["good_lora"]),
                                                             "--base_weights_multiplier", "1", "2"),
             "--base_weights_multiplier"),
        Case("lora_files", "network_weights needs the rank", ("--network_weights", str(f["good_lora"]),
                                                              "--network_dim", "4"), "good-lora.safetensors"),
    ]
    return result


def family_cases(world: World) -> list[Case]:
    """Flags and models of the wrong family (the world's model is SDXL)."""
    def case(name: str, culprit: str | None, *words: str) -> Case:
        return Case("families", name, words, culprit)

    return [
        case("SD 1.x family, SDXL single file", "does not look like an SD 1.x checkpoint", "--model_family", "sd1"),
        case("SD 2.x family, SDXL single file", "does not look like an SD 2.x checkpoint", "--model_family", "sd2"),
        case("SD 1.x family, SDXL diffusers folder", "does not look like an SD 1.x model", "--model_family", "sd1",
             "--pretrained_model_name_or_path", str(world.diffusers)),
        case("--v2 on SDXL", "--v2", "--v2"),
        case("two text-encoder rates for SD 2.x", "--text_encoder_lr", "--model_family", "sd2",
             "--text_encoder_lr", "1e-5", "2e-5"),
        case("--text_encoder_lr1 for SD 1.x", "--text_encoder_lr1", "--model_family", "sd1", "--text_encoder_lr1",
             "1e-5"),
        case("unknown family", "--model_family", "--model_family", "sd3"),
    ]


def argument_cases(world: World) -> list[Case]:
    def case(name: str, culprit: str | None, *words: str) -> Case:
        return Case("arguments", name, words, culprit)

    return [
        case("memory budget without checkpointing", "--memory_budget_gb", "--memory_budget_gb", "8"),
        case("memory budget with every block", "--memory_budget_gb", "--gradient_checkpointing", "--memory_budget_gb",
             "8", "--gradient_checkpointing_blocks", "all"),
        case("memory budget below the weights", None, "--gradient_checkpointing", "--memory_budget_gb", "0.01"),
        case("every block without checkpointing", "--gradient_checkpointing_blocks", "--gradient_checkpointing_blocks",
             "all"),
        case("unknown optimizer", "--optimizer_type", "--optimizer_type", "NoSuchOptimizer"),
        case("optimizer module missing", "--optimizer_type", "--optimizer_type", "no_such_package.Optim"),
        case("optimizer eps=-1", "--optimizer_args", "--optimizer_args", "eps=-1"),
        case("optimizer betas of one", "--optimizer_args", "--optimizer_args", "betas=(0.9,)"),
        case("optimizer unknown keyword", "--optimizer_args", "--optimizer_args", "no_such_keyword=1"),
        case("optimizer not a literal", "--optimizer_args", "--optimizer_args", "weight_decay=abc"),
        case("optimizer no equals", "--optimizer_args", "--optimizer_args", "weight_decay"),
        case("optimizer lr=nan", "--optimizer_args", "--optimizer_args", "weight_decay=float('nan')"),
        case("Prodigy unknown keyword", "--optimizer_args", "--optimizer_type", "Prodigy", "--optimizer_args",
             "d_coeff=2", "--learning_rate", "1"),
        case("8-bit optimizer bad betas", "--optimizer_args", "--optimizer_type", "AdamW8bit", "--optimizer_args",
             "betas=(2,2)"),
        case("scheduler class missing", "--lr_scheduler_type", "--lr_scheduler_type", "no_such.Mod"),
        case("scheduler unknown torch class", "--lr_scheduler_type", "--lr_scheduler_type", "NoSuchLR"),
        case("scheduler args missing", "--lr_scheduler", "--lr_scheduler_type", "StepLR"),
        case("scheduler args wrong", "--lr_scheduler", "--lr_scheduler_type", "StepLR", "--lr_scheduler_args",
             "step_size=0"),
        case("scheduler timescale 0", "--lr_scheduler_timescale", "--lr_scheduler", "inverse_sqrt",
             "--lr_scheduler_timescale=0"),
        case("wsd warm-up and decay too long", "--lr_warmup_steps", "--lr_scheduler", "warmup_stable_decay",
             "--lr_warmup_steps", "0.6", "--lr_decay_steps", "0.6"),
        case("piecewise without rules", "piecewise_constant", "--lr_scheduler", "piecewise_constant"),
        case("piecewise bad rules", "--lr_scheduler", "--lr_scheduler", "piecewise_constant", "--lr_scheduler_args",
             "step_rules='x:y'"),
        case("cosine_with_min_lr without ratio", "--lr_scheduler_min_lr_ratio", "--lr_scheduler",
             "cosine_with_min_lr"),
        case("unknown network module", "--network_module", "--network_module", "no_such_network.lora"),
        case("network module without create_network", "--network_module", "--network_module", "json"),
        case("conv_dim -4", "conv_dim", "--network_args", "conv_dim=-4"),
        case("conv_alpha nan", "conv_alpha", "--network_args", "conv_dim=2", "conv_alpha=nan"),
        case("unknown network arg", "no_such_arg", "--network_args", "no_such_arg=1"),
        case("network arg without value", "--network_args", "--network_args", "conv_dim"),
        case("block_dims wrong count", "block_dims", "--network_args", "block_dims=1,2,3"),
        case("rank_dropout 1", "rank_dropout", "--network_args", "rank_dropout=1"),
        case("down_lr_weight bad", "down_lr_weight", "--network_args", "down_lr_weight=sharp"),
        case("every lr weight zero", "nothing", "--network_args", "down_lr_weight=zeros", "mid_lr_weight=0,0,0",
             "up_lr_weight=zeros", "--network_dim", "2"),
        case("learning rate zero everywhere", "learning rate", "--learning_rate", "0"),
        case("optimizer eps=0", "--optimizer_args", "--optimizer_args", "eps=0"),
        case("optimizer weight_decay infinite", "--optimizer_args", "--optimizer_args", "weight_decay=1e400"),
        case("LoRA+ ratio huge", "loraplus_unet_lr_ratio", "--network_args", "loraplus_unet_lr_ratio=1e308"),
        case("initial step past the end", "nothing to train", "--initial_step", "99999"),
        case("initial epoch past the end", "nothing to train", "--initial_epoch", "5", "--max_train_epochs", "4"),
        case("fp16 on a CPU", "--mixed_precision fp16", "--mixed_precision", "fp16"),
        case("caption_separator empty", "--caption_separator", "--caption_separator=", "--shuffle_caption"),
        case("cache with shuffle", "--shuffle_caption", "--cache_text_encoder_outputs", "--shuffle_caption"),
        case("good optimizer args", None, "--optimizer_args", "weight_decay=0.1", "betas=(0.9,0.99)", "eps=1e-8"),
        case("good Adafactor", None, "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False",
             "scale_parameter=False", "warmup_init=False", "--lr_scheduler", "constant_with_warmup",
             "--lr_warmup_steps", "2"),
        case("good AdamW8bit", None, "--optimizer_type", "AdamW8bit"),
        case("good Prodigy", None, "--optimizer_type", "Prodigy", "--learning_rate", "1"),
        case("good schedule-free", None, "--optimizer_type", "AdamWScheduleFree"),
        case("good torch scheduler", None, "--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args",
             "T_max=100"),
        case("good block weights", None, "--network_args", "down_lr_weight=cosine+.25", "mid_lr_weight=1,1,1",
             "up_lr_weight=linear", "--network_dim", "2"),
        case("good LoRA+", None, "--network_args", "loraplus_lr_ratio=16"),
        case("unknown algo", "algo", "--network_args", "algo=ia3"),
        case("DoRA on LoHa", "dora_wd", "--network_args", "algo=loha", "dora_wd=True"),
        case("Tucker LoKr", "use_tucker", "--network_args", "algo=lokr", "use_tucker=True"),
        case("LoKr factor 0", "factor", "--network_args", "algo=lokr", "factor=0"),
        case("dropout with LoHa", "--network_dropout", "--network_args", "algo=loha", "--network_dropout", "0.1"),
        case("max norm with LoKr", "--scale_weight_norms", "--network_args", "algo=lokr", "--scale_weight_norms",
             "1"),
        case("good DoRA", None, "--network_args", "algo=lora", "dora_wd=True", "conv_dim=2"),
        case("good LoHa", None, "--network_args", "algo=loha", "conv_dim=2", "rank_dropout=0.1"),
        case("good LoKr", None, "--network_args", "algo=lokr", "factor=4", "conv_dim=2"),
    ]


def state_cases(world: World) -> list[Case]:
    """--resume with a real state (one step, saved) and damaged copies of it."""
    from lorakit.train.cli import main

    saved = world.root / "state-run"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        code = main(world.base() + ["--output_dir", str(saved), "--max_train_steps", "1", "--network_dim", "2",
                                    "--save_state"], prog=PROG)
    assert code == 0, "the state run failed"
    state = saved / "lora-state"

    def damaged(name: str, change) -> str:
        copy = world.root / "states" / name / "lora-state"
        shutil.copytree(state, copy)
        change(copy)
        return str(copy)

    def progress(**values):
        def change(folder: Path) -> None:
            data = json.loads((folder / "progress.json").read_text())
            (folder / "progress.json").write_text(json.dumps(data | values))
        return change

    def case(name: str, culprit: str | None, *words: str) -> Case:
        return Case("states", name, ("--network_dim", "2", "--max_train_steps", "3", *words), culprit)

    return [
        case("good state", None, "--resume", str(state)),
        case("seed a string", "seed", "--resume", damaged("seed", progress(seed="abc"))),
        case("epoch 0", "epoch", "--resume", damaged("epoch", progress(epoch=0))),
        case("negative step", "global_step", "--resume", damaged("step", progress(global_step=-10))),
        case("losses not numbers", "epoch_losses", "--resume", damaged("losses", progress(epoch_losses=["x"]))),
        case("rng garbage", "rng.json", "--resume", damaged("rng", lambda f: (f / "rng.json").write_text("[1]"))),
        case("scheduler garbage", "--resume", "--resume", damaged("sched", lambda f: (f / "scheduler.json")
                                                                  .write_text('{"base_lrs": "x"}'))),
        case("network truncated", "--resume", "--resume", damaged("net", lambda f: (f / "network.safetensors")
                                                                  .write_bytes(b"12345678"))),
        case("another rank", "--resume", "--resume", str(state), "--network_dim", "4"),
        case("no marker", "--resume", "--resume", damaged("marker", lambda f: (f / "COMPLETE").unlink())),
        case("finished run", "nothing to train", "--resume", str(state), "--max_train_steps", "1"),
    ]


def good_cases(world: World) -> list[Case]:
    base = ("--max_train_steps", "1", "--network_dim", "2")
    return [
        Case("good", "the world's command", (), None),
        Case("good", "seed command on the CPU", ("--network_module=networks.lora", "--network_dim=8",
                                                 "--network_alpha=4", "--learning_rate=1e-4", "--unet_lr=1e-4",
                                                 "--text_encoder_lr1=1e-5", "--text_encoder_lr2=1e-5",
                                                 "--optimizer_type=AdamW8bit", "--lr_scheduler=constant",
                                                 "--max_train_epochs=2", "--save_every_n_epochs=1",
                                                 "--gradient_checkpointing", "--cache_text_encoder_outputs",
                                                 "--cache_latents"), None),
        Case("good", "one real step", base, None, real=True),
        Case("good", "one real step, bf16, cached", base + ("--mixed_precision", "bf16", "--cache_latents",
                                                           "--cache_text_encoder_outputs"), None, real=True),
        Case("good", "one real step, text encoders trained",
             ("--pretrained_model_name_or_path", str(world.model), "--dataset_config", str(world.dataset),
              "--output_dir", str(world.root / "real-te"), "--max_data_loader_n_workers", "0", *base), None,
             real=True, base=False),
        Case("good", "one real step, base and network weights", base + (
            "--network_weights", str(world.files["good_lora"]), "--base_weights", str(world.files["good_lora"])),
             None, real=True),
    ]


# ---------------------------------------------------------------------------------------------------- running


class CaseTimeout(BaseException):
    """Raised by the alarm of a case that runs past CASE_SECONDS (a BaseException, so no handler takes it)."""


def run_case(case: Case, world: World) -> Outcome:
    from lorakit.train.cli import main

    argv = (world.base(case.dataset) if case.base else []) + list(case.argv)
    argv += [] if case.real else ["--dry_run"]
    stderr, stdout = io.StringIO(), io.StringIO()

    def alarm(signum, frame):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    start = time.perf_counter()
    code: int | None
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            code = main(argv, prog=PROG)
    except CaseTimeout:
        code = None
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - start
    text = stderr.getvalue()
    errors = [line for line in text.splitlines() if line.startswith(f"{PROG}:")]
    outcome = Outcome(case, code, errors, text, seconds)
    outcome.problem = judge(outcome, stdout.getvalue(), world)
    return outcome


def judge(outcome: Outcome, stdout: str, world: World) -> str | None:
    case, code = outcome.case, outcome.code
    if code is None:
        return "hang"
    if "Traceback" in outcome.stderr:
        return "traceback"
    if world.files["pickle_marker"].exists():
        return "a pickle payload ran"
    if case.culprit is None:
        if code != 0:
            return f"good input refused: {outcome.error_lines or outcome.stderr[-300:]}"
        if not case.real and "all inputs checked" not in stdout:
            return "dry run did not say all inputs checked"
        return None
    if code == 0:
        return "bad input accepted"
    if code != 2 or len(outcome.error_lines) != 1:
        return f"expected one error line and exit 2, got exit {code}: {outcome.error_lines}"
    if case.culprit not in outcome.error_lines[0]:
        return f"error does not name {case.culprit!r}: {outcome.error_lines[0][:300]}"
    if "internal error" in outcome.error_lines[0]:
        return "internal error"
    return None


def run_all(world: World, selected: list[Case] | None = None) -> list[Outcome]:
    outcomes = [run_case(case, world) for case in (selected if selected is not None else cases(world))]
    if world.output.exists() and not any(o.case.real for o in outcomes):
        raise AssertionError(f"a dry run wrote {world.output}")
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    categories: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        categories.setdefault(outcome.case.category, []).append(outcome)
    lines = [f"{'category':<14} {'cases':>6} {'bad':>5} {'good':>5} {'passed':>7} {'traceback':>10} {'hang':>5} "
             f"{'accepted bad':>13} {'refused good':>13} {'other':>6} {'max s':>6}"]
    for name, items in categories.items():
        problems = [o.problem or "" for o in items]
        lines.append(
            f"{name:<14} {len(items):>6} {sum(o.case.culprit is not None for o in items):>5} "
            f"{sum(o.case.culprit is None for o in items):>5} {problems.count(''):>7} "
            f"{problems.count('traceback'):>10} {problems.count('hang'):>5} "
            f"{problems.count('bad input accepted'):>13} {sum(p.startswith('good input refused') for p in problems):>13} "
            f"{sum(p not in ('', 'traceback', 'hang', 'bad input accepted') and not p.startswith('good input refused') for p in problems):>6} "
            f"{max(o.seconds for o in items):>6.1f}")
    failed = [o for o in outcomes if o.problem]
    lines.append(f"{len(outcomes)} cases, {len(outcomes) - len(failed)} passed, {len(failed)} failed")
    lines += [f"  FAILED {o.case.category}: {o.case.name}: {o.problem}" for o in failed]
    return "\n".join(lines)


def make_world(root: Path) -> World:
    """The tiny model (single file and diffusers folder) and the world of files, under `root`."""
    from lorakit.testing.random_models import random_components, write_diffusers, write_single_file

    components = random_components("tiny", seed=0, dtype=torch.float32)
    model, diffusers = root / "model.safetensors", root / "model-diffusers"
    if not model.exists():
        write_single_file(components, model)
    if not diffusers.exists():
        write_diffusers(components, diffusers)
    return build_world(root / "world", model, diffusers)


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        world = make_world(Path(folder))
        outcomes = run_all(world)
        print(summary(outcomes))
        print(f"{time.perf_counter() - started:.0f} s in all; CPU {torch.backends.cpu.get_cpu_capability()}")
    sys.exit(1 if any(o.problem for o in outcomes) else 0)
