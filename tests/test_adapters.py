"""PEFT LoRA adapters on one RxT base: presets, switching, merging, saving, mixed batches, memory under adapters,
fine-tuning with Trainer. Tiny models; every test builds its own base because PEFT injects into it in place.
Saving and loading: tests/test_adapters_saving.py."""

import re

import numpy as np
import pytest
import torch
from peft import get_peft_model

from configuration import available_presets
from modeling_rxt import RxTForCausalLM, RxTMemoryState
from modeling_rxt import adapters as adapters_module
from modeling_rxt.adapters import (
    BASE_ADAPTER,
    adapter_names,
    initial_memory_for,
    load_adapter,
    lora_config,
    rxt_model,
    save_adapters,
    update_memory_with,
    using_adapter,
)
from modeling_rxt.data import TELL, UPDATE, interactions_dataset, lm_texts, make_episodes
from modeling_rxt.modeling_rxt_wrappers import mixed_adapter_rows
from modeling_rxt.tokenization import MIN_VOCAB_SIZE, encode_interaction, train_tokenizer

from adapters_helpers import (
    ROLES,
    logits_of,
    make_base,
    make_moe_base,
    random_lora,
    with_roles,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


# ---- presets -----------------------------------------------------------------------------------------------------
PRESET_TARGETS = {
    # preset: (a parameter name fragment every adapted tensor has, whether decoder logits change on a fixed memory)
    "attention": (".self_attn.", True),
    "mlp": (".mlp.", True),
    "memory-cross-attention": (".memory_cross_attn.", True),
    "memory-encoder": ("memory_encoder.", False),
    "memory-attention": ("memory_attention.", False),
    "decoder": ("model.layers.", True),
    "experts": (".mlp.experts.", True),
    "full": ("", True),
}


def test_every_preset_is_listed():
    assert set(available_presets("lora")) == set(PRESET_TARGETS)


@pytest.mark.parametrize("preset", sorted(PRESET_TARGETS))
def test_preset_targets_its_modules_and_changes_outputs(preset, ids):
    fragment, changes_logits = PRESET_TARGETS[preset]
    base = make_moe_base() if preset == "experts" else make_base()
    stm = base.init_memory(ids.shape[0])
    reference_logits = logits_of(base, ids, memory_state=stm)
    reference_write = base.update_memory(stm, ids).stm.detach()
    model = get_peft_model(base, random_lora(preset)).eval()
    lora_names = [name for name, _ in model.named_parameters() if "lora_" in name]
    assert lora_names and all(fragment in name for name in lora_names)
    if preset in ("attention", "mlp", "memory-cross-attention", "decoder"):
        assert not any("memory_encoder" in n or "memory_attention" in n for n in lora_names)
    new_logits = logits_of(model, ids, memory_state=stm)
    new_write = update_memory_with(model, stm, ids, adapter="default").stm.detach()
    assert (not torch.equal(new_logits, reference_logits)) == changes_logits
    # The write changes exactly when the adapter reaches the memory encoder or memory attention.
    writes_memory = any("memory_encoder" in n or "memory_attention" in n for n in lora_names)
    assert (not torch.equal(new_write, reference_write)) == writes_memory
    if preset != "full":  # the full preset reaches everything; the others leave some part alone
        assert not (changes_logits and writes_memory)


def test_lora_config_applies_overrides_and_rejects_bad_input():
    config = lora_config("attention", r=2, lora_alpha=4)
    assert (config.r, config.lora_alpha, config.task_type) == (2, 4, "CAUSAL_LM")
    with pytest.raises(ValueError, match="Unknown lora preset 'nope'"):
        lora_config("nope")
    with pytest.raises(ValueError, match="overrides"):
        lora_config("attention", not_a_field=1)
    with pytest.raises(TypeError, match="name"):
        lora_config(3)
    # PEFT took these: a NaN alpha gave NaN logits, a rank "x", 2.5 or True failed later in torch or PEFT.
    for bad in ({"r": "x"}, {"r": 2.5}, {"r": True}, {"r": 0}, {"lora_alpha": float("nan")}, {"lora_alpha": "8"},
                {"lora_alpha": True}, {"lora_dropout": 1.0}, {"lora_dropout": -0.1}):
        field = next(iter(bad))
        with pytest.raises(ValueError, match=f"'attention' with overrides \\['{field}'\\]: `{field}` must be"):
            lora_config("attention", **bad)
    assert lora_config("attention", r=np.int64(4)).r == 4  # numpy's ints, as elsewhere


# ---- one base, several adapters ----------------------------------------------------------------------------------
def test_each_adapter_changes_outputs_and_disable_gives_exact_base(ids):
    base = make_base()
    reference = logits_of(base, ids)
    model = with_roles(base)
    per_role = {role: logits_of(model, ids, role) for role in ROLES}
    for role in ROLES:
        assert not torch.allclose(per_role[role], reference, atol=1e-3)
    assert not torch.allclose(per_role["actor"], per_role["critic"], atol=1e-3)
    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), reference)
        assert torch.equal(model.init_memory(2).stm, base.model.initial_memory.original_module(2))
    with using_adapter(model, None):
        assert torch.equal(logits_of(model, ids), reference)
    assert torch.equal(logits_of(model, ids), per_role["regenerator"])  # state restored after the block


