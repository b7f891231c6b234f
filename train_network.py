"""sd-scripts' launch path for SD 1.x/2.x: `accelerate launch train_network.py ...` or `python train_network.py ...`
run lorakit's trainer with the same flags (`--v2` for SD 2.x)."""

import sys
from pathlib import Path

try:
    import lorakit  # noqa: F401
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from lorakit.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], prog="train_network.py", family="sd1"))
