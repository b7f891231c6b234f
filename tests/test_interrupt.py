"""Interruption, as a user meets it: `lorakit train` in a subprocess gets SIGINT mid-training, saves a LoRA and a
complete state, prints the resume command and exits 130; running that command ends bit-identical to an
uninterrupted run. A process SIGKILLed while writing a state leaves the previous state intact and no folder that
--resume accepts. Low disk space is one line before anything is written."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.testing.datasets import write_dataset_toml, write_image_folder
from lorakit.train.interrupt import resume_command
from lorakit.train.state import MARKER, check_free_space, complete_states, read_state

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS = 30


@pytest.fixture(scope="module")
def command(tiny_single_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("interrupt")
    write_image_folder(folder / "img", 6)
    dataset = write_dataset_toml(folder / "dataset.toml", folder / "img", resolution=96,
                                 extra_subset="  shuffle_caption = true\n")

    def command(output: Path) -> list[str]:
        return [sys.executable, "-m", "lorakit", "train", "--pretrained_model_name_or_path", str(tiny_single_file),
                "--dataset_config", str(dataset), "--output_dir", str(output), "--output_name", "lora",
                "--max_data_loader_n_workers", "0", "--seed", "3", "--network_dim", "4", "--network_train_unet_only",
                "--cache_latents", "--learning_rate", "1e-3", "--max_train_steps", str(STEPS),
                "--save_every_n_steps", "2"]

    return command


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(command, tmp_path_factory) -> dict[str, torch.Tensor]:
    output = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(command(output), env=ENV, check=True, capture_output=True)
    return load_file(output / "lora.safetensors")


def default_workers(words: list[str]) -> list[str]:
    """The command without --max_data_loader_n_workers 0: the run forks its default data loader workers."""
    index = words.index("--max_data_loader_n_workers")
    return words[:index] + words[index + 2:]


def interrupt_and_resume(words: list[str], output: Path, send) -> dict[str, torch.Tensor]:
    """Start the run in a session of its own, `send(process)` once the step-2 LoRA exists, check what the
    interruption left (exit 130, one complete state, its LoRA, the resume command) and run that command."""
    process = subprocess.Popen(words, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    wait_for(output / "lora-step00000002.safetensors", process)
    send(process)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "error" not in stderr, stderr[-2000:]

    states = complete_states(output)
    assert len(states) == 1, sorted(p.name for p in output.iterdir())
    state, step = next(iter(states.items()))
    assert 2 <= step < STEPS and state.name == f"lora-step{step:08d}-state"
    assert (output / f"lora-step{step:08d}.safetensors").is_file()
    assert not (output / "lora.safetensors").exists()
    resume = stdout.split("resume with:\n", 1)[1].strip()
    assert resume == shlex.join(words + ["--resume", str(state)])
    subprocess.run(shlex.split(resume), env=ENV, check=True, capture_output=True)
    return load_file(output / "lora.safetensors")


def assert_same(expected: dict[str, torch.Tensor], resumed: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


@pytest.mark.slow
def test_sigint_saves_a_state_prints_the_resume_command_and_resuming_matches(command, uninterrupted, tmp_path):
    output = tmp_path / "interrupted"
    assert_same(uninterrupted, interrupt_and_resume(command(output), output,
                                                    lambda process: process.send_signal(signal.SIGINT)))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_the_whole_process_group_saves_like_ctrl_c(command, uninterrupted, tmp_path, signum):
    """What `timeout`, Slurm and supervisors do: the signal reaches the data loader workers too. They keep serving
    batches until the step is saved, and the resumed run (workers again) ends where the uninterrupted one did."""
    output = tmp_path / "interrupted"
    words = default_workers(command(output))

    def signal_the_group(process: subprocess.Popen) -> None:
        assert psutil.Process(process.pid).children(), "the run has no data loader worker processes"
        os.killpg(process.pid, signum)

    assert_same(uninterrupted, interrupt_and_resume(words, output, signal_the_group))


KILLED_WRITER = """
import sys, torch
from pathlib import Path
from torch.optim.lr_scheduler import LambdaLR
from lorakit.train.state import rng_json, write_state

network = torch.nn.Linear(8192, int(sys.argv[2]), bias=False)
optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
write_state(Path(sys.argv[1]), network=network, optimizer=optimizer, lr_scheduler=LambdaLR(optimizer, lambda _: 1),
            rng=[rng_json()], progress={"global_step": int(sys.argv[3]), "epoch": 1})
"""


def test_sigkill_while_writing_a_state_keeps_the_previous_one(tmp_path):
    """A state rewritten under the same name (as the final state is) and killed mid-write: the old folder is
    untouched and complete, the partial one is hidden and has no marker."""
    state = tmp_path / "lora-state"
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(state), "8", "7"], env=ENV, check=True)
    before = {p.name: p.read_bytes() for p in state.iterdir()}

    # 8192 x 16384 fp32 = 512 MiB of network weights: the write takes long enough to be caught in the act.
    process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(state), "16384", "9"], env=ENV)
    deadline = time.monotonic() + 120
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".") and any(p.iterdir())]:
        assert process.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()

    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    assert read_state(state).global_step == 7
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert partial and not (partial[0] / MARKER).exists()
    assert complete_states(tmp_path) == {state: 7}
    with pytest.raises(LorakitError, match="incomplete"):
        read_state(partial[0])


def test_low_disk_space_is_one_line(tmp_path):
    with pytest.raises(LorakitError) as error:
        check_free_space(tmp_path, 2**62, "lora.safetensors and its state")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message and "MiB free" in message and "kept" in message
    check_free_space(tmp_path, 1024, "a small file")


def test_resume_command_keeps_the_command_line_and_replaces_an_earlier_resume():
    argv = ["/x/lorakit/__main__.py", "train", "--output_dir", "out dir", "--resume", "old", "--seed=1"]
    assert resume_command(argv, "out dir/a-state", executable="py") == \
        "py -m lorakit train --output_dir 'out dir' --seed=1 --resume 'out dir/a-state'"
    assert resume_command(["sdxl_train_network.py", "--resume=old"], "s", executable="py") == \
        "py sdxl_train_network.py --resume s"
    assert json.dumps(resume_command(["lorakit", "train"], "s")) == '"lorakit train --resume s"'


def test_second_sigint_exits_at_once_leaving_only_complete_files(command, tmp_path):
    output = tmp_path / "twice"
    process = subprocess.Popen(command(output), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(output / "lora-step00000002.safetensors", process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode == 130
    for path in output.glob("*.safetensors"):
        assert load_file(path)  # every visible LoRA file is whole, whichever signal won the race
    for folder in output.glob("*-state"):
        read_state(folder)  # every visible state folder is complete


def test_second_signal_exits_at_once():
    """Deterministic half of the test above: the second signal ends the process inside the handler."""
    script = (
        "import os, signal, time\n"
        "from lorakit.train.interrupt import StopRequest\n"
        "with StopRequest() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert stop.requested\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 130
    assert "SIGINT again: stopping now" in result.stderr
