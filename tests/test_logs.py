"""Training logs: moving average, sd-scripts' keys, TensorBoard event files, config sanitising, curve PNG."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lorakit.errors import LorakitError
from lorakit.train.logs import (
    CURVE_SIZE,
    MovingAverage,
    TrainingLog,
    epoch_logs,
    sanitized_config,
    step_logs,
    validation_logs,
    write_curves_png,
)


def test_moving_average_over_the_window() -> None:
    average = MovingAverage(window=3)
    assert math.isnan(average.average)
    assert [average.add(v) for v in (1, 2, 3, 10, 20)] == [1.0, 1.5, 2.0, 5.0, 11.0]
    assert len(average) == 3


def test_moving_average_matches_the_reference_ring_buffer() -> None:
    """sd-scripts' LossRecorder: epoch 0 appends, later epochs overwrite the value at the same step index."""
    steps_per_epoch, losses = 4, [0.9, 0.7, 0.8, 0.6, 0.5, 0.55, 0.4, 0.45, 0.3, 0.35]
    ring: list[float] = []
    average = MovingAverage(window=steps_per_epoch)
    for i, loss in enumerate(losses):
        epoch, step = divmod(i, steps_per_epoch)
        if epoch == 0:
            ring.append(loss)
        else:
            ring[step] = loss
        assert average.add(loss) == pytest.approx(sum(ring) / len(ring), abs=1e-12)


def test_moving_average_state_round_trip() -> None:
    first = MovingAverage(window=2)
    for v in (1.0, 2.0, 4.0):
        first.add(v)
    second = MovingAverage(window=99)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert second.add(8.0) == first.add(8.0) == 6.0


def test_log_records_use_the_reference_keys() -> None:
    logs = step_logs(0.5, 0.4, [1e-4, 2e-5], ["unet", "textencoder"],
                     param_groups=[{"lr": 1e-4, "d": 3.0}, {"lr": 2e-5}], max_norm=(7, 0.5, 1.25))
    assert logs == {"loss/current": 0.5, "loss/average": 0.4, "lr/unet": 1e-4, "lr/textencoder": 2e-5,
                    "lr/d*lr/unet": pytest.approx(3e-4), "max_norm/keys_scaled": 7.0,
                    "max_norm/max_key_norm": 1.25, "norm/avg_key_norm": 0.5}
    assert epoch_logs(0.3) == {"loss/epoch_average": 0.3}
    assert validation_logs("step", 0.6, 0.4) == {"loss/validation/step_average": 0.6,
                                                 "loss/validation/step_divergence": pytest.approx(0.2)}
    assert set(validation_logs("epoch", 0.6, 0.4)) == {"loss/validation/epoch_average",
                                                       "loss/validation/epoch_divergence"}


def test_sanitized_config_drops_paths_and_secrets() -> None:
    @dataclasses.dataclass
    class Config:
        pretrained_model_name_or_path: str = "/home/me/sdxl.safetensors"
        output_dir: str = "/home/me/out"
        dataset_config: str = "/home/me/data.toml"
        wandb_api_key: str = "secret"
        huggingface_token: str = "hf_secret"
        cache_dir: str = "/tmp/x"
        network_dim: int = 32
        learning_rate: float = 1e-4
        output_name: str = "my_lora"
        resolution: tuple = (1024, 1024)
        gradient_checkpointing: bool = True
        max_train_steps: int | None = None
        max_token_length: int = 225
        keep_tokens: int = 1

    clean = sanitized_config(Config())
    assert clean == {"network_dim": 32, "learning_rate": 1e-4, "output_name": "my_lora",
                     "resolution": "(1024, 1024)", "gradient_checkpointing": True, "max_train_steps": None,
                     "max_token_length": 225, "keep_tokens": 1}


