"""What a lorakit command prints besides its results: lorakit's own log lines, the libraries' warnings, and none
of the notices lorakit knows to be harmless for what it does (they would hide the warnings that matter)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.fileio import describe_os_error

# logger name -> the start of messages that say nothing about a lorakit run
KNOWN_HARMLESS = {
    # transformers falls back to PIL image processors without torchvision; lorakit uses no image processor.
    "transformers.utils.import_utils": ("`CLIPImageProcessor` requires torchvision",
                                        "`SiglipImageProcessor` requires torchvision"),
    # bitsandbytes looks for a 4-bit matrix-product kernel on the hub when imported on AVX-512 BF16 CPUs; lorakit
    # uses no 4-bit layer (its 8-bit optimizers do not need it).
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
}


class _DropKnownHarmless(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_libraries() -> None:
    """Drop the known-harmless notices (call before the libraries are imported; idempotent)."""
    for name, starts in KNOWN_HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownHarmless) for f in logger.filters):
            logger.addFilter(_DropKnownHarmless(starts))


def configure_logging(level: str | None, file: str | None, simple: bool) -> None:
    """--console_log_level / --console_log_file / --console_log_simple for lorakit's (and the libraries') logs."""
    quiet_libraries()
    handler = _file_handler(file) if file else logging.StreamHandler(sys.stderr)
    layout = "%(message)s" if simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(layout, "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("lorakit").setLevel(level or "INFO")


def _file_handler(path: str) -> logging.FileHandler:
    """--console_log_file: appended to, its folder created when missing (as --output_dir is)."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return logging.FileHandler(path, encoding="utf-8")
    except OSError as error:
        raise LorakitError(f"--console_log_file {path}: cannot write it ({describe_os_error(error)})") from None
