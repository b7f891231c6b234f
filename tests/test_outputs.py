
import pytest

from lorakit.train.outputs import (
    OutputNames,
    last_epoch_to_remove,
    last_step_to_remove,
    prune,
    save_every_n_epochs_from_ratio,
    should_save_epoch,
    should_save_step,
)


def test_names_match_sd_scripts(tmp_path):
    names = OutputNames(tmp_path, "my_sdxl_lora")
    assert names.epoch_file(1).name == "my_sdxl_lora-000001.safetensors"
    assert names.step_file(500).name == "my_sdxl_lora-step00000500.safetensors"
    assert names.final_file().name == "my_sdxl_lora.safetensors"
    assert names.state_dir(names.epoch_file(3)).name == "my_sdxl_lora-000003-state"
    assert names.state_dir(names.final_file()).name == "my_sdxl_lora-state"


def test_default_names_without_output_name(tmp_path):
    names = OutputNames(tmp_path, None, "ckpt")
    assert names.epoch_file(2).name == "epoch-000002.ckpt"
    assert names.step_file(7).name == "at-step00000007.ckpt"
    assert names.final_file().name == "last.ckpt"
    assert names.state_dir(names.final_file()).name == "last-state"


@pytest.mark.parametrize(
    "epoch, num_epochs, every, expected",
    [(1, 10, 1, True), (10, 10, 1, False), (2, 10, 2, True), (3, 10, 2, False), (4, 10, None, False)],
)
def test_epoch_cadence_skips_the_last_epoch(epoch, num_epochs, every, expected):
    assert should_save_epoch(epoch, num_epochs, every) is expected


def test_step_cadence():
    assert [s for s in range(1, 11) if should_save_step(s, 4)] == [4, 8]
    assert not should_save_step(4, None)


def test_ratio():
    assert save_every_n_epochs_from_ratio(10, 3) == 3
    assert save_every_n_epochs_from_ratio(2, 5) == 1


def test_rotation_thresholds_match_sd_scripts():
    # --save_every_n_epochs 2 --save_last_n_epochs 2: after epoch 8, epoch 4 (and older) goes.
    assert last_epoch_to_remove(8, 2, 2) == 4
    # --save_every_n_steps 100 --save_last_n_steps 200: after step 500 the file of step 200 goes (keeps 300..500).
    assert last_step_to_remove(500, 100, 200) == 200
    assert last_step_to_remove(500, 100, None) is None


def test_prune_removes_old_files_and_their_states(tmp_path):
    names = OutputNames(tmp_path, "lora")
    for epoch in (2, 4, 6, 8):
        names.epoch_file(epoch).write_bytes(b"x")
        names.state_dir(names.epoch_file(epoch)).mkdir()
    (tmp_path / "lora-000004.safetensors.bak").write_bytes(b"not ours")
    removed = prune(names.epoch_files(), last_epoch_to_remove(8, 2, 2), names, with_states=True)
    assert [p.name for p in removed] == ["lora-000002.safetensors", "lora-000004.safetensors"]
    assert sorted(names.epoch_files()) == [6, 8]
    assert not names.state_dir(names.epoch_file(4)).exists()
    assert names.state_dir(names.epoch_file(6)).exists()
    assert (tmp_path / "lora-000004.safetensors.bak").exists()
