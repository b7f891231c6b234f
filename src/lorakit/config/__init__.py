"""The training configuration: one flag table (TrainConfig) from which the parser, `--help`, docs/flags.md,
`--config_file` handling and the metadata strings are generated. Imports no torch.

Bad input raises LorakitError (one line). Adjustments the user should know about are one warning line each on
a `logging.getLogger(__name__)` logger, i.e. under "lorakit"; the training entry point sets the "lorakit"
logger's handler and level from --console_log_level/--console_log_file/--console_log_simple.
"""

from lorakit.config.flags import Flag, Group
from lorakit.config.parse import (build_parser, config_to_metadata, parse_train_args, read_config_file,
                                  write_config_file)
from lorakit.config.train_config import TrainConfig, iter_flags

__all__ = ["Flag", "Group", "TrainConfig", "build_parser", "config_to_metadata", "iter_flags", "parse_train_args",
           "read_config_file", "write_config_file"]