def test_switching_adapters_back_and_forth_is_exact(ids):
    model = with_roles(make_base())
    first = {role: logits_of(model, ids, role) for role in ROLES}
    for role in ("critic", "actor", "regenerator", "actor", "critic"):
        assert torch.equal(logits_of(model, ids, role), first[role])
    with using_adapter(model, "critic"):
        assert torch.equal(logits_of(model, ids), first["critic"])
    assert model.active_adapter == "critic"  # using_adapter restores the adapter active before it


def test_using_an_adapter_restores_several_active_adapters(ids):
    """PEFT's tuner model can run several adapters at once (`base_model.set_adapter([...])`); `using_adapter`
    restored only the first of them (`PeftModel.active_adapter`), so the model came back changed (and a chat turn
    with per-row adapters then failed, blaming another thread)."""
    from peft import LoraConfig, get_peft_model

    def config():  # LoRA only: PEFT runs one `modules_to_save` copy at a time
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    model = get_peft_model(make_base(), config(), adapter_name="actor")
    for name in ("critic", "regenerator"):
        model.add_adapter(name, config())
    model.base_model.set_adapter(["actor", "critic"])
    both = logits_of(model, ids)
    with using_adapter(model, "regenerator"):
        assert not torch.equal(logits_of(model, ids), both)
    assert list(model.base_model.active_adapters) == ["actor", "critic"]
    assert model.active_adapter == "actor"  # PeftModel's own record, as `base_model.set_adapter` left it
    assert torch.equal(logits_of(model, ids), both)


def test_merge_and_unload_gives_the_unmerged_logits(ids):
    model = with_roles(make_base())
    model.set_adapter("critic")
    unmerged = logits_of(model, ids)
    critic_memory = model.init_memory(3).stm
    merged = model.merge_and_unload(adapter_names=["critic"])
    assert isinstance(merged, RxTForCausalLM) and not adapter_names(merged)
    torch.testing.assert_close(logits_of(merged, ids), unmerged, atol=1e-5, rtol=0)
    assert torch.equal(merged.init_memory(3).stm, critic_memory)  # the merged model keeps the critic's memory


