"""`surgery push`: verify a converted checkpoint, then publish it to the Hub with `huggingface_hub`.

The token comes from `--token`, `HF_TOKEN` or the login cache, and the endpoint from `HF_ENDPOINT`, as everywhere
in huggingface_hub. Nothing is uploaded unless the checkpoint first loads and generates in a fresh interpreter
that cannot import surgery. A commit is atomic on the Hub, so an upload cut off midway is simply run again.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from .card import RECIPE_FILE, render_card
from .errors import SurgeryError
from .verify import verify_checkpoint

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


def push(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, dry_run: bool = False,
         verify: bool = True, endpoint: str | None = None) -> PushResult:
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / RECIPE_FILE).is_file():
        raise SurgeryError(f"{folder} is not a surgery checkpoint", hint="push a folder written by `surgery convert`")
    if verify:
        verify_checkpoint(folder)
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
        return SurgeryError(f"the Hub answered {status} while pushing {repo_id}: {str(error).splitlines()[0]}")
    name = type(error).__name__
    if name == "OfflineModeIsEnabled":
        return SurgeryError(f"cannot push {repo_id}: HF_HUB_OFFLINE is set", hint="unset HF_HUB_OFFLINE to upload")
    if any(word in name for word in ("Connect", "Protocol", "Timeout", "Network", "ReadError", "Connection")):
        return SurgeryError(f"the connection to the Hub was lost while pushing {repo_id} ({name}); nothing was "
                            "committed", hint="run the same command again to finish the upload")
    return SurgeryError(f"pushing {repo_id} failed: {name}: {str(error).splitlines()[0] if str(error) else ''}")
