"""`engine export ... --push-to-hub REPO`: upload an export folder as a hub dataset repository.

What can be known before the export runs is checked first (huggingface_hub installed, not offline,
a token, the repo id's form), so a push that cannot happen costs no export; what only the network
can say (refused token, no route to the hub) is one error line after it, the folder left in place.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from engine.errors import UserError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_push(repo: str) -> None:
    """Raise UserError when a push to `repo` cannot work from here."""
    if not REPO_ID.match(repo):
        raise UserError(f"--push-to-hub {repo}: give a hub dataset id as OWNER/NAME")
    try:
        from huggingface_hub import get_token
    except ImportError:
        raise UserError("--push-to-hub needs huggingface_hub: pip install -e \".[hf]\"") from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError("--push-to-hub: HF_HUB_OFFLINE is set, so the hub cannot be reached; unset it to push")
    if not get_token():
        raise UserError("--push-to-hub: no Hugging Face token (run `hf auth login` or set HF_TOKEN)")


def push_to_hub(folder: Path, repo: str, private: bool = False) -> str:
    """Create the dataset repo if needed and upload the folder; returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="dataset",
                          commit_message="erasure probe engine export")
    except Exception as error:  # noqa: BLE001 (network, auth or hub refusal: one line, the export stays)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"could not push {folder} to the hub dataset {repo}: {reason} (the export is kept; "
                        "push it later with `hf upload --repo-type dataset`)") from None
    return str(url)
