"""`lorakit ui` over HTTP (Starlette's test client, the real app and the real supervisor): the run form round-trips
every flag of the table, path traversal, a missing token, a foreign Host and a missing CSRF token are refused, the
queue runs tiny runs in order, reconciles a run killed with SIGKILL (Resume continues it from its last state), and
a restarted server finds a run that kept training."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

import bad_inputs  # noqa: E402
from lorakit.config import parse_train_args  # noqa: E402
from lorakit.config.parse import command_line_values  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402
from lorakit.testing.datasets import write_dataset_toml, write_image_folder  # noqa: E402
from lorakit.ui import form as run_form  # noqa: E402
from lorakit.ui.app import create_app  # noqa: E402
from lorakit.ui.store import Store  # noqa: E402
from lorakit.ui.supervisor import Supervisor  # noqa: E402

RUN_SECONDS = 240


def client_of(app, **kwargs) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1:7860", **kwargs)


def csrf_of(client: TestClient) -> str:
    page = client.get("/new").text
    return page.split('name="csrf" content="', 1)[1].split('"', 1)[0]


@pytest.fixture
def world(tmp_path, tiny_single_file, tiny_diffusers_dir):
    return bad_inputs.build_world(tmp_path / "world", tiny_single_file, tiny_diffusers_dir)


# Values for the flags whose generic good value (tests/bad_inputs.py) does not fit; parsing reads no file, so any
# path will do, and partners satisfy the rules between flags.
ROUND_TRIP_WORDS = {
    "base_weights": ["a.safetensors", "b.safetensors"],
    "base_weights_multiplier": ["0.5", "1", "--base_weights", "a.safetensors", "b.safetensors"],
    "in_json": ["meta.json", "--resolution", "64"], "train_data_dir": ["images", "--resolution", "64"],
    "reg_data_dir": ["reg", "--train_data_dir", "images", "--resolution", "64"],
    "network_weights": ["lora.safetensors"], "dim_from_weights": ["--network_weights", "lora.safetensors"],
    "resume": ["state"], "vae": ["vae.safetensors"], "sample_prompts": ["prompts.txt"], "logging_dir": ["logs"],
    "log_tracker_config": ["trackers.toml", "--logging_dir", "logs"], "console_log_file": ["console.log"],
    "tokenizer_cache_dir": ["tokenizers"], "conditioning_data_dir": ["masks"], "metadata_thumbnail": ["t.png"],
    "mixed_precision": ["bf16"], "full_fp16": ["--mixed_precision", "fp16"], "wandb_api_key": ["secret-key"],
    "wandb_run_name": ["my run"], "token_warmup_step": ["3"], "caption_dropout_rate": ["0.1"],
    "caption_tag_dropout_rate": ["0.1"], "sample_with_ema": ["--ema_decay", "0.99", "--sample_prompts", "prompts.txt"],
}


def round_trip_words(flag) -> list[str]:
    """A good value of `flag` as command-line words (with the flags it needs)."""
    if flag.name in ROUND_TRIP_WORDS:
        words = ROUND_TRIP_WORDS[flag.name]
        return [flag.option, *words] if not flag.is_switch or flag.name == "dim_from_weights" else [*words,
                                                                                                    flag.option]
    partners = [word.replace("LOGS", "logs") for word in bad_inputs.PARTNERS.get(flag.name, [])]
    if flag.is_switch:
        return [*partners, flag.option]
    return [*partners, flag.option, *bad_inputs.GOOD_VALUES.get(flag.name, [bad_inputs._good_word(flag)])]


def test_form_round_trips_every_flag(tmp_path):
    """For every flag: the command line as form fields → the page's TOML → the TrainConfig parsed from it equals
    the command line's; a refused flag is refused by the page with the command line's own line."""
    base = ["--pretrained_model_name_or_path=model.safetensors", "--dataset_config=dataset.toml"]
    app = create_app(tmp_path, supervise=False)
    checked = set()
    with client_of(app) as client:
        csrf = csrf_of(client)
        for flag in run_form.iter_flags():
            if flag.refused or flag.name in run_form.NOT_IN_FORM:
                continue
            argv = [*base, *round_trip_words(flag)]
            expected = parse_train_args(argv)
            fields = run_form.form_of_values(command_line_values(argv))
            response = client.post("/api/form", data={**fields, "csrf": csrf}).json()
            assert response["error"] is None, (flag.name, response["error"])
            toml = tmp_path / f"{flag.name}.toml"
            toml.write_text(response["toml"])
            # Secrets travel as environment variables, which the libraries read instead of the flag.
            flag_of = {variable: name for name, variable in run_form.SECRET_ENVIRONMENT.items()}
            secrets = [f"--{flag_of[variable]}={value}" for variable, value in
                       run_form.secret_environment(run_form.argv_of_form(fields)).items()]
            parsed = parse_train_args(["--config_file", str(toml), *secrets])
            assert dataclasses.replace(parsed, config_file=None) == expected, flag.name
            assert response["command"].startswith("sdxl_train_network.py ")
            checked.add(flag.name)
        for flag in run_form.iter_flags():
            if not flag.refused or flag.name in run_form.NOT_IN_FORM:
                continue
            value = "on" if flag.is_switch else str(next((c for c in flag.choices if c != flag.default), "x")
                                                    if flag.choices else "1,2")
            argv = run_form.argv_of_form({flag.name: value})
            with pytest.raises(LorakitError) as refused:
                parse_train_args(argv)
            response = client.post("/api/form", data={flag.name: value, "csrf": csrf}).json()
            assert response["error"] == str(refused.value) and flag.option in response["error"]
            checked.add(flag.name)
    assert checked == {flag.name for flag in run_form.iter_flags() if flag.name not in run_form.NOT_IN_FORM}


def test_import_of_an_sd_scripts_command_and_of_a_toml(world, tmp_path):
    command = (f"accelerate launch --num_cpu_threads_per_process 1 sdxl_train_network.py \\\n"
               f"  --pretrained_model_name_or_path={world.model} --dataset_config={world.dataset} \\\n"
               "  --network_dim=32 --network_alpha=16 --text_encoder_lr1=1e-5 --gradient_checkpointing")
    values = run_form.import_command(command, tmp_path)
    assert (values["network_dim"], values["network_alpha"], values["text_encoder_lr1"]) == (32, 16.0, 1e-5)
    assert values["gradient_checkpointing"] is True
    fields = run_form.form_of_values(values)
    argv = run_form.argv_of_form(fields)
    assert parse_train_args(argv) == parse_train_args(command.split("sdxl_train_network.py")[1].replace("\\\n", "")
                                                      .split())
    toml = run_form.toml_of(argv)
    assert run_form.import_toml(toml) == command_line_values(argv)


def test_files_outside_the_root_and_the_runs_are_refused(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.txt").write_text("ok")
    (tmp_path / "secret.txt").write_text("secret")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    app = create_app(root, supervise=False)
    with client_of(app) as client:
        assert client.get("/files", params={"path": "sub/ok.txt"}).text == "ok"
        for path in ("../secret.txt", str(tmp_path / "secret.txt"), "sub/../../secret.txt", "link.txt",
                     "/etc/passwd"):
            assert client.get("/files", params={"path": path}).status_code == 403, path
        assert client.get("/thumb", params={"path": "../secret.txt"}).status_code == 403
        assert client.get("/datasets", params={"path": "../secret.txt"}).status_code == 403
        # A page under the root never runs as this server's page: it is a download, sandboxed, not sniffed.
        (root / "page.html").write_text("<script>fetch('/')</script>")
        served = client.get("/files", params={"path": "page.html"})
        assert served.headers["content-disposition"].startswith("attachment")
        assert served.headers["content-type"] == "application/octet-stream"
        assert served.headers["x-content-type-options"] == "nosniff" and "sandbox" in served.headers[
            "content-security-policy"]
        assert client.get("/thumb", params={"path": "sub/ok.txt"}).status_code == 415  # not an image: no 500
        (root / "latin1.toml").write_bytes(b"caption = \"caf\xe9\"")
        assert client.get("/datasets", params={"path": "latin1.toml"}).status_code == 400


def test_token_host_and_csrf(tmp_path):
    app = create_app(tmp_path, token="sesame", hosts=None, supervise=False)
    with client_of(app, follow_redirects=False) as client:
        assert client.get("/").status_code == 401
        assert client.get("/files", params={"path": "x"}).status_code == 401
        assert client.get("/", params={"token": "wrong"}).status_code == 401
        assert client.get("/", params={"token": "sésame"}).status_code == 401  # not ASCII: refused, not a 500
        entry = client.get("/", params={"token": "sesame"})
        assert entry.status_code == 303 and "token" not in entry.headers["location"]
        assert client.get("/").status_code == 200  # the cookie now
    with client_of(app) as other:
        assert other.get("/", headers={"Authorization": "Bearer sesame"}).status_code == 200
    loopback = create_app(tmp_path, supervise=False)
    with client_of(loopback) as client:
        assert client.get("/", headers={"Host": "attacker.example"}).status_code == 421
        assert client.post("/runs/1/stop", data={}).status_code == 403  # no CSRF token
        csrf = csrf_of(client)
        assert client.post("/runs/1/stop", data={"csrf": csrf},
                           headers={"Origin": "http://attacker.example"}).status_code == 403
        assert client.post("/api/form", data={"csrf": csrf}).status_code == 200


# ---------------------------------------------------------------------------------------------- the queue


@pytest.fixture
def tiny_project(tmp_path, tiny_single_file):
    """A root folder with images, a dataset TOML and the tiny model, as a user's project."""
    root = tmp_path / "project"
    write_image_folder(root / "img", count=4, sizes=((64, 64),))
    write_dataset_toml(root / "dataset.toml", root / "img", resolution=64)
    os.symlink(tiny_single_file, root / "model.safetensors")
    return root


