"""What a run form's datasets and inputs look like before anything is queued: the buckets with their images and
captions, repeats and regularisation balance, every warning the dataset checks give, and the whole dry run
(`lorakit train --dry_run`: the model, network, optimizer and memory checks, the CPU/GPU note)."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError, one_line

DRY_RUN_SECONDS = 600
IMAGES_PER_BUCKET = 8


def dataset_preview(argv: list[str]) -> dict[str, Any]:
    """The datasets of a command line as training would see them: per dataset its summary and buckets (size,
    samples, the first images with their captions and repeats), and the warnings; `error` when one stops it."""
    from lorakit.config import parse_train_args
    from lorakit.data.dataset import TrainingData
    from lorakit.data.discovery import load_datasets
    from lorakit.data.summary import dataset_summary
    from lorakit.families import family_named
    from lorakit.ui.form import WarningLines

    collect = WarningLines()
    logger = logging.getLogger("lorakit")
    logger.addHandler(collect)
    try:
        config = parse_train_args(argv, prog="sdxl_train_network.py")
        family = family_named(config.model_family)
        datasets = load_datasets(dataclasses.asdict(config), bucket_multiple=family.bucket_multiple)
        data = TrainingData(datasets, config.seed or 0)
    except LorakitError as error:
        return {"error": one_line(error), "warnings": collect.lines, "datasets": []}
    finally:
        logger.removeHandler(collect)
    result = []
    for index, dataset in enumerate(datasets):
        buckets = []
        for (width, height), members in sorted(data.bucket_members(index).items()):
            unique = list({id(sample): sample for sample in members}.values())
            buckets.append({
                "size": f"{width}x{height}", "samples": len(members), "images": len(unique),
                "examples": [{"path": str(sample.record.path.absolute()), "caption": sample.record.caption,
                              "repeats": sample.record.num_repeats, "is_reg": sample.record.is_reg}
                             for sample in unique[:IMAGES_PER_BUCKET]],
            })
        result.append({"table": dataset.settings.table, "summary": dataset_summary([dataset],
                                                                               [data.bucket_counts(index)]),
                       "buckets": buckets,
                       "image_dirs": sorted({str(Path(s.image_dir).absolute()) for s in dataset.settings.subsets
                                             if s.image_dir is not None})})
    return {"error": None, "warnings": collect.lines, "datasets": result}


def dry_run(argv: list[str], root: Path) -> dict[str, Any]:
    """`lorakit train <argv> --dry_run` in `root`: its exit code and its output lines (progress bars dropped)."""
    command = [sys.executable, "-m", "lorakit", "train", *argv, "--dry_run"]
    try:
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=DRY_RUN_SECONDS,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    except subprocess.TimeoutExpired:
        return {"code": None, "lines": [f"the dry run took more than {DRY_RUN_SECONDS} s and was stopped"]}
    lines = [line.rsplit("\r", 1)[-1] for line in (done.stdout + done.stderr).splitlines()]
    return {"code": done.returncode, "lines": [line for line in lines if line.strip()]}
