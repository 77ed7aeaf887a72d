"""Upload of an exported folder to the Hub with `huggingface_hub` (`create_repo` + `upload_folder`).

The endpoint and the token come from the arguments, else from `huggingface_hub`'s own settings (`HF_ENDPOINT`,
`HF_TOKEN` or the saved login), so the same call reaches the Hub or, in the tests, a local mock of its API.
"""

import json
import os
import re
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .model_card import extract_usage_snippet

REQUIRED_FILES = ("config.json", "README.md")
SNIPPET_MODEL_ID = re.compile(r"^model_id = (\".*\")$", flags=re.MULTILINE)  # as `usage_snippet` writes it


def recorded_model_ids(folder: str | os.PathLike) -> dict[str, str]:
    """{where: model id} for each place an exported folder names the model it is published as: the `model_id` of
    the card's usage snippet and each adapter's `base_model_name_or_path` (`export_model` writes its `repo_id`, or
    DEST's name without one, into both). A folder whose card has no usage snippet records none there."""
    folder, found = Path(folder), {}
    try:
        snippet = extract_usage_snippet((folder / "README.md").read_text(encoding="utf-8"))
    except ValueError:
        snippet = ""
    match = SNIPPET_MODEL_ID.search(snippet)
    if match:
        found["README.md usage snippet"] = json.loads(match.group(1))
    for path in sorted(folder.glob("*/adapter_config.json")):
        try:
            base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise ValueError(f"`folder` {str(folder)!r}: {path.relative_to(folder)} is not a JSON object: {error}") \
                from error
        if isinstance(base, str):
            found[str(path.relative_to(folder))] = base
    return found


def check_recorded_model_id(folder: str | os.PathLike, repo_id: str) -> None:
    """Refuses a folder whose card or adapters name another model than `repo_id`: on the Hub, the card's usage
    snippet and `PeftModel.from_pretrained` / `AutoPeftModel` would load that other name (for a folder exported
    without a repo id, DEST's folder name, which no Hub user has)."""
    recorded = recorded_model_ids(folder).items()  # the Hub resolves a repository id whatever its case
    other = {where: model_id for where, model_id in recorded if model_id.casefold() != repo_id.casefold()}
    if other:
        named = ", ".join(f"{model_id!r} in {where}" for where, model_id in other.items())
        raise ValueError(f"`folder` {str(folder)!r} was exported for another model id than `repo_id` {repo_id!r} "
                         f"({named}): its published usage snippet and adapters would load that name, not "
                         f"{repo_id!r}. Nothing was uploaded; export it again with repo_id={repo_id!r} (command "
                         f"line: --repo-id {repo_id} or --push {repo_id}).")


def check_visibility(repo_id: str, private: bool | None, *, endpoint: str | None = None,
                     token: str | None = None) -> None:
    """`private=True` for a repository that exists and is public is refused (the Hub keeps an existing
    repository's visibility, and the upload would be public), before anything is exported or uploaded. A repository
    that does not exist yet is created private by the push. Network and authentication errors are raised as
    `huggingface_hub` raises them."""
    if not private:
        return
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id)
    except RepositoryNotFoundError:
        return
    if not info.private:
        raise ValueError(f"`private=True`, but the repository {repo_id!r} exists and is public; nothing was "
                         "uploaded. Make it private on the Hub first (or push without `private`).")


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
    keeps an existing repository's visibility, and the upload would be public. So is a folder whose card or adapters
    name another model id than `repo_id` (exported without it, or for another repository): export it again with
    `repo_id`. Both are `ValueError`s raised before anything is uploaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"`folder` {str(folder)!r} is not a folder.")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"`folder` {str(folder)!r} lacks {missing}: is it a folder written by export_model?")
    if not isinstance(repo_id, str):
        raise TypeError(f"`repo_id` must be a Hub repository id (str), got {type(repo_id).__name__}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"`repo_id` {repo_id!r} is not a valid Hub repository id: {error}") from error
    check_recorded_model_id(folder, repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if private and not api.model_info(repo_url.repo_id).private:
        raise ValueError(f"`private=True`, but the repository {repo_url.repo_id!r} exists and is public; nothing was "
                         "uploaded. Make it private on the Hub first (or push without `private`).")
    commit = api.upload_folder(repo_id=repo_url.repo_id, folder_path=folder, repo_type="model",
                               commit_message=commit_message, delete_patterns="*")  # `.gitattributes` stays
    return commit.commit_url


__all__ = ["check_recorded_model_id", "check_visibility", "push_folder", "recorded_model_ids"]