def test_the_base_refuses_to_save_with_adapter_layers_injected(tmp_path, ids):
    """`get_peft_model` changes the base in place: saved as it was, the base's folder held PEFT's names and loaded
    with fresh weights in their place. The base saves again once the adapters are unloaded."""
    base = make_base()
    model = with_roles(base)
    for saved in (base, model.get_base_model()):
        with pytest.raises(ValueError, match="PEFT adapter layers.*unload"):
            saved.save_pretrained(tmp_path / "base")
    assert not (tmp_path / "base").exists()
    with model.disable_adapter():
        base_logits = logits_of(model, ids)
    unloaded = model.unload()
    with torch.no_grad():  # unload keeps the active adapter's initial memory (PEFT's rule for modules_to_save)
        unloaded.model.initial_memory.weight.copy_(make_base().model.initial_memory.weight)
    unloaded.save_pretrained(tmp_path / "base")
    torch.testing.assert_close(logits_of(RxTForCausalLM.from_pretrained(tmp_path / "base").eval(), ids), base_logits,
                               atol=1e-6, rtol=0)


def test_per_adapter_initial_memory_is_used_by_init_memory_and_forward(ids):
    model = with_roles(make_base())
    starts = {}
    for role in ROLES:
        model.set_adapter(role)
        starts[role] = model.init_memory(ids.shape[0])
        expected = rxt_model(model).model.initial_memory.modules_to_save[role].weight
        assert torch.equal(starts[role].stm[:, 0], expected)
        # A forward without `memory_state` reads the active adapter's initial memory.
        assert torch.equal(logits_of(model, ids), logits_of(model, ids, memory_state=starts[role]))
    assert not torch.equal(starts["actor"].stm, starts["critic"].stm)


def test_occupancy_is_measured_from_the_writing_adapters_initial_memory(ids):
    """With `memory_write_occupancy`, a slot is free while it holds its initial value: the writer's own (per-adapter)
    initial memory, not the base's, so a persona's first write is the plain competitive write."""
    model = with_roles(make_base(memory_write_type="competition", memory_write_occupancy=4.0))
    writes = {}
    for scale in (4.0, 0.0):
        with torch.no_grad():
            for layer in rxt_model(model).model.memory_attention:
                layer.occupancy_scale.fill_(scale)
            model.set_adapter("critic")
            start = model.init_memory(ids.shape[0])
            first = update_memory_with(model, start, ids, adapter="critic")
            writes[scale] = (first.stm, update_memory_with(model, first, ids, adapter="critic").stm)
    torch.testing.assert_close(writes[4.0][0], writes[0.0][0])  # nothing occupied yet
    assert not torch.allclose(writes[4.0][1], writes[0.0][1], atol=1e-4)  # the second write sees the first


# ---- mixed-adapter batches -------------------------------------------------------------------------------------------
def test_mixed_batch_equals_each_row_with_its_adapter(ids):
    model = with_roles(make_base())
    rows = ["critic", BASE_ADAPTER, "actor"]
    start = initial_memory_for(model, rows)
    with torch.no_grad():
        mixed = model(ids, adapter_names=rows, memory_state=start).logits
        generated = model.generate(
            input_ids=ids, adapter_names=rows, memory_state=start, max_new_tokens=4, do_sample=False
        )
    for row, role in enumerate(rows):
        with using_adapter(model, None if role == BASE_ADAPTER else role):
            alone = model.init_memory(1)
            assert torch.equal(start.select([row]).stm, alone.stm)
            torch.testing.assert_close(mixed[row : row + 1], logits_of(model, ids[row : row + 1]), atol=1e-6, rtol=0)
            single = model.generate(input_ids=ids[row : row + 1], memory_state=alone, max_new_tokens=4, do_sample=False)
            assert torch.equal(generated[row : row + 1], single)