def test_tensorboard_event_file_has_the_keys(tmp_path) -> None:
    log = TrainingLog(logging_dir=tmp_path, log_prefix="run_", tracker_name="mine",
                      config={"network_dim": 8, "learning_rate": 1e-4})
    average = MovingAverage(window=2)
    for step, loss in enumerate([0.5, 0.4, 0.3, 0.2], start=1):
        log.log(step_logs(loss, average.add(loss), [1e-4, 5e-5], ["unet", "textencoder"]), step)
        if step % 2 == 0:
            log.log(epoch_logs(average.average), step)
            log.log(validation_logs("epoch", 0.45, average.average), step)
    log.close()

    assert re.fullmatch(r"run_\d{14}", log.run_dir.parent.name) and log.run_dir.name == "mine"
    assert log.run_dir.parent.parent == tmp_path
    (event_file,) = log.run_dir.glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {
        "loss/current", "loss/average", "loss/epoch_average", "lr/unet", "lr/textencoder",
        "loss/validation/epoch_average", "loss/validation/epoch_divergence"}
    current = events.Scalars("loss/current")
    assert [(e.step, round(e.value, 6)) for e in current] == [(1, 0.5), (2, 0.4), (3, 0.3), (4, 0.2)]
    assert [round(e.value, 6) for e in events.Scalars("loss/average")] == [0.5, 0.45, 0.35, 0.25]
    assert [e.step for e in events.Scalars("loss/epoch_average")] == [2, 4]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"network_dim": 8' in config_text
    assert [v for _, v in log.history["loss/current"]] == [0.5, 0.4, 0.3, 0.2]


def test_no_logging_dir_means_no_tracker_and_other_processes_record_nothing(tmp_path) -> None:
    quiet = TrainingLog()
    quiet.log({"loss/current": 1.0}, 1)
    assert quiet.run_dir is None and quiet.history == {"loss/current": [(1, 1.0)]}
    other_rank = TrainingLog(logging_dir=tmp_path, enabled=False)
    other_rank.log({"loss/current": 1.0}, 1)
    assert other_rank.history == {} and list(tmp_path.iterdir()) == []
    assert other_rank.write_curves(tmp_path / "c.png") is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"log_with": "tensorboard"}, "need --logging_dir"),
    ({"log_with": "mlflow", "logging_dir": "x"}, "--log_with is 'mlflow'"),
    ({"logging_dir": "x", "init_kwargs": {"tensorboard": {"colour": 1}}}, r"\[tensorboard\]"),
])
def test_bad_tracker_settings(tmp_path, kwargs, message) -> None:
    if "logging_dir" in kwargs:
        kwargs["logging_dir"] = tmp_path
    with pytest.raises(LorakitError, match=message):
        TrainingLog(**kwargs)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_names_the_extra(tmp_path) -> None:
    with pytest.raises(LorakitError, match=r"pip install 'lorakit\[wandb\]'"):
        TrainingLog(logging_dir=tmp_path, log_with="all")


def test_from_config_reads_the_logging_flags(tmp_path) -> None:
    @dataclasses.dataclass
    class Config:
        logging_dir: str = str(tmp_path / "logs")
        log_with: str | None = None
        log_prefix: str | None = "p_"
        log_tracker_name: str | None = None
        log_tracker_config: str | None = str(tmp_path / "trackers.toml")
        wandb_run_name: str | None = None
        wandb_api_key: str | None = "secret"
        log_config: bool = True

    (tmp_path / "trackers.toml").write_text("[tensorboard]\nflush_secs = 5\n")
    log = TrainingLog.from_config(Config())
    log.close()
    assert log.run_dir.name == "network_train" and log.run_dir.parent.name.startswith("p_")
    (tmp_path / "trackers.toml").write_text("[mlflow]\nx = 1\n")
    with pytest.raises(LorakitError, match="trackers.toml: key 'mlflow'"):
        TrainingLog.from_config(Config())


def test_curve_png(tmp_path) -> None:
    history = {
        "loss/current": [(s, 0.2 + 0.1 * math.sin(s / 3) + 0.5 / s) for s in range(1, 201)],
        "loss/average": [(s, 0.2 + 0.5 / s) for s in range(1, 201)],
        "loss/epoch_average": [(s, 0.2 + 0.5 / s) for s in range(50, 201, 50)],
        "loss/validation/epoch_average": [(s, 0.25 + 0.5 / s) for s in range(50, 201, 50)],
        "lr/unet": [(s, 1e-4 * min(1.0, s / 20)) for s in range(1, 201)],
        "lr/textencoder": [(s, 1e-5) for s in range(1, 201)],
        "loss/nan": [(1, float("nan"))],
    }
    path = tmp_path / "curves.png"
    write_curves_png(history, path)
    image = Image.open(path)
    assert image.format == "PNG" and image.size == CURVE_SIZE
    # Each loss series with values has its own colour (the lr panel reuses the first ones).
    colours = {pixel for pixel in image.convert("RGB").getdata() if len(set(pixel)) > 1}
    assert len(colours) == 4


def test_curve_png_with_a_single_point_and_an_empty_panel(tmp_path) -> None:
    write_curves_png({"loss/current": [(1, 0.5)]}, tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").size == CURVE_SIZE
