"""From a command line (and an optional `--config_file` TOML) to one validated TrainConfig.

Precedence: command line > config file > defaults. File values go through the same converters and choices as
the command line. Refused flags, bad values and contradictory flags raise LorakitError with one line;
adjustments the user should know about are one warning line each on the "lorakit.config.parse" logger
(a child of "lorakit", which the training entry point configures from --console_log_*).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w

from lorakit.config.flags import Flag, number
from lorakit.config.train_config import GROUPS, TrainConfig, iter_flags
from lorakit.errors import LorakitError
from lorakit.fileio import atomic_path, kind_of, parse_toml, read_text

log = logging.getLogger(__name__)

DESCRIPTION = ("Train an SDXL LoRA. Accepts the command line of sd-scripts' sdxl_train_network.py; every flag is "
               "either implemented or refused with a reason.")
USAGE = ("%(prog)s --pretrained_model_name_or_path PATH (--dataset_config PATH | --train_data_dir PATH) "
         "[options]")
NOT_IN_FILES = ("config_file", "output_config")  # only meaningful on the command line
MAX_INTEGER = 2**31 - 1  # no count, size or step of a run comes near it; beyond it C integers overflow
CAPTION_RANDOMISERS = ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate", "token_warmup_step")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a LorakitError (one line, no usage dump, no exit)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise LorakitError(message)


def build_parser(prog: str | None = None, *, suppress_defaults: bool = False,
                 family: str = "sdxl") -> argparse.ArgumentParser:
    """The sd-scripts-compatible parser, grouped for `--help` (which notes what `family`'s trainer refuses).
    With `suppress_defaults`, parsing yields only the flags given (how the command line is layered over a config
    file)."""
    parser = _Parser(prog=prog or "sdxl_train_network.py", description=DESCRIPTION, usage=USAGE,
                     argument_default=argparse.SUPPRESS if suppress_defaults else None,
                     formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=40))
    sections = {group: parser.add_argument_group(group.title, group.description) for group in GROUPS}
    for flag in iter_flags():
        options: dict[str, Any] = {"dest": flag.name, "help": help_text(flag, family).replace("%", "%%")}
        if not suppress_defaults:
            options["default"] = flag.default
        if flag.is_switch:
            options["action"] = "store_true"
        else:
            options.update(type=flag.parse, choices=flag.choices, nargs="*" if flag.many else None,
                           metavar=None if flag.choices else flag.metavar_name)
        sections[flag.group].add_argument(flag.option, **options)
    return parser


def help_text(flag: Flag, family: str = "sdxl") -> str:
    """The help line of a flag: meaning, default, and status when `family`'s trainer refuses it."""
    text = flag.help
    if not (flag.default is None or flag.default is False or flag.default == ""):
        text += f" (default: {flag.default})"
    if flag.bounds is not None:
        text += f" [{flag.bounds}]"
    if not flag.kohya:
        text += " [lorakit]"
    if flag.refused_for(family):
        text = f"[{flag.refusal_status(family)}] {text}"
    return text


def parse_train_args(argv: Sequence[str], prog: str | None = None, family: str = "sdxl") -> TrainConfig:
    """The validated TrainConfig of a training command line (`prog` names the command in `--help`; `family` is
    the model family of the entry point: "sdxl" for sdxl_train_network.py, "sd1" for train_network.py, which
    --model_family overrides and --v2 turns into "sd2"). `--output_config` writes the file and raises
    SystemExit(0), like `--help`."""
    given = command_line_values(argv, prog, family)
    if given.get("output_config"):
        _refuse_unsupported(given, model_family(family, given))
        if not given.get("config_file"):
            raise LorakitError("--output_config needs --config_file naming the TOML to write")
        written = write_config_file(given, given["config_file"])
        print(f"wrote the arguments to {written}")
        raise SystemExit(0)
    from_file = read_config_file(given["config_file"]) if given.get("config_file") else {}
    values = {flag.name: flag.default for flag in iter_flags()} | from_file | given
    values["model_family"] = model_family(family, values)
    _refuse_unsupported(from_file | given, values["model_family"])
    config = normalise(TrainConfig(**values))
    validate(config)
    return config


def model_family(entry: str, values: Mapping[str, Any]) -> str:
    """--model_family, else the entry point's; SD 1.x with --v2 is SD 2.x."""
    family = values.get("model_family") or entry
    return "sd2" if family == "sd1" and values.get("v2") else family


def command_line_values(argv: Sequence[str], prog: str | None = None, family: str = "sdxl") -> dict[str, Any]:
    """The flags given on the command line, converted (tuples for list flags); absent flags are absent."""
    namespace, extras = build_parser(prog, suppress_defaults=True, family=family).parse_known_args(list(argv))
    if extras:
        raise LorakitError(_unrecognised(extras))
    return {name: tuple(value) if isinstance(value, list) else value for name, value in vars(namespace).items()}


def _unrecognised(extras: list[str]) -> str:
    options = [word.split("=", 1)[0] for word in extras if word.startswith("-")]
    if not options:
        return f"unexpected argument {extras[0]!r} (every value follows its --flag)"
    known = [flag.option for flag in iter_flags()]
    close = difflib.get_close_matches(options[0], known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unrecognized argument {options[0]}{hint}"


def _refuse_unsupported(values: Mapping[str, Any], family: str) -> None:
    for flag in iter_flags():
        if flag.refused_for(family) and flag.name in values and values[flag.name] != flag.default:
            raise LorakitError(flag.refusal(family))


def config_file_path(path: str | Path) -> Path:
    """sd-scripts appends .toml to a --config_file without it."""
    text = str(path)
    return Path(text if text.endswith(".toml") else text + ".toml")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The converted values of a `--config_file` TOML. Tables are flattened (their names are ignored, as in
    sd-scripts); unknown keys are warned about by name and skipped."""
    path = config_file_path(path)
    document = parse_toml(read_text(path, "--config_file"), path, "--config_file")
    flat: dict[str, Any] = {}
    for key, value in document.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    flags = {flag.name: flag for flag in iter_flags()}
    values = {}
    for key, value in flat.items():
        if key in NOT_IN_FILES:
            log.warning("config file %s: key %r is only read from the command line; ignored", path, key)
        elif key not in flags:
            close = difflib.get_close_matches(key, list(flags), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            log.warning("config file %s: unknown key %r ignored%s", path, key, hint)
        else:
            try:
                values[key] = value_from_file(flags[key], value)
            except (ValueError, argparse.ArgumentTypeError) as error:
                raise LorakitError(f"config file {path}: {key} = {value!r}: {error}") from None
    return values


def value_from_file(flag: Flag, value: Any) -> Any:
    """A TOML value through the flag's command-line converter and choices. Raises ValueError saying what is
    expected."""
    if flag.is_switch:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if flag.many:
        return tuple(_convert_word(flag, item) for item in (value if isinstance(value, list) else [value]))
    if isinstance(value, list) and flag.to_file is not None:  # resolution = [1024, 768]
        value = ",".join(str(item) for item in value)
    return _convert_word(flag, value)


_EXPECTED = {int: "expected an integer", number: "expected a number", str: "expected text"}


def _convert_word(flag: Flag, value: Any) -> Any:
    if isinstance(value, (bool, list, dict)):
        raise ValueError(f"{_EXPECTED.get(flag.parse, 'expected one value')}, found {type(value).__name__}")
    try:
        converted = flag.parse(str(value))
    except ValueError:
        raise ValueError(_EXPECTED.get(flag.parse, "invalid value")) from None
    if flag.choices and converted not in flag.choices:
        raise ValueError("expected one of " + ", ".join(str(choice) for choice in flag.choices))
    return converted


def write_config_file(values: Mapping[str, Any], path: str | Path) -> Path:
    """`--output_config`: the non-default values (minus secrets) as a TOML both lorakit and sd-scripts read.
    Never overwrites."""
    path = config_file_path(path)
    if kind_of(path, "--config_file") is not None:
        raise LorakitError(f"--output_config: {path} exists already; remove it or name another --config_file")
    document = {flag.name: flag.file_value(values[flag.name]) for flag in iter_flags()
                if flag.name in values and values[flag.name] != flag.default
                and not flag.secret and flag.name not in NOT_IN_FILES}
    with atomic_path(path) as temporary:
        temporary.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


def normalise(config: TrainConfig) -> TrainConfig:
    """sd-scripts' post-parse adjustments (aliases, implications, list forms) and lorakit's own decisions (the
    README's "Where lorakit differs")."""
    changes: dict[str, Any] = {}
    extension = config.caption_extention if config.caption_extention is not None else config.caption_extension
    changes["caption_extension"] = extension if not extension or extension.startswith(".") else "." + extension

    rates = config.text_encoder_lr or None  # a bare `--text_encoder_lr` gives ()
    if rates and len(rates) > 2:
        raise LorakitError(f"--text_encoder_lr {' '.join(map(str, rates))}: expected one rate (both text "
                           "encoders) or two (TE1 TE2)")
    if rates and len(rates) == 2 and config.model_family != "sdxl":
        raise LorakitError(f"--text_encoder_lr {' '.join(map(str, rates))}: SD 1.x/2.x have one text encoder, so "
                           "expected one rate")
    changes["v2"] = config.v2 or config.model_family == "sd2"
    changes["text_encoder_lr"] = rates
    changes["text_encoder_lr1"] = config.text_encoder_lr1 if config.text_encoder_lr1 is not None else (
        rates[0] if rates else None)
    changes["text_encoder_lr2"] = config.text_encoder_lr2 if config.text_encoder_lr2 is not None else (
        rates[-1] if rates else None)

    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            changes[name] = None
    changes["cache_latents"] = config.cache_latents or config.cache_latents_to_disk
    cache_te = config.cache_text_encoder_outputs or config.cache_text_encoder_outputs_to_disk
    changes["cache_text_encoder_outputs"] = cache_te
    changes["optimizer_type"] = _optimizer_type(config)

    if cache_te and not config.network_train_unet_only and not config.network_train_text_encoder_only:
        changes["network_train_unet_only"] = True
        log.warning("training the U-Net only: --cache_text_encoder_outputs fixes the text-encoder outputs, so the "
                    "text encoders get no LoRA and their learning rates are unused (add --network_train_unet_only "
                    "to say so)")
    if config.mem_eff_attn:
        log.info("--mem_eff_attn: lorakit uses torch's scaled_dot_product_attention (memory-efficient kernels)")
    if config.clip_skip is not None and config.model_family == "sdxl":
        log.warning("--clip_skip %s does not change SDXL training or sample images (both use the penultimate "
                    "layer); it is only stored in the metadata", config.clip_skip)
    if config.zero_terminal_snr and not config.v_parameterization:
        log.warning("--zero_terminal_snr without --v_parameterization: an epsilon model cannot predict pure "
                    "noise at the last timestep; results may be poor")
    ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(config, name)]
    if config.dataset_config and ignored:
        log.warning("--dataset_config is given, so %s %s ignored", ", ".join(ignored),
                    "is" if len(ignored) == 1 else "are")
    return dataclasses.replace(config, **changes)


def _optimizer_type(config: TrainConfig) -> str:
    aliases = [name for name, on in (("AdamW8bit", config.use_8bit_adam), ("Lion", config.use_lion_optimizer))
               if on]
    if len(aliases) == 2:
        raise LorakitError("--use_8bit_adam and --use_lion_optimizer contradict; give --optimizer_type instead")
    if aliases and config.optimizer_type:
        alias = "--use_8bit_adam" if config.use_8bit_adam else "--use_lion_optimizer"
        raise LorakitError(f"{alias} and --optimizer_type {config.optimizer_type} contradict; keep one")
    return aliases[0] if aliases else (config.optimizer_type or "AdamW")


def validate(config: TrainConfig) -> None:
    """Cross-flag rules of sd-scripts (as one-line errors instead of assertions) and lorakit's own."""
    _check_inputs(config)
    _check_ranges(config)
    _check_precision(config)
    _check_checkpointing(config)
    _check_loss(config)
    _check_caching(config)
    _check_network_and_optimizer(config)


def _check_inputs(config: TrainConfig) -> None:
    if not config.pretrained_model_name_or_path:
        raise LorakitError("missing --pretrained_model_name_or_path (an SDXL .safetensors file or diffusers "
                           "folder)")
    if not (config.dataset_config or config.train_data_dir or config.in_json):
        raise LorakitError("no dataset: give --dataset_config (a dataset TOML) or --train_data_dir")
    data_flag = "--train_data_dir" if config.train_data_dir else "--in_json"
    if not config.dataset_config and config.resolution is None:
        raise LorakitError(f"{data_flag} needs --resolution (e.g. 1024 or 1024,768)")


def _check_ranges(config: TrainConfig) -> None:
    for flag in iter_flags():
        value = getattr(config, flag.name)
        if value is None:
            continue
        for item in value if flag.many else (value,):
            if flag.bounds is not None and item not in flag.bounds:
                raise LorakitError(f"{flag.option} {item}: expected {flag.bounds}")
            if flag.parse is int and abs(item) > MAX_INTEGER:
                raise LorakitError(f"{flag.option} {item}: expected at most {MAX_INTEGER}")
            if isinstance(item, str) and "\x00" in item:
                raise LorakitError(f"{flag.option} {item!r}: contains a NUL character")
            if item == "" and (flag.metavar == "PATH" or flag.name == "output_name"):
                raise LorakitError(f"{flag.option} is empty; expected {'a path' if flag.metavar else 'a name'}")
    if config.model_family == "sdxl" and config.bucket_reso_steps % 32:
        raise LorakitError(f"--bucket_reso_steps {config.bucket_reso_steps}: SDXL needs a multiple of 32")
    if config.min_bucket_reso > config.max_bucket_reso:
        raise LorakitError(f"--min_bucket_reso {config.min_bucket_reso} is larger than --max_bucket_reso "
                           f"{config.max_bucket_reso}")
    low = 0 if config.min_timestep is None else config.min_timestep
    high = 1000 if config.max_timestep is None else config.max_timestep
    if not 0 <= low < high <= 1000:
        raise LorakitError(f"--min_timestep {low} / --max_timestep {high}: expected 0 <= min < max <= 1000")


def _check_precision(config: TrainConfig) -> None:
    if config.full_fp16 and config.mixed_precision != "fp16":
        raise LorakitError(f"--full_fp16 needs --mixed_precision fp16, found {config.mixed_precision}")
    if config.full_bf16 and config.mixed_precision != "bf16":
        raise LorakitError(f"--full_bf16 needs --mixed_precision bf16, found {config.mixed_precision}")
    for name in ("fp8_base", "fp8_base_unet"):
        if getattr(config, name) and config.mixed_precision == "no":
            raise LorakitError(f"--{name} computes in the mixed-precision dtype: add --mixed_precision bf16 or fp16")


def _check_checkpointing(config: TrainConfig) -> None:
    if config.memory_budget_gb is not None and not config.gradient_checkpointing:
        raise LorakitError(f"--memory_budget_gb {config.memory_budget_gb:g} plans gradient checkpointing: add "
                           "--gradient_checkpointing")
    if config.gradient_checkpointing_blocks == "all" and not config.gradient_checkpointing:
        raise LorakitError("--gradient_checkpointing_blocks all says which blocks --gradient_checkpointing "
                           "recomputes: add --gradient_checkpointing")
    if config.memory_budget_gb is not None and config.gradient_checkpointing_blocks == "all":
        raise LorakitError(f"--memory_budget_gb {config.memory_budget_gb:g} chooses blocks to checkpoint; "
                           "--gradient_checkpointing_blocks all checkpoints every block: drop one")


def _check_loss(config: TrainConfig) -> None:
    if config.adaptive_noise_scale is not None and config.noise_offset is None:
        raise LorakitError("--adaptive_noise_scale adds to the noise offset: it needs --noise_offset")
    if config.scale_v_pred_loss_like_noise_pred and not config.v_parameterization:
        raise LorakitError("--scale_v_pred_loss_like_noise_pred needs --v_parameterization")
    if config.v_pred_like_loss is not None and config.v_parameterization:
        raise LorakitError("--v_pred_like_loss is for epsilon models: drop it or --v_parameterization")


def _check_caching(config: TrainConfig) -> None:
    if config.cache_text_encoder_outputs:
        if config.network_train_text_encoder_only:
            raise LorakitError("--cache_text_encoder_outputs freezes the text encoders, so "
                               "--network_train_text_encoder_only has nothing to train")
        for name in CAPTION_RANDOMISERS:
            if getattr(config, name):
                raise LorakitError(f"--{name} changes captions between steps, but --cache_text_encoder_outputs "
                                   "encodes each caption once: drop one of them")
    if config.cache_latents:
        for name in ("color_aug", "random_crop"):
            if getattr(config, name):
                raise LorakitError(f"--{name} changes images between steps, but --cache_latents encodes each "
                                   "image once: drop one of them")


def _check_network_and_optimizer(config: TrainConfig) -> None:
    if config.network_train_unet_only and config.network_train_text_encoder_only:
        raise LorakitError("--network_train_unet_only and --network_train_text_encoder_only together leave "
                           "nothing to train")
    if config.dim_from_weights and not config.network_weights:
        raise LorakitError("--dim_from_weights needs --network_weights to read the ranks from")
    if config.base_weights_multiplier is not None and len(config.base_weights_multiplier) != len(
            config.base_weights or ()):
        raise LorakitError(f"--base_weights_multiplier has {len(config.base_weights_multiplier)} values for "
                           f"{len(config.base_weights or ())} --base_weights files")
    if config.fused_backward_pass and config.gradient_accumulation_steps > 1:
        raise LorakitError(f"--fused_backward_pass steps each parameter as soon as its gradient is ready, so it "
                           f"cannot accumulate over --gradient_accumulation_steps {config.gradient_accumulation_steps}")
    ema_flags = [flag for flag, value in (("--ema_update_after_step", config.ema_update_after_step),
                                          ("--ema_update_every", config.ema_update_every != 1),
                                          ("--ema_on_cpu", config.ema_on_cpu),
                                          ("--sample_with_ema", config.sample_with_ema)) if value]
    if ema_flags and config.ema_decay is None:
        raise LorakitError(f"{ema_flags[0]} needs --ema_decay (the EMA's decay, e.g. 0.999)")
    if config.sample_with_ema and not config.sample_prompts:
        raise LorakitError("--sample_with_ema needs --sample_prompts (there are no samples to make)")
    if config.ema_decay is not None and "schedulefree" in (config.optimizer_type or "").lower():
        raise LorakitError(f"--ema_decay with {config.optimizer_type}: a schedule-free optimizer trains other weights "
                           "than it saves, so their average would be of neither; use another optimizer or no EMA")
    fixed = config.lr_scheduler_type or (config.lr_scheduler if config.lr_scheduler in ("constant", "adafactor")
                                         else None)
    if fixed and config.lr_warmup_steps:
        raise LorakitError(f"--lr_warmup_steps {config.lr_warmup_steps} is not used by {fixed}: use "
                           "--lr_scheduler constant_with_warmup, or drop the warm-up")


def config_to_metadata(config: TrainConfig) -> dict[str, str]:
    """Every non-secret flag as sd-scripts writes it into `ss_*` metadata: `str()` of the value (lists for list
    flags, `(W, H)` for the resolution, `None` when unset)."""
    return {flag.name: str(list(value) if flag.many and value is not None else value)
            for flag in iter_flags() if not flag.secret
            for value in (getattr(config, flag.name),)}