@pytest.mark.parametrize("preset", ["memory-cross-attention", "full", "last-layer-read"])
def test_mixed_batch_with_beams_reads_each_rows_memory_through_its_adapter(ids, preset):
    """Under beam search PEFT repeats every row's adapter name per beam before `generate` projects the memory (once,
    per row): each row's memory must still go through its own adapter's key/value projections."""
    if preset == "last-layer-read":  # LoRA on the memory read of the last layer only
        model = with_roles(make_base(), "memory-cross-attention",
                           target_modules=r".*layers\.1\.memory_cross_attn\.(k_proj|v_proj)")
    else:
        model = with_roles(make_base(), preset)
    rows = ["critic", BASE_ADAPTER, "actor"]
    start = initial_memory_for(model, rows)
    settings = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, adapter_names=rows, memory_state=start, **settings)
    for row, role in enumerate(rows):
        with using_adapter(model, None if role == BASE_ADAPTER else role):
            single = model.generate(input_ids=ids[row : row + 1], memory_state=start.select([row]), **settings)
        assert torch.equal(generated[row : row + 1], single), role


def test_mixed_batch_external_memories_must_be_built_first(ids):
    model = with_roles(make_base(), "decoder")
    rows = ["critic", BASE_ADAPTER, "actor"]
    start = initial_memory_for(model, rows)
    memories = [torch.randint(4, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 30, 9)]
    settings = dict(memory_state=start, max_new_tokens=3, do_sample=False, external_memory_layers=[0, 1])
    built = rxt_model(model).build_external_memory(memories, layers=[0, 1])
    assert model.generate(input_ids=ids, adapter_names=rows, external_memories=built, **settings).shape == (3, 10)
    plain = model.generate(input_ids=ids, memory_state=start, max_new_tokens=3, do_sample=False)
    with pytest.raises(ValueError, match="build_external_memory"):
        model.generate(input_ids=ids, adapter_names=rows, external_memories=memories, **settings)
    # PEFT leaves the refused batch's adapter names on the model; generate removes them, or the next call (no mixed
    # batch asked) would run with them.
    assert mixed_adapter_rows(model) is None
    assert torch.equal(model.generate(input_ids=ids, memory_state=start, max_new_tokens=3, do_sample=False), plain)


def _paused_call(call):
    """Runs `call(streamer)` in a thread, paused after its first new token until the returned `resume` is set; returns
    (thread, resume, outcome)."""
    import threading

    from transformers.generation.streamers import BaseStreamer

    paused, resume, outcome = threading.Event(), threading.Event(), {}

    class Pauses(BaseStreamer):
        puts = 0

        def put(self, value):
            self.puts += 1
            if self.puts == 2:  # the prompt, then the first new token
                paused.set()
                resume.wait(30)

        def end(self):
            pass

    thread = threading.Thread(target=lambda: outcome.setdefault("ids", call(Pauses())), daemon=True)
    thread.start()
    assert paused.wait(30)
    return thread, resume, outcome


class _Fails:
    """A streamer that raises at the first token it gets: any error inside a call's generate."""

    def put(self, value):
        raise KeyboardInterrupt

    def end(self):
        pass


def test_a_call_failing_in_another_thread_leaves_a_running_mixed_batch_its_adapters(ids, caplog):
    """A failed call removed every mixed-adapter hook on the model, also those of another thread's mixed batch still
    generating, which then went on under the active adapter alone, without an error (a review's stress run: 9 of 15
    runs). While another thread's call runs, the hooks are left, with a warning."""
    import logging

    model = with_roles(make_base(), "decoder")
    rows = ["critic", BASE_ADAPTER, "actor"]
    settings = dict(memory_state=initial_memory_for(model, rows), max_new_tokens=6, do_sample=False)
    expected = model.generate(input_ids=ids, adapter_names=rows, **settings)
    thread, resume, generated = _paused_call(
        lambda streamer: model.generate(input_ids=ids, adapter_names=rows, streamer=streamer, **settings))
    with caplog.at_level(logging.WARNING, logger="modeling_rxt"), pytest.raises(ValueError):
        model.generate(input_ids=ids[:1], max_new_tokens=2, num_beams=0)  # refused by name
    resume.set()
    thread.join(60)
    assert torch.equal(generated["ids"], expected) and mixed_adapter_rows(model) is None
    assert "must not overlap other calls" in caplog.text


