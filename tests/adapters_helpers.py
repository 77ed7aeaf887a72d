"""What the adapter tests share: a tiny base (dense or mixture of experts), LoRA presets with random factors, three
role adapters on one base, the logits of a model and its in-place state (to check that a refused load leaves it as it
was). Every test builds its own base because PEFT injects into it in place. The `ids` fixture is in conftest.py."""

import torch
from peft import PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper

from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.adapters import lora_config, rxt_model

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    memory_slots=4,
    max_position_embeddings=48,
    memory_attention_type="gated-self-interlayer",  # so the memory-attention preset meets every module it names
)
ROLES = ("actor", "critic", "regenerator")


def make_base(seed: int = 0, **overrides) -> RxTForCausalLM:
    torch.manual_seed(seed)
    return RxTForCausalLM(RxTConfig(**{**TINY, **overrides})).eval()


def make_moe_base(seed: int = 0) -> RxTForCausalLM:
    return make_base(seed, num_local_experts=4, num_experts_per_tok=2)


def random_lora(name: str = "full", **overrides):
    """A preset with random (non-zero) LoRA factors, so an untrained adapter already changes the outputs."""
    return lora_config(name, init_lora_weights=False, lora_dropout=0.0, **overrides)


def with_roles(base: RxTForCausalLM, preset: str = "full", **overrides) -> PeftModel:
    """Three adapters on one base, each with its own (perturbed) initial memory when the preset saves one."""
    model = get_peft_model(base, random_lora(preset, **overrides), adapter_name=ROLES[0])
    for role in ROLES[1:]:
        model.add_adapter(role, random_lora(preset, **overrides))
    initial = rxt_model(model).model.initial_memory
    if isinstance(initial, ModulesToSaveWrapper):
        with torch.no_grad():
            for shift, role in enumerate(ROLES, start=1):
                initial.modules_to_save[role].weight.add_(0.1 * shift)
    model.set_adapter(ROLES[0])
    return model.eval()


def in_place_state(model) -> tuple:
    """What loading an adapter changes in the caller's model in place: the module tree, each module's attributes,
    the weights and which of them train."""
    modules = [(name, type(module), sorted(vars(module))) for name, module in model.named_modules()]
    return modules, {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}


def assert_in_place_state(model, expected: tuple) -> None:
    modules, parameters = in_place_state(model)
    assert modules == expected[0]
    assert parameters.keys() == expected[1].keys()
    for name, (value, trains) in parameters.items():
        assert torch.equal(value, expected[1][name][0]) and trains == expected[1][name][1], name


def files_under(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def logits_of(model, ids, role=None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        if role is not None:
            model.set_adapter(role)
        return model(ids, **kwargs).logits