def form_fields(steps: int, name: str, **extra: str) -> dict[str, str]:
    return {"pretrained_model_name_or_path": "model.safetensors", "dataset_config": "dataset.toml",
            "output_dir": "out", "output_name": name, "network_dim": "4", "max_train_steps": str(steps),
            "learning_rate": "1e-3", "cache_latents": "on", "cache_text_encoder_outputs": "on",
            "max_data_loader_n_workers": "0", "seed": "1", **extra}


def wait_for(predicate, what: str, seconds: float = RUN_SECONDS):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_queued_runs_move_cancel_and_duplicate(tiny_project, monkeypatch):
    monkeypatch.chdir(tiny_project)
    app = create_app(tiny_project, supervise=False)  # nothing starts: the queue stays as the clicks leave it
    with client_of(app) as client:
        csrf = csrf_of(client)
        for name in ("a", "b", "c"):
            client.post("/new", data={**form_fields(3, name), "action": "queue", "csrf": csrf})
        store: Store = app.app.state.store
        client.post("/runs/3/move", data={"csrf": csrf, "offset": "-1"})
        assert [run.name for run in store.runs(["queued"])] == ["a", "c", "b"]
        client.post("/runs/1/move", data={"csrf": csrf, "offset": "-1"})  # already first: nothing moves
        for _ in range(2):  # a double click cancels once
            client.post("/runs/2/stop", data={"csrf": csrf})
        assert store.get(2).status == "cancelled" and store.get(2).message == "cancelled before it started"
        assert [run.name for run in store.runs(["queued"])] == ["a", "c"]
        duplicate = client.get("/new?from=3").text
        assert 'name="output_name" value="c"' in duplicate and 'name="max_train_steps" value="3"' in duplicate