def test_a_mixed_batch_failing_while_another_thread_runs_leaves_it_its_answer(ids):
    """The other way round: the failing call is the mixed batch, while a plain call of another thread runs. Its hooks
    were registered after that call began, so they are not its own and go at once: they stayed (for good, in a first
    fix, and every later call ran with that batch's adapter names; in a second, until the plain call ended, which
    answered under them)."""
    model = with_roles(make_base(), "decoder")
    rows = ["critic", BASE_ADAPTER, "actor"]
    plain = dict(max_new_tokens=4, do_sample=False)
    before = model.generate(input_ids=ids, **plain)
    running, resume, outcome = _paused_call(lambda streamer: model.generate(input_ids=ids, streamer=streamer, **plain))
    with pytest.raises(KeyboardInterrupt):
        model.generate(input_ids=ids, adapter_names=rows, memory_state=initial_memory_for(model, rows),
                       streamer=_Fails(), **plain)
    assert mixed_adapter_rows(model) is None
    resume.set()
    running.join(60)
    assert torch.equal(outcome["ids"], before) and torch.equal(model.generate(input_ids=ids, **plain), before)


def test_hooks_registered_before_a_running_call_began_go_when_it_ends(ids):
    """Hooks of a mixed batch registered before another thread's call began may be that call's: a failed call leaves
    them until that call ends, then they go; a batch's hooks registered later are not touched."""
    import functools

    model = with_roles(make_base(), "decoder")
    lora_layer = next(module for module in model.modules() if hasattr(module, "lora_A"))

    def mixed_batch_hook():  # what PEFT registers for `adapter_names`, doing nothing here
        hook = functools.partial(lambda module, args, kwargs, adapter_names: None, adapter_names=["critic"])
        return lora_layer.register_forward_pre_hook(hook, with_kwargs=True), hook

    _, earlier = mixed_batch_hook()
    plain = dict(max_new_tokens=4, do_sample=False)
    running, resume, _ = _paused_call(lambda streamer: model.generate(input_ids=ids, streamer=streamer, **plain))
    with pytest.raises(ValueError):
        model.generate(input_ids=ids[:1], max_new_tokens=2, num_beams=0)  # refused by name
    assert earlier in lora_layer._forward_pre_hooks.values()  # might be the running call's
    _, later = mixed_batch_hook()  # a batch started after the failure
    resume.set()
    running.join(60)
    assert earlier not in lora_layer._forward_pre_hooks.values() and later in lora_layer._forward_pre_hooks.values()


def test_a_failed_call_leaves_the_hooks_of_a_batch_registered_after_it_began(ids):
    """PEFT registers a batch's hooks before calling the model: hooks registered while a call ran belong to a batch
    started since, which may not be counted yet. A failing call dropped them, and that batch answered without its
    adapters (1 of 120 stress runs)."""
    import functools
    import threading

    from transformers.generation.streamers import BaseStreamer

    model = with_roles(make_base(), "decoder")
    lora_layer = next(module for module in model.modules() if hasattr(module, "lora_A"))
    paused, resume, raised = threading.Event(), threading.Event(), []

    class PausesThenFails(BaseStreamer):
        puts = 0

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                paused.set()
                resume.wait(30)
                raise KeyboardInterrupt

        def end(self):
            pass

    def failing_call():
        try:
            model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, streamer=PausesThenFails())
        except KeyboardInterrupt as error:
            raised.append(error)

    failing = threading.Thread(target=failing_call, daemon=True)
    failing.start()
    assert paused.wait(30)
    hook = functools.partial(lambda module, args, kwargs, adapter_names: None, adapter_names=["critic"])
    handle = lora_layer.register_forward_pre_hook(hook, with_kwargs=True)  # a batch started meanwhile
    resume.set()
    failing.join(60)
    assert raised and hook in lora_layer._forward_pre_hooks.values()
    handle.remove()


