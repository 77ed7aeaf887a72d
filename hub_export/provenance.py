"""What ties a published model to what measured it: fingerprints of its weights and of its model code, and the
revision of this project that exported it.

- `weights_fingerprint(folder)`: the SHA-256 over the tensors saved in a model folder. The demo's evaluation JSON
  records it, and the export refuses an evaluation of other weights.
- `code_fingerprint(folder)`: the SHA-256 over the model code files of a folder (its top-level `.py` files, which
  `save_pretrained` copies there). The evaluation JSON records it too, and the card says whether the figures were
  measured with the code it publishes.
- `project_revision()`: the git commit of this project's checkout, marked `-dirty` when tracked files differ from it;
  None outside a git checkout (an installed package).
"""

import hashlib
import json
import os
import re
import struct
import subprocess
from pathlib import Path

from modeling_rxt.atomic_files import read_json_object

FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")  # as `weights_fingerprint` and `code_fingerprint` write them
REVISION = re.compile(r"[0-9a-f]{40}(-dirty)?")  # as `project_revision` writes it
PROJECT_ROOT = Path(__file__).resolve().parents[1]
GIT_TIMEOUT_S = 10


# `save_pretrained`'s weights without a variant: model.safetensors, or the shards its index names.
SINGLE_WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
WEIGHT_FILES = f"{SINGLE_WEIGHTS} or the shards of {WEIGHTS_INDEX}"  # how messages name them
READ_CHUNK = 1 << 24  # bytes hashed at a time: weight files can be larger than the memory


def weights_fingerprint(folder: str | os.PathLike) -> str:
    """`sha256:<hex>`: the fingerprint of the weights saved in `folder`, for an evaluation JSON to record what it was
    measured on (the export checks it against the weights it exports). Read from the files, without loading a
    model: the SHA-256 over every tensor in name order, of its name, dtype, shape and bytes. How the weights are
    split into shards and the files' metadata (the export adds its own) do not count, nor do the folder's other
    files (tokenizer, adapters), so an exported folder has the fingerprint of its source."""
    paths = _weight_files(Path(folder))
    tensors = {}  # name -> (file, dtype, shape, first byte, end byte)
    for path in paths:
        for name, entry in _tensor_entries(path).items():
            if name in tensors:
                raise ValueError(f"The tensor {name!r} is in both {tensors[name][0].name} and {path.name} of "
                                 f"{str(folder)!r}: a stale shard of an earlier save?")
            tensors[name] = (path, *entry)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        path, dtype, shape, start, end = tensors[name]
        digest.update(json.dumps([name, dtype, shape]).encode("utf-8"))
        with open(path, "rb") as handle:
            handle.seek(start)
            for offset in range(start, end, READ_CHUNK):
                digest.update(handle.read(min(READ_CHUNK, end - offset)))
    return "sha256:" + digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    """The files transformers loads the weights from: `model.safetensors`, else the shards its index names."""
    if (folder / SINGLE_WEIGHTS).exists() or (folder / SINGLE_WEIGHTS).is_symlink():
        return [folder / SINGLE_WEIGHTS]
    if not (folder / WEIGHTS_INDEX).is_file():
        raise ValueError(f"{str(folder)!r} has no weight files ({WEIGHT_FILES}) to fingerprint.")
    weight_map = read_json_object(folder / WEIGHTS_INDEX, f"`{WEIGHTS_INDEX}`").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise ValueError(f"`{WEIGHTS_INDEX}` in {str(folder)!r} has no `weight_map` of tensor names to shard files.")
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"The shards {missing} that `{WEIGHTS_INDEX}` names are missing from {str(folder)!r}.")
    return [folder / name for name in shards]


def _tensor_entries(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """{name: (dtype, shape, first byte, end byte)} of a safetensors file, from its header: 8 bytes of header length
    (little-endian), the JSON header, then the tensors' bytes (offsets counted from there)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        data_start, size = 8 + length, path.stat().st_size
        entries = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            first, end = (data_start + offset for offset in entry["data_offsets"])
            if not data_start <= first <= end <= size:
                raise ValueError(f"tensor {name!r} lies beyond the end of the file")
            entries[name] = (entry["dtype"], entry["shape"], first, end)
        return entries
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError, MemoryError,
            OverflowError) as error:
        raise ValueError(f"{str(path)!r} cannot be read as safetensors (corrupted or truncated?): {error}") from error


def code_fingerprint(folder: str | os.PathLike) -> str:
    """`sha256:<hex>`: the fingerprint of the model code saved in `folder`, its top-level `.py` files (those that
    `save_pretrained` copies beside the weights, and the only code a Hub folder holds): the SHA-256 over each file, in
    name order, of its name, its length and its bytes. Other files do not count."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder: give the model folder whose code to fingerprint.")
    paths = sorted(path for path in folder.glob("*.py") if path.is_file())
    if not paths:
        raise ValueError(f"{str(folder)!r} has no code files (*.py) to fingerprint: was it saved by a model whose "
                         "class is registered for the Auto classes (`save_pretrained` copies its code then)?")
    digest = hashlib.sha256()
    for path in paths:
        content = path.read_bytes()
        digest.update(json.dumps([path.name, len(content)]).encode("utf-8"))
        digest.update(content)
    return "sha256:" + digest.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def project_revision(root: str | os.PathLike = PROJECT_ROOT) -> str | None:
    """The commit checked out in `root` (this project's checkout by default), with `-dirty` when a tracked file
    differs from it; None when `root` is not the top of a git working tree (an installed package, whose folder may
    lie inside some other repository) or git is missing. Untracked files do not count: `code_fingerprint` covers the
    model code exactly, the revision only says where it came from."""
    root = Path(root).resolve()
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return None
    commit = _git(root, "rev-parse", "--verify", "HEAD")
    changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    if commit is None or changes is None or not REVISION.fullmatch(commit):
        return None
    return commit + ("-dirty" if changes else "")