def test_secret_flags_reach_the_run_only_through_its_environment(tiny_project, monkeypatch):
    monkeypatch.chdir(tiny_project)
    app = create_app(tiny_project, supervise=False)
    with client_of(app) as client:
        csrf = csrf_of(client)
        client.post("/new", data={**form_fields(3, "secret", wandb_api_key="s3cret-key"), "action": "queue",
                                  "csrf": csrf})
        run = app.app.state.store.get(1)
        assert "s3cret-key" not in run.command and "--wandb_api_key=***" in run.command
        assert "s3cret-key" not in " ".join(run.argv) and "s3cret-key" not in run.config_path.read_text()
        secrets_file = run.folder / "secrets.json"
        assert oct(secrets_file.stat().st_mode & 0o777) == "0o600"
        assert json.loads(secrets_file.read_text()) == {"WANDB_API_KEY": "s3cret-key"}
        assert client.get("/files", params={"path": str(secrets_file)}).status_code == 403
        assert "s3cret-key" not in client.get("/runs/1").text + client.get("/api/runs").text


def test_two_queued_runs_run_in_order(tiny_project, monkeypatch):
    monkeypatch.chdir(tiny_project)  # as `lorakit ui --root` does
    app = create_app(tiny_project)
    with client_of(app) as client:
        csrf = csrf_of(client)
        first = client.post("/new", data={**form_fields(3, "first"), "action": "queue", "csrf": csrf})
        second = client.post("/new", data={**form_fields(3, "second"), "action": "queue", "csrf": csrf})
        assert first.url.path == "/runs/1" and second.url.path == "/runs/2"
        store: Store = app.app.state.store
        wait_for(lambda: all(run.status in ("finished", "failed") for run in store.runs()), "both runs")
        runs = store.runs()
        assert [run.status for run in runs] == ["finished", "finished"], [run.message for run in runs]
        assert runs[0].ended <= runs[1].started  # one at a time, in queue order
        assert (tiny_project / "out" / "first.safetensors").is_file()
        assert (tiny_project / "out" / "second.safetensors").is_file()
        assert "first" in client.get("/").text and client.get("/runs/2").status_code == 200