def test_mixed_batch_without_a_memory_state_names_initial_memory_for(ids):
    model = with_roles(make_base())  # each adapter has its own initial memory, which PEFT cannot split by row
    rows = ["critic", BASE_ADAPTER, "actor"]
    for call in (lambda: model(input_ids=ids, adapter_names=rows),
                 lambda: model.generate(input_ids=ids, adapter_names=rows, max_new_tokens=2)):
        with pytest.raises(ValueError, match="initial_memory_for"):
            call()
    assert mixed_adapter_rows(model) is None


def test_mixed_batch_over_adapters_sharing_the_initial_memory_needs_no_memory_state(ids):
    """LoRA on the memory read (the `decoder` preset) and one shared initial memory: each row reads it through its own
    adapter. The memory shared by all rows was projected once, for one row, which PEFT's hooks refused."""
    model = with_roles(make_base(), "decoder")
    rows = ["critic", BASE_ADAPTER, "actor"]
    mixed = logits_of(model, ids, adapter_names=rows)
    for row, role in enumerate(rows):
        with using_adapter(model, None if role == BASE_ADAPTER else role):
            single = logits_of(model, ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], single, atol=1e-5, rtol=0)


def test_initial_memory_for_a_half_precision_model_is_float32_as_init_memory_is():
    """Its rows join a state from `init_memory` (float32 for a bfloat16 model too), and its gates blend in float32."""
    model = with_roles(make_base()).to(torch.bfloat16)
    state = initial_memory_for(model, ["critic", BASE_ADAPTER])
    assert state.dtype == torch.float32 == model.init_memory(1).dtype
    assert RxTMemoryState.concatenate([state, model.init_memory(1)]).batch_size == 3


def test_initial_memory_for_rejects_bad_input():
    model = with_roles(make_base())
    with pytest.raises(ValueError, match="'nobody'"):
        initial_memory_for(model, ["actor", "nobody"])
    with pytest.raises(TypeError, match="adapters"):
        initial_memory_for(model, "actor")
    with pytest.raises(TypeError, match="RxT"):
        rxt_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'nobody' is not loaded"):
        with using_adapter(model, "nobody"):
            pass


# ---- mixture of experts ----------------------------------------------------------------------------------------------
def test_lora_on_fused_experts_changes_outputs_saves_and_merges_exactly(tmp_path, ids):
    base = make_moe_base()
    reference = logits_of(base, ids)
    experts = base.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    model = get_peft_model(base, random_lora("experts"), adapter_name="experts").eval()
    adapted = logits_of(model, ids)
    assert not torch.allclose(adapted, reference, atol=1e-3)
    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), reference)
    save_adapters(model, tmp_path)
    assert torch.equal(logits_of(load_adapter(make_moe_base(), tmp_path / "experts", "experts"), ids), adapted)
    merged = model.merge_and_unload()
    assert not torch.equal(merged.model.layers[0].mlp.experts.gate_up_proj, experts)
    torch.testing.assert_close(logits_of(merged, ids), adapted, atol=1e-5, rtol=0)


# ---- memory under adapters -------------------------------------------------------------------------------------------
def test_generate_reads_memory_state_through_a_peft_model(ids):
    model = with_roles(make_base(), "memory-cross-attention")
    state = update_memory_with(model, model.init_memory(3), ids, adapter=None)
    for role in ROLES:
        model.set_adapter(role)
        generated = model.generate(input_ids=ids, memory_state=state, max_new_tokens=3, do_sample=False)
        first = logits_of(model, ids, memory_state=state)[:, -1].argmax(-1)
        assert torch.equal(generated[:, ids.shape[1]], first)
        other = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)  # the role's own initial memory
        assert torch.equal(other[:, ids.shape[1]], logits_of(model, ids)[:, -1].argmax(-1))


