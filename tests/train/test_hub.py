"""Hugging Face Hub upload and resume (train/hub.py) against a fake HfApi: no network. The fake binds every call to
the installed huggingface_hub's own signatures, so a call the real API would reject fails here too."""

from __future__ import annotations

import fnmatch
import inspect
import logging
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

hf = pytest.importorskip("huggingface_hub")
pytest.importorskip("diffusers")

from lorakit.algos.options import OptionError  # noqa: E402
from lorakit.formats.safetensors_io import load_file  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.hub import HubUploader, download_state, parse_hub_resume  # noqa: E402
from lorakit.train.run import train  # noqa: E402
from lorakit.train.state import StateError  # noqa: E402

from .test_run import _config as run_config, base  # noqa: E402,F401  (the shared model/data fixture)

REAL = hf.HfApi


class FakeHub:
    """Repos in memory: {repo_id: {"type", "private", "files": {path_in_repo: bytes}}}; every call recorded as
    (method, arguments, thread name)."""

    def __init__(self, root: Path, delay: float = 0.0, fail: Exception | None = None):
        self.root, self.delay, self.fail = root, delay, fail
        self.repos: dict[str, dict] = {}
        self.calls: list[tuple[str, dict, str]] = []

    def api_class(self):
        hub = self

        class FakeHfApi:
            def __init__(self, **kwargs):
                hub._record("HfApi", REAL.__init__, kwargs, network=False)

            def create_repo(self, *args, **kwargs):
                a = hub._record("create_repo", REAL.create_repo, kwargs, args)
                hub.repos.setdefault(a["repo_id"], {"type": a.get("repo_type"), "private": a.get("private"),
                                                    "files": {}})

            def upload_file(self, *args, **kwargs):
                a = hub._record("upload_file", REAL.upload_file, kwargs, args)
                hub.repos[a["repo_id"]]["files"][a["path_in_repo"]] = Path(a["path_or_fileobj"]).read_bytes()

            def upload_folder(self, *args, **kwargs):
                a = hub._record("upload_folder", REAL.upload_folder, kwargs, args)
                folder = Path(a["folder_path"])
                for f in sorted(folder.rglob("*")):
                    if f.is_file():
                        where = f"{a['path_in_repo']}/{f.relative_to(folder).as_posix()}"
                        hub.repos[a["repo_id"]]["files"][where] = f.read_bytes()

            def snapshot_download(self, *args, **kwargs):
                a = hub._record("snapshot_download", REAL.snapshot_download, kwargs, args)
                target = hub.root / "cache" / a["repo_id"] / (a.get("revision") or "main")
                for name, data in hub.repos[a["repo_id"]]["files"].items():
                    if any(fnmatch.fnmatch(name, p) for p in a.get("allow_patterns") or ["*"]):
                        (target / name).parent.mkdir(parents=True, exist_ok=True)
                        (target / name).write_bytes(data)
                target.mkdir(parents=True, exist_ok=True)
                return str(target)

        return FakeHfApi

    def _record(self, name, real, kwargs, args=(), network=True) -> dict:
        bound = inspect.signature(real).bind(None, *args, **kwargs)  # raises as the real method would
        arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
        arguments.update(arguments.pop("kwargs", {}))
        self.calls.append((name, arguments, threading.current_thread().name))
        if network and self.fail is not None:
            raise self.fail
        if network and self.delay:
            time.sleep(self.delay)
        return arguments

    def called(self, name):
        return [(a, thread) for n, a, thread in self.calls if n == name]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(hf, "HfApi", fake.api_class())
    return fake


def _config(base, out, **overrides):
    return run_config(base, out, **{"max_train_steps": 3, **overrides})


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != "t_config.toml"}