def test_a_run_killed_with_sigkill_is_marked_interrupted_and_resumes_from_its_last_state(tiny_project,
                                                                                         monkeypatch):
    monkeypatch.chdir(tiny_project)
    app = create_app(tiny_project)
    with client_of(app) as client:
        csrf = csrf_of(client)
        fields = form_fields(60, "killed", save_every_n_steps="3", save_state="on")
        client.post("/new", data={**fields, "action": "queue", "csrf": csrf})
        store: Store = app.app.state.store
        wait_for(lambda: list((tiny_project / "out").glob("killed-step*-state")), "a saved state")
        run = store.get(1)
        os.killpg(run.pid, signal.SIGKILL)
        wait_for(lambda: store.get(1).status == "interrupted", "the run to be marked interrupted", 30)
        run = store.get(1)
        assert run.state and Path(run.state).is_dir() and "killed" in run.message
        # Resume twice (a double click), and later again: one continuation, from the newest state; an older
        # state never overwrites the continuation's files.
        for _ in range(2):
            resumed = client.post("/runs/1/resume", data={"csrf": csrf}, headers={"Accept": "application/json"})
            assert resumed.json()["url"] == "/runs/2"
        continuation = store.get(2)
        assert continuation.argv[-2:] == ["--resume", run.state] and continuation.resume_of == 1
        wait_for(lambda: store.get(2).status not in ("queued", "running"), "the continuation to end")
        assert store.get(2).status == "finished", store.get(2).message
        again = client.post("/runs/1/resume", data={"csrf": csrf}, headers={"Accept": "application/json"})
        assert again.json()["url"] == "/runs/2" and len(store.runs()) == 2


def test_a_restarted_server_finds_its_run_still_training(tiny_project, monkeypatch):
    monkeypatch.chdir(tiny_project)
    store = Store(tiny_project / ".lorakit-ui" / "queue.sqlite3")
    first = Supervisor(store, tiny_project)
    argv = run_form.argv_of_form(form_fields(60, "survivor"))
    from lorakit.ui.app import queue_run

    queue_run(store, first, tiny_project, argv)
    first.tick()
    run = store.get(1)
    assert run.status == "running"
    del first  # the server goes away; its run does not
    wait_for(lambda: '"event": "start"' in (run.events_path.read_text() if run.events_path.exists() else ""),
             "training to start")
    second = Supervisor(store, tiny_project)
    second.reconcile()
    assert store.get(1).status == "running"  # found by pid and start time
    wait_for(lambda: second.reconcile() or store.get(1).status != "running", "the run to end")
    assert store.get(1).status == "finished", store.get(1).message