def test_update_memory_through_a_peft_model_with_an_explicit_writer(ids):
    model = with_roles(make_base(), "full")
    model.set_adapter("actor")
    old = model.init_memory(3)
    kept = old.stm.clone()
    by_base = update_memory_with(model, old, ids, adapter=None)
    by_critic = update_memory_with(model, old, ids, adapter="critic")
    by_active = model.update_memory(old, ids)  # attribute forwarding reaches RxTForCausalLM.update_memory
    assert isinstance(by_active, RxTMemoryState) and torch.equal(old.stm, kept)
    assert not torch.equal(by_base.stm, old.stm)
    assert not torch.allclose(by_base.stm, by_critic.stm, atol=1e-4)  # the full preset reaches the memory write
    assert torch.equal(by_active.stm, update_memory_with(model, old, ids, adapter="actor").stm)
    with model.disable_adapter():
        assert torch.equal(model.update_memory(old, ids).stm, by_base.stm)
        update_memory_with(model, old, ids, adapter="critic")  # leaves the adapters disabled, as it found them
        assert torch.equal(model.update_memory(old, ids).stm, by_base.stm)
    assert model.active_adapter == "actor"
    plain = make_base()  # a model without adapters: only the base can write
    assert torch.equal(update_memory_with(plain, old, ids, adapter=None).stm, plain.update_memory(old, ids).stm)
    with pytest.raises(ValueError, match="'actor' is not loaded"):
        update_memory_with(plain, old, ids, adapter="actor")


# ---- fine-tuning with Trainer ----------------------------------------------------------------------------------------
def project_task_rows(tokenizer, episodes) -> list[dict[str, list[int]]]:
    """The tell / update turns of the project's memory episodes ("my dog is called krodil ." -> "noted : your dog is
    called krodil ."), answer-only labels."""
    turns = interactions_dataset(episodes, kinds=(TELL, UPDATE))
    return [encode_interaction(tokenizer, row["query"], row["answer"]) for row in turns]


def heldout_loss(model, collate, rows) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**collate(rows)).loss)


def test_trainer_lora_finetune_lowers_heldout_loss_and_keeps_base_bit_identical(tmp_path):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    chat = [("hello .", "hi , how are you ?"), ("what is your name ?", "i am a bot .")]  # no corpus load needed
    train_episodes = make_episodes(60, turns=6, split="train", dialogue=chat)
    heldout_episodes = make_episodes(12, turns=6, split="validation", dialogue=chat)  # values never seen in train
    tokenizer = train_tokenizer(lm_texts(train_episodes, pairs=chat), vocab_size=MIN_VOCAB_SIZE + 128)
    train, heldout = project_task_rows(tokenizer, train_episodes), project_task_rows(tokenizer, heldout_episodes)
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    # LoRA leaves embeddings and norms frozen, so on a random base the logit scale is capped by the initial
    # embedding norm; a wider initialisation stands in for a pretrained base's larger embeddings.
    base = make_base(vocab_size=len(tokenizer), max_position_embeddings=64, initializer_range=0.2)
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = get_peft_model(base, lora_config("full", r=8, lora_dropout=0.0), adapter_name="notes")
    before = heldout_loss(model, collate, heldout)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        num_train_epochs=10,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        seed=0,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=train, data_collator=collate).train()
    after = heldout_loss(model, collate, heldout)
    assert after < 0.7 * before, (before, after)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "modules_to_save.notes" in n for n in trained)
    with model.disable_adapter():  # the base is untouched, bit for bit
        assert heldout_loss(model, collate, heldout) == before
    for name, tensor in rxt_model(model).named_parameters():
        if "lora_" not in name and "modules_to_save" not in name:
            assert torch.equal(tensor, frozen[name.replace(".base_layer", "").replace(".original_module", "")]), name