def test_saves_are_uploaded_in_the_background_and_a_hub_state_resumes_exactly(base, tmp_path, hub):
    hub.delay = 0.2  # slow uploads: train() must still return only after all of them
    hub_options = dict(huggingface_repo_id="me/lora", huggingface_repo_type="model", huggingface_path_in_repo="runs/a/",
                       huggingface_token="hf_secret", huggingface_repo_visibility="public",
                       save_state_to_huggingface=True, async_upload=True)
    full = train(_config(base, tmp_path / "full", save_every_n_steps=2, save_state=True, **hub_options))

    assert [a["token"] for a, _ in hub.called("HfApi")] == ["hf_secret"]
    assert [(a["repo_id"], a["repo_type"], a["private"], a["exist_ok"]) for a, _ in hub.called("create_repo")] == [
        ("me/lora", "model", False, True)]  # created once, public
    uploads = [(n, a["path_in_repo"], a["repo_type"], t) for n, a, t in hub.calls if n.startswith("upload")]
    main = threading.main_thread().name
    assert [(n, p, r) for n, p, r, _ in uploads] == [
        ("upload_file", "runs/a/t-step00000002.safetensors", "model"),
        ("upload_folder", "runs/a/t-step00000002-state", "model"),
        ("upload_file", "runs/a/t.safetensors", "model"),
        ("upload_folder", "runs/a/t-state", "model")]
    # background thread, except the final adapter (sd-scripts' force_sync_upload)
    assert [t == main for *_, t in uploads] == [False, False, True, False]
    # what the repo holds is, byte for byte, what was saved locally
    local = _local_files(tmp_path / "full")
    assert hub.repos["me/lora"]["files"] == {f"runs/a/{k}": v for k, v in local.items()}
    assert len(local) == 2 + 2 * 3  # two adapters, two states of three files
    assert "hf_secret" not in (tmp_path / "full" / "t_config.toml").read_text()

    # resume from the uploaded step-2 state, with the local copy gone
    shutil.rmtree(tmp_path / "full" / "t-step00000002-state")
    resumed = train(_config(base, tmp_path / "resumed", resume="me/lora/runs/a/t-step00000002-state:main",
                            resume_from_huggingface=True, huggingface_token="hf_secret"))
    (got, _), = hub.called("snapshot_download")
    assert (got["repo_id"], got["revision"], got["repo_type"], got["allow_patterns"]) == (
        "me/lora", "main", "model", ["runs/a/t-step00000002-state/*"])
    a, b = load_file(full)[0], load_file(resumed)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_without_seed_resumes_from_the_hub_with_the_seed_it_drew(base, tmp_path, hub):
    """seed unset: the state is downloaded before the run starts, so the resume takes back the seed the run drew
    (written in train_state.json) and equals the uninterrupted run."""
    full = train(_config(base, tmp_path / "full", seed=None, save_every_n_steps=2, save_state=True,
                         huggingface_repo_id="me/lora", save_state_to_huggingface=True))
    resumed = train(_config(base, tmp_path / "resumed", seed=None, resume="me/lora/t-step00000002-state",
                            resume_from_huggingface=True))
    assert len(hub.called("snapshot_download")) == 1  # downloaded once
    a, b = load_file(full)[0], load_file(resumed)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_failed_uploads_are_logged_and_training_keeps_its_saves(base, tmp_path, hub, caplog):
    hub.fail = ConnectionError("no network")
    with caplog.at_level(logging.INFO, logger="lorakit.train.hub"):
        final = train(_config(base, tmp_path, max_train_steps=2, save_every_n_steps=1, huggingface_repo_id="me/lora"))
    assert final.is_file() and (tmp_path / "t-step00000001.safetensors").is_file()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3  # the step-1 and step-2 saves and the final one
    assert all("huggingface_repo_id='me/lora'" in e and "ConnectionError: no network" in e for e in errors)
    assert "t-step00000001.safetensors" in errors[0] and "the local save is kept" in errors[0]
    assert "3 upload(s) failed" in caplog.text and not hub.repos


