"""`RxTForSequenceClassification`: a score per sequence from the decoder's state at its last token, as Llama's
generic head gives one. A causal LM's folder loads into it (`AutoModelForSequenceClassification`), also where this
package is not installed, and TRL's `RewardTrainer` trains it. It read nothing of RxT before: `RewardTrainer` and
`AutoModelForSequenceClassification` failed with "Unrecognized configuration class ... RxTConfig"."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import trl  # a test dependency (setup.cfg)
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from modeling_rxt import RxTForSequenceClassification

from training_helpers import one_thread, tiny_model, tokenizer  # noqa: F401 (fixtures are used by name)


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    """A causal LM saved with its tokenizer, the way a reward model starts from a chat model."""
    path = tmp_path_factory.mktemp("causal-lm")
    model = tiny_model(tokenizer, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_causal_lm_folder_loads_as_a_classifier_that_scores_the_last_token(folder, tokenizer):
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    assert isinstance(classifier, RxTForSequenceClassification)
    causal = tiny_model(tokenizer, pad_token_id=tokenizer.pad_token_id)  # the saved model: every weight but `score`
    weights = causal.model.state_dict()
    assert classifier.model.state_dict().keys() == weights.keys()
    assert all(torch.equal(p, weights[name]) for name, p in classifier.model.state_dict().items())
    ids = torch.tensor([tokenizer("my cat is called bimo .")["input_ids"]])
    with torch.no_grad():
        hidden = classifier.model(ids).last_hidden_state
        scores = classifier(ids).logits
        torch.testing.assert_close(scores, classifier.score(hidden[:, -1]))
        pad = tokenizer.pad_token_id
        padded = torch.cat((ids, torch.full((1, 3), pad)), dim=1)
        mask = (padded != pad).long()
        torch.testing.assert_close(classifier(padded, attention_mask=mask).logits, scores)  # the last real token


def test_the_classifier_reads_a_conversations_memory(folder, tokenizer):
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    ids = torch.tensor([tokenizer("what is my cat called ?")["input_ids"]])
    causal = tiny_model(tokenizer, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        written = causal.update_memory(causal.init_memory(1), torch.tensor([tokenizer("my cat is called bimo .")[
            "input_ids"]]))
        initial, fresh = classifier(ids).logits, classifier(ids, memory_state=written).logits
        assert torch.equal(classifier(ids, memory_state=causal.init_memory(1)).logits, initial)
    assert not torch.allclose(initial, fresh)


def test_the_classifier_loads_from_the_folders_own_code(folder, tmp_path):
    """Where this package is not installed: `auto_map` names the class, and its code travels with the folder."""
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForSequenceClassification"] == \
        "modeling_rxt.RxTForSequenceClassification"
    child = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("modeling_rxt", "configuration"):
                    raise ImportError(name)
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, num_labels=1,
                                                                   trust_remote_code=True)
        print(type(model).__module__, tuple(model(torch.tensor([[2, 5, 6]])).logits.shape))
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    module, shape = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert module.startswith("transformers_modules") and shape == "(1, 1)"


def test_trls_reward_trainer_trains_it(folder, tokenizer, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    rows = Dataset.from_list([{"chosen": "my cat is called bimo .", "rejected": "hello there !"}] * 6)
    config = trl.RewardConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=2, per_device_train_batch_size=3,
                              learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, max_length=32,
                              dataloader_num_workers=0, disable_tqdm=True)
    trainer = trl.RewardTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer)
    before = model.score.weight.detach().clone()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.score.weight, before)
