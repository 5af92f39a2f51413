"""Hugging Face Hub upload and resume, as sd-scripts' library/huggingface_util.py and train_util.py do them: each
adapter save (and, with save_state_to_huggingface, each state folder) is uploaded to huggingface_repo_id right after
it is written; with resume_from_huggingface, `resume` names a state in a repo ("repo_id/path[:revision[:repo_type]]")
that is downloaded, then resumed from as a local state.

huggingface_hub is imported only when these options are set: lorakit otherwise runs offline. A failed upload is
logged and training goes on (the local save is always written first and kept), as in sd-scripts; a failed
download stops the run, since it cannot resume."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..algos.options import OptionError
from .state import StateError

__all__ = ["HubUploader", "parse_hub_resume", "download_state", "REPO_TYPES"]

log = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")  # huggingface_hub's repo types (None means model)


def _hf_api(token: str | None, option: str):
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise OptionError(f"{option} needs the huggingface_hub package (pip install huggingface_hub)") from None
    return HfApi(token=token)  # no network access until a call; token None: the logged-in / HF_TOKEN token


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip().rstrip(":")


class HubUploader:
    """Uploads saves to huggingface_repo_id. With async_upload, uploads run one after another on a background
    thread (one thread keeps the repo's commits in save order; parallel commits to one repo conflict); ``close``
    waits for them, so train() returns only once every upload has ended."""

    def __init__(self, config):
        self.repo_id = config.huggingface_repo_id
        self.repo_type = config.huggingface_repo_type
        # sd-scripts: anything but "public" (unset included) creates a private repo
        self.private = config.huggingface_repo_visibility != "public"
        self.prefix = (config.huggingface_path_in_repo or "").strip("/")
        self.with_states = config.save_state_to_huggingface
        self.api = _hf_api(config.huggingface_token, f"huggingface_repo_id={self.repo_id!r}")
        self.failed: list[Path] = []
        self._created = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload") if config.async_upload \
            else None
        self._pending: list[Future] = []

    def path_in_repo(self, path: Path) -> str:
        """{huggingface_path_in_repo}/{name} as sd-scripts; unset: the name at the repo's root (sd-scripts passes
        None there, which upload_file refuses and which spreads a state folder's files over the root)."""
        return f"{self.prefix}/{path.name}" if self.prefix else path.name

    def upload(self, path: str | Path, force_sync: bool = False) -> None:
        """Upload a saved file or state folder; with async_upload in the background unless ``force_sync`` (sd-scripts
        uploads the final adapter synchronously)."""
        path = Path(path)
        if self._pool is None or force_sync:
            self.wait()  # after the uploads already queued: the repo gets the saves in order
            self._upload(path)
        else:
            self._pending.append(self._pool.submit(self._upload, path))

    def upload_state(self, folder: str | Path) -> None:
        if self.with_states:
            self.upload(folder)

    def wait(self) -> None:
        """Wait for the queued uploads (before a save_last_n_* clean-up removes a file that may still be queued)."""
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.failed:
            log.warning("huggingface_repo_id=%r: %d upload(s) failed (%s); the files are kept locally in %s",
                        self.repo_id, len(self.failed), ", ".join(p.name for p in self.failed),
                        self.failed[0].parent)

    def _upload(self, path: Path) -> None:
        where = self.path_in_repo(path)
        try:
            self._create_repo()
            if path.is_dir():
                self.api.upload_folder(repo_id=self.repo_id, repo_type=self.repo_type, folder_path=str(path),
                                       path_in_repo=where)
            else:
                self.api.upload_file(path_or_fileobj=str(path), path_in_repo=where, repo_id=self.repo_id,
                                     repo_type=self.repo_type)
        except Exception as err:  # no network, bad token, ...: the run goes on with the local save
            with self._lock:
                self.failed.append(path)
            log.error("huggingface_repo_id=%r: uploading %s to %s failed (%s); the local save is kept and training "
                      "goes on", self.repo_id, path, where, _why(err))
            return
        log.info("uploaded %s to %s (%s)", path.name, self.repo_id, where)

    def _create_repo(self) -> None:
        # sd-scripts creates the repo when it does not exist yet, with huggingface_repo_visibility; exist_ok leaves
        # an existing repo (and its visibility) as it is
        if self._created:
            return
        self.api.create_repo(self.repo_id, repo_type=self.repo_type, private=self.private, exist_ok=True)
        self._created = True


def parse_hub_resume(resume: str) -> tuple[str, str, str | None, str | None]:
    """`resume` with resume_from_huggingface -> (repo_id, path in repo, revision, repo_type), read as sd-scripts'
    resume_from_local_or_hf_if_specified reads it: "owner/name/path/in/repo[:revision[:repo_type]]"; a revision
    without a repo_type means a model repo. (A revision right after "owner/name", which sd-scripts drops, is kept.)"""
    head, *rest = resume.strip().split(":")
    parts = head.split("/")
    if len(rest) > 2 or len(parts) < 2 or not parts[0] or not parts[1]:
        raise OptionError(f"option 'resume' = {resume!r}: with resume_from_huggingface, expected "
                          "'owner/repo/path/of/state[:revision[:repo_type]]'")
    revision = (rest[0] or None) if rest else None
    repo_type = (rest[1] or None) if len(rest) == 2 else ("model" if rest else None)
    if repo_type is not None and repo_type not in REPO_TYPES:
        raise OptionError(f"option 'resume' = {resume!r}: repo type {repo_type!r} is not one of "
                          f"{', '.join(REPO_TYPES)}")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:]).strip("/"), revision, repo_type


def download_state(config) -> Path:
    """resume_from_huggingface: download the state folder `resume` names (into the Hugging Face cache, as
    sd-scripts' hf_hub_download does) and return its local folder."""
    repo_id, path, revision, repo_type = parse_hub_resume(config.resume)
    api = _hf_api(config.huggingface_token, "resume_from_huggingface")
    what = f"{repo_type or 'model'} repo {repo_id}" + (f" at revision {revision}" if revision else "")
    try:
        root = api.snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                     allow_patterns=[f"{path}/*"] if path else None)
    except Exception as err:
        raise StateError(f"resume={config.resume!r} (resume_from_huggingface): cannot download the state from the "
                         f"Hugging Face {what} ({_why(err)})") from err
    folder = Path(root) / path if path else Path(root)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise StateError(f"resume={config.resume!r} (resume_from_huggingface): no files under "
                         f"'{path or '/'}' in the {what}")
    log.info("resume: downloaded %s from %s to %s", path or "/", repo_id, folder)
    return folder
