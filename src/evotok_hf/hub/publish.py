"""What the publishing scripts (scripts/push_to_hub.py, scripts/push_space.py) share: the options of their last step,
and that step: a complete folder, written beforehand, goes to a Hub repository, which is created when it does not
exist yet."""

from __future__ import annotations

import argparse
from pathlib import Path

from huggingface_hub import HfApi


def add_publish_arguments(parser: argparse.ArgumentParser, repository: str = "repository") -> None:
    """Add the options `publish_folder` reads (`--private`, `--dry-run`, `--commit-message`) and `--output-dir`, where
    the script writes the folder; `repository` names what is published in the help ("repository", "Space")."""
    parser.add_argument("--private", action="store_true", help=f"create the {repository} as private")
    parser.add_argument("--dry-run", action="store_true", help="write the folder, print its path, upload nothing")
    parser.add_argument(
        "--output-dir", default=None,
        help="where the folder is written (must not exist or be empty; default: a new temporary folder)",
    )  # fmt: skip
    parser.add_argument("--commit-message", default=None)


def publish_folder(folder: Path, repo_id: str, *, repo_type: str, commit_message: str, private: bool = False,
                   dry_run: bool = False, create_options: dict | None = None,
                   upload_options: dict | None = None) -> dict:  # fmt: skip
    """Create `repo_id` (kept as it is when it exists) and upload `folder` to it as one commit; with `dry_run`, touch
    nothing. Returns `{"folder", "repo_id", "uploaded"}`, with `"repo_url"` and `"commit_url"` once uploaded.

    `private` makes a new repository private (an existing one keeps its visibility); `create_options` and
    `upload_options` go to `HfApi.create_repo` (e.g. a Space's `space_sdk`) and `HfApi.upload_folder` (e.g.
    `delete_patterns`)."""
    result = {"folder": str(folder), "repo_id": repo_id, "uploaded": False}
    if dry_run:
        return result
    api = HfApi()
    repo_url = api.create_repo(repo_id, repo_type=repo_type, private=True if private else None, exist_ok=True,
                               **(create_options or {}))  # fmt: skip
    commit = api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=str(folder),
                               commit_message=commit_message, **(upload_options or {}))  # fmt: skip
    result.update(uploaded=True, repo_url=str(repo_url), commit_url=str(getattr(commit, "commit_url", commit)))
    return result


__all__ = ["add_publish_arguments", "publish_folder"]
