"""sd-scripts' launch path: `accelerate launch sdxl_train_network.py ...` or `python sdxl_train_network.py ...`
run lorakit's trainer with the same flags."""

import sys
from pathlib import Path

try:
    import lorakit  # noqa: F401
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from lorakit.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], prog="sdxl_train_network.py"))
