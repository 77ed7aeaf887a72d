"""From a trained RxT model to an uploadable, self-verifying Hugging Face Hub folder.

    from hub_export import export_model
    export_model("runs/demo/model", "runs/demo/hub", eval_json="runs/demo/eval.json", overwrite=True)

or `python -m hub_export SRC DEST [--overwrite] [--no-verify] [--push REPO_ID] [--eval-json PATH] ...`.
"""

from .export import ExportReport, export_model
from .model_card import build_model_card, read_evaluation, usage_snippet
from .provenance import code_fingerprint, project_revision, weights_fingerprint
from .push import push_folder
from .verify import VerificationError, VerificationReport, verify_export

__all__ = [
    "ExportReport",
    "VerificationError",
    "VerificationReport",
    "build_model_card",
    "code_fingerprint",
    "export_model",
    "project_revision",
    "push_folder",
    "read_evaluation",
    "usage_snippet",
    "verify_export",
    "weights_fingerprint",
]
