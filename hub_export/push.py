"""Upload of an exported folder to the Hub with `huggingface_hub` (`create_repo` + `upload_folder`).

The endpoint and the token come from the arguments, else from `huggingface_hub`'s own settings (`HF_ENDPOINT`,
`HF_TOKEN` or the saved login), so the same call reaches the Hub or, in the tests, a local mock of its API.
"""

import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

REQUIRED_FILES = ("config.json", "README.md")


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload RxT model exported with hub_export",
) -> str:
    """Creates the model repository `repo_id` if needed and makes its files those of `folder`, in one commit: files
    already there with the same content are not uploaded again, and files of an earlier upload that `folder` no
    longer has (an adapter since removed, a renamed code file) are deleted, so the repository holds exactly the
    verified folder. Returns the commit URL. `private=True` for an existing public repository is refused: the Hub
    keeps an existing repository's visibility, and the upload would be public."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"`folder` {str(folder)!r} is not a folder.")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"`folder` {str(folder)!r} lacks {missing}: is it a folder written by export_model?")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"`repo_id` {repo_id!r} is not a valid Hub repository id: {error}") from error
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if private and not api.model_info(repo_url.repo_id).private:
        raise ValueError(f"`private=True`, but the repository {repo_url.repo_id!r} exists and is public; nothing was "
                         "uploaded. Make it private on the Hub first (or push without `private`).")
    commit = api.upload_folder(repo_id=repo_url.repo_id, folder_path=folder, repo_type="model",
                               commit_message=commit_message, delete_patterns="*")  # `.gitattributes` stays
    return commit.commit_url


__all__ = ["push_folder"]
