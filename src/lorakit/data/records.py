"""One training image as the rest of lorakit sees it, and the records of one dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.data.config import DatasetSettings, SubsetSettings


@dataclass(frozen=True)
class ImageRecord:
    """An image with everything needed to bucket, caption and weigh it."""

    path: Path
    caption: str  # raw caption text (caption file, metadata or class tokens); processed per draw by captions.py
    size: tuple[int, int]  # (width, height) as displayed (EXIF orientation applied), or from fine-tuning metadata
    subset: SubsetSettings
    num_repeats: int  # after regularisation balancing; 1 for validation records
    is_reg: bool
    loss_weight: float  # --prior_loss_weight for regularisation images, else 1.0
    mask_path: Path | None = None  # masked-loss mask (conditioning_data_dir) of the same stem
    alpha_mask: bool = False  # use the image's alpha channel as the loss mask


@dataclass(frozen=True)
class DatasetRecords:
    """A dataset's resolved settings and its records: training (reg included, balanced) and validation."""

    settings: DatasetSettings
    train: tuple[ImageRecord, ...]
    validation: tuple[ImageRecord, ...]
    reg_images: int = 0  # regularisation images found (before balancing), for the summary
    reg_samples_before_balancing: int = 0  # reg images x their own repeats (sd-scripts' "num reg images")

    @property
    def train_samples(self) -> int:
        """Training images x repeats, regularisation excluded (sd-scripts' "num train images * repeats")."""
        return sum(record.num_repeats for record in self.train if not record.is_reg)

    @property
    def reg_samples(self) -> int:
        return sum(record.num_repeats for record in self.train if record.is_reg)