def test_uploader_names_and_defaults(tmp_path, hub):
    """Unset path_in_repo: the save's name at the repo root; unset visibility: private (sd-scripts); states only with
    save_state_to_huggingface."""
    (tmp_path / "a.safetensors").write_bytes(b"adapter")
    (tmp_path / "a-state").mkdir()
    (tmp_path / "a-state" / "x.json").write_text("{}")
    config = SimpleNamespace(huggingface_repo_id="me/x", huggingface_repo_type=None, huggingface_path_in_repo=None,
                             huggingface_token=None, huggingface_repo_visibility=None, save_state_to_huggingface=False,
                             async_upload=False)
    up = HubUploader(config)
    up.upload(tmp_path / "a.safetensors")
    up.upload_state(tmp_path / "a-state")  # not asked for
    HubUploader(SimpleNamespace(**{**vars(config), "save_state_to_huggingface": True})).upload_state(
        tmp_path / "a-state")
    up.close()
    repo = hub.repos["me/x"]
    assert (repo["private"], repo["type"]) == (True, None)
    assert repo["files"] == {"a.safetensors": b"adapter", "a-state/x.json": b"{}"}
    assert all(thread == threading.main_thread().name for *_, thread in hub.calls)  # no async_upload: in line


def _sd_scripts_parse(resume):
    """train_util.resume_from_local_or_hf_if_specified's parsing, as written there."""
    repo_id = resume.split("/")[0] + "/" + resume.split("/")[1]
    path_in_repo = "/".join(resume.split("/")[2:])
    revision = repo_type = None
    if ":" in path_in_repo:
        divided = path_in_repo.split(":")
        if len(divided) == 2:
            path_in_repo, revision = divided
            repo_type = "model"
        else:
            path_in_repo, revision, repo_type = divided
    return repo_id, path_in_repo, revision, repo_type


@pytest.mark.parametrize("resume", ["me/lora/t-state", "me/lora/runs/a/t-state:main", "me/data/s/t-state:v1:dataset",
                                    "me/lora/deep/er/t-000002-state:0123abc:model"])
def test_resume_is_parsed_as_sd_scripts_parses_it(resume):
    assert parse_hub_resume(resume) == _sd_scripts_parse(resume)


def test_resume_revision_right_after_the_repo_is_kept():
    assert parse_hub_resume("me/lora:dev") == ("me/lora", "", "dev", "model")  # sd-scripts drops ":dev"


@pytest.mark.parametrize("overrides,message", [
    ({"resume": "lonely", "resume_from_huggingface": True}, "option 'resume' = 'lonely': with resume_from_huggingface"),
    ({"resume": "me/lora/s:main:repo", "resume_from_huggingface": True}, "repo type 'repo' is not one of"),
    ({"resume": "me/lora/s:a:b:c", "resume_from_huggingface": True}, "expected 'owner/repo/path/of/state"),
    ({"huggingface_repo_visibility": "secret"}, "option 'huggingface_repo_visibility': 'secret' is not one of"),
    ({"huggingface_repo_type": "models"}, "option 'huggingface_repo_type': 'models' is not one of"),
])
def test_bad_hub_values_are_refused(overrides, message):
    with pytest.raises(OptionError) as err:
        load_train_config(overrides=overrides)
    assert message in str(err.value)


def test_a_failed_download_names_the_repo(tmp_path, hub):
    config = SimpleNamespace(resume="me/lora/runs/t-state:main", huggingface_token=None)
    hub.fail = OSError("no network")
    with pytest.raises(StateError, match=r"resume='me/lora/runs/t-state:main' \(resume_from_huggingface\): cannot "
                       r"download the state from the Hugging Face model repo me/lora at revision main \(OSError: no "
                       r"network\)"):
        download_state(config)
    hub.fail = None
    hub.repos["me/lora"] = {"type": None, "private": True, "files": {"runs/other/x.json": b"{}"}}
    with pytest.raises(StateError, match="no files under 'runs/t-state' in the model repo me/lora"):
        download_state(config)