def test_refused_mixed_batch_forward_leaves_no_adapter_names(ids):
    model = with_roles(make_base(), "decoder")
    rows = ["critic", BASE_ADAPTER, "actor"]
    plain = model(input_ids=ids).logits
    bad = ids.clone()
    bad[0, 0] = rxt_model(model).config.vocab_size  # refused by name inside the model's forward
    with pytest.raises(ValueError, match="vocab"):
        model(input_ids=bad, adapter_names=rows)
    # PEFT leaves the failed call's adapter names on the model; the next plain call must not run with them.
    assert mixed_adapter_rows(model) is None
    assert torch.equal(model(input_ids=ids).logits, plain)


@pytest.mark.parametrize("entry", [None, ["critic"], "nope"])
def test_update_memory_per_row_names_a_bad_entry_of_adapters_before_writing(entry, ids, monkeypatch):
    model = with_roles(make_base())
    state = rxt_model(model).init_memory(2)
    writes = []
    monkeypatch.setattr(adapters_module, "update_memory_with", lambda *args, **kwargs: writes.append(args))
    with pytest.raises(ValueError, match=r"`adapters`.*" + re.escape(repr(entry))):
        adapters_module.update_memory_per_row(model, state, ids[:2], None, ["critic", entry])
    assert writes == []


def test_a_cache_continued_under_another_adapters_initial_memory_is_refused(ids):
    """Each adapter here has its own initial memory: a cache filled reading the actor's, continued after switching to
    the critic (no `memory_state` either time), would mix the two; refused, and continued under the actor again."""
    model = with_roles(make_base())
    with torch.no_grad():
        model.set_adapter("actor")
        cache = model(ids, use_cache=True).past_key_values
        model.set_adapter("critic")
        with pytest.raises(ValueError, match="`past_key_values`.*another memory"):
            model(ids[:, :1], past_key_values=cache)
        model.set_adapter("actor")
        model(ids[:, :1], past_key_values=cache)


def test_update_memory_per_row_hands_each_row_its_own_write_whatever_the_grouping():
    """Rows are written grouped by adapter and put back in order. With [A, B, B, A] the grouping [0, 3, 1, 2] is not
    its own inverse (unlike any order of 3 rows with two adapters), so rows handed back wrongly would show."""
    model = with_roles(make_base())
    names = ["actor", "critic", "critic", "actor"]
    ids = torch.randint(4, 64, (4, 7), generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(4)
    stm = rxt_model(model).init_memory(4).stm
    state = RxTMemoryState(stm + 0.1 * torch.randn(stm.shape, generator=generator))  # rows that differ
    with torch.no_grad():
        written = adapters_module.update_memory_per_row(model, state, ids, None, names)
        for row, name in enumerate(names):
            alone = update_memory_with(model, state.select([row]), ids[row:row + 1], adapter=name)
            assert torch.allclose(written.stm[:, row], alone.stm[:, 0], atol=1e-6), (row, name)


def test_the_adapter_helpers_name_prompt_learning_adapters(ids):
    """Prompt, prefix and P-tuning add virtual tokens to the decoder's input and never reach the write: the helpers
    that choose a writer failed on them with a bare TypeError ("'method' object is not iterable"). Refused by name;
    the PeftModel's own `update_memory` writes as the base."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    from modeling_rxt.adapters import update_memory_per_row

    for config in (PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"),
                   PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"),
                   PromptEncoderConfig(num_virtual_tokens=2, encoder_hidden_size=8, task_type="CAUSAL_LM")):
        model = get_peft_model(make_base(), config)
        state = model.init_memory(ids.shape[0])
        for call in (lambda: update_memory_with(model, state, ids, adapter=None),
                     lambda: update_memory_with(model, state, ids, adapter="default"),
                     lambda: update_memory_per_row(model, state, ids, None, ["default"] * ids.shape[0]),
                     lambda: using_adapter(model, None).__enter__()):
            with pytest.raises(ValueError, match=r"\['default'\] are prompt-learning adapters.*own `update_memory`"):
                call()
        written = model.update_memory(state, ids)
        assert torch.equal(written.stm, make_base().update_memory(state, ids).stm)
