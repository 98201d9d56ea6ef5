"""`surgery push`: verify a converted checkpoint, then publish it to the Hub with `huggingface_hub`.

The token comes from `--token`, `HF_TOKEN` or the login cache, and the endpoint from `HF_ENDPOINT`, as everywhere
in huggingface_hub. Nothing is uploaded unless the checkpoint first loads and generates in a fresh interpreter
that cannot import surgery. A commit is atomic on the Hub, so an upload cut off midway is simply run again.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoint.card import render_card
from surgery.checkpoint.records import RECIPE_FILE
from surgery.base.errors import SurgeryError, first_line
from surgery.checkpoint.loading import read_checkpoint_config, read_json
from surgery.checkpoint.verify import verify_checkpoint
from surgery.checkpoint.export import remote_code

log = logging.getLogger(__name__)

IGNORED = [".*", "__pycache__/*", "*.pyc"]


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    files: list[tuple[str, int]]
    url: str | None


def checkpoint_files(folder: Path) -> list[tuple[str, int]]:
    """The files an upload sends, with their sizes: everything but hidden files and caches."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            files.append((relative.as_posix(), path.stat().st_size))
    return files


def check_repo_id(repo_id: str) -> None:
    """A Hub repo id must be `name` or `namespace/name`, in the Hub's characters."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise SurgeryError(f"{repo_id!r} is not a valid Hub repo id: {first_line(error)}",
                           hint="use namespace/name, e.g. my-org/SmolLM2-135M-KVSharer") from None


def check_own_code(folder: Path) -> None:
    """Verification runs the folder's Python files: only when they are the ones this surgery ships."""

    shipped = remote_code(read_checkpoint_config(folder))
    for path in sorted(folder.glob("*.py")):
        if shipped.get(path.name) != path.read_bytes():
            raise SurgeryError(f"{path} is not the code this surgery version ships, so it is not run to verify",
                               hint="pass --trust-remote-code if you trust it, or --no-verify")


def push(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, dry_run: bool = False,
         verify: bool = True, endpoint: str | None = None, trust_remote_code: bool = False) -> PushResult:
    folder = Path(folder)
    check_repo_id(repo_id)
    if not (folder / "config.json").is_file() or not (folder / RECIPE_FILE).is_file():
        raise SurgeryError(f"{folder} is not a surgery checkpoint", hint="push a folder written by `surgery convert`")
    if not dry_run:
        _check_can_upload(token)
    if verify:
        config = read_json(folder / "config.json")
        ships_code = not isinstance(config, dict) or config.get("model_type") == "surgery"  # else a plain family one
        if ships_code and not trust_remote_code:
            check_own_code(folder)
        verify_checkpoint(folder, remote_code=ships_code)
    render_card(folder, model_id=repo_id)  # the usage snippet names the Hub repo
    files = checkpoint_files(folder)
    if dry_run:
        return PushResult(repo_id, files, None)

    from huggingface_hub import HfApi

    api = HfApi(token=token, endpoint=endpoint)  # endpoint None: HF_ENDPOINT or the public Hub
    message = commit_message or f"Upload {folder.name} converted with surgery"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                 commit_message=message, ignore_patterns=IGNORED)
    except Exception as error:  # huggingface_hub and httpx raise many types; each becomes one clear line
        raise explain(error, repo_id) from None
    return PushResult(repo_id, files, getattr(info, "commit_url", None) or str(info))


def _check_can_upload(token: str | None) -> None:
    """Say what is missing before any network call: offline mode, or no token at all."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise SurgeryError("cannot push: HF_HUB_OFFLINE is set", hint="unset HF_HUB_OFFLINE to upload")
    if token is None and get_token() is None:
        raise SurgeryError("cannot push: no Hub token", hint="log in with `hf auth login`, set HF_TOKEN, or pass --token")


def explain(error: Exception, repo_id: str) -> SurgeryError:
    """One line naming what went wrong with an upload and what to do about it."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if status == 401:
        return SurgeryError(f"the Hub rejected the token while pushing {repo_id} (401 Unauthorized)",
                            hint="log in with `hf auth login`, set HF_TOKEN, or pass --token with a write token")
    if status == 403:
        return SurgeryError(f"no write access to {repo_id}: it exists and belongs to someone else, or the token "
                            "cannot write there (403 Forbidden)", hint="push to a repo id under your own namespace")
    if status is not None:
        return SurgeryError(f"the Hub answered {status} while pushing {repo_id}: {first_line(error)}")
    name = type(error).__name__
    if name == "OfflineModeIsEnabled":
        return SurgeryError(f"cannot push {repo_id}: HF_HUB_OFFLINE is set", hint="unset HF_HUB_OFFLINE to upload")
    if "ConnectError" in name or "ConnectTimeout" in name:
        return SurgeryError(f"could not reach the Hub to push {repo_id} ({name}); nothing was uploaded",
                            hint="check the network connection and HF_ENDPOINT, then run again")
    if any(word in name for word in ("Connect", "Protocol", "Timeout", "Network", "ReadError", "Connection")):
        return SurgeryError(f"the connection to the Hub was lost while pushing {repo_id} ({name}); nothing was "
                            "committed", hint="run the same command again to finish the upload")
    return SurgeryError(f"pushing {repo_id} failed: {name}: {first_line(error)}")
