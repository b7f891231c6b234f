"""The generated bad, odd and good inputs of `tests/bad_inputs.py`: every bad one refused in one line naming its
culprit, every good one accepted, no traceback, no hang, no pickle payload run, nothing written by a dry run."""

from __future__ import annotations

import pytest

import bad_inputs


@pytest.mark.slow
def test_every_generated_input(tiny_single_file, tiny_diffusers_dir, tmp_path, fresh_accelerate_state):
    world = bad_inputs.build_world(tmp_path / "world", tiny_single_file, tiny_diffusers_dir)
    generated = bad_inputs.cases(world)
    assert len(generated) > 700 and {case.category for case in generated} >= {
        "flags", "config_file", "dataset_toml", "paths", "images", "text_files", "checkpoints", "lora_files",
        "arguments", "families", "states", "good"}
    outcomes = bad_inputs.run_all(world, generated)
    report = bad_inputs.summary(outcomes)
    (tmp_path / "summary.txt").write_text(report)
    assert not [outcome for outcome in outcomes if outcome.problem], report
