"""The README's Python code blocks run as written: they are what a new user copies.

Every ```python block of README.md is either run here (RUN) or listed with the reason it cannot run in a test
(NOT_RUNNABLE); `test_every_python_block_is_run_or_listed` fails on a block that is neither, so a new snippet is
covered the day it is added. A block is named by its `## ` section and its number in that section ("## Use #1").

A block runs as written, in a fresh namespace, in an empty temporary working folder (the relative folders it writes,
"my_conversation", "rxt-base", "chats/alice", land there), and what its comments promise is checked after it. What
it takes as given (`model`, `tokenizer`, `state`, `doc_ids_row0`, the sessions `alice` / `bob` / `carol`, ...) is
set by its context function in RUN, from a tiny model built from the `nano` preset (its 2 layers, the demo model's
depth; 32 wide) and saved with its tokenizer to a temporary folder. A model folder a block loads by a name in
MODEL_PATHS (the demo's folders) becomes that tiny folder: the block's string literals equal to one are replaced,
and nothing else of a block is changed. A block listed as not runnable is still compiled, and the names it imports
and the calls it makes of them are checked against the package (`test_listed_blocks_name_real_apis`).
"""

import ast
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from configuration import load_preset
from modeling_rxt import RxTForCausalLM, RxTMemoryState  # importing the package registers "rxt" with the Auto classes
from modeling_rxt.chat import RxTChatSession
from modeling_rxt.tokenization import BOS_TOKEN, EOS_TOKEN, MIN_VOCAB_SIZE, PAD_TOKEN, train_tokenizer

README = Path(__file__).resolve().parent.parent / "README.md"

# Fence info strings taken for Python. A fence without a language could hold Python too: it must be listed as well.
PYTHON_TAGS = {"python", "py", "python3", "py3", "pycon", "ipython"}

# String literals of a block that name a model to load (the demo's exported and trained folders): a test loads the
# tiny model's folder in their place. Output folders a block writes are not here: they are relative and land in the
# temporary working folder. (No runnable block loads a model by path today.)
MODEL_PATHS = ("runs/demo/hub", "runs/demo/model")

TEXTS = ["my cat is called bimo .", "what is my cat called ?", "hello there , how are you ?", "i live in paris .",
         "where do i live ?", "hi", "thanks"]


# ---- the README's blocks --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    key: str  # "## Section #n"
    line: int  # 1-based line of the block's first code line in README.md
    language: str
    source: str


def readme_blocks(text: str) -> list[Block]:
    """Every fenced code block of `text` that is Python or has no language, named by its `## ` section."""
    blocks, counts = [], {}
    section, fence, language, start, body = "(before any ## section)", None, "", 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None:
            opening = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)", line)
            if opening:
                fence, language, start, body = opening.group(1), opening.group(2).lower(), number + 1, []
            elif re.match(r"^## ", line):
                section = line.strip()
            continue
        if re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", line):
            if language in PYTHON_TAGS or not language:
                counts[section] = counts.get(section, 0) + 1
                blocks.append(Block(f"{section} #{counts[section]}", start, language, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"README.md: the fence opened before line {start} is never closed"
    return blocks


BLOCKS = {block.key: block for block in readme_blocks(README.read_text(encoding="utf-8"))}


# ---- what the runnable blocks take as given -------------------------------------------------------------------------
def no_context(folder: Path) -> dict:
    """The block builds its own model (from a preset or a config)."""
    return {}


def external_memory_context(folder: Path) -> dict:
    """`model`, a batch of 2 prompts (the second left-padded) with their memory `state`, a document per row
    (`doc_ids_row0`, `doc_ids_row1`) and one more to add to every row (`more_ids`, one row)."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    generator = torch.Generator().manual_seed(1)
    ids = lambda *shape: torch.randint(8, model.config.vocab_size, shape, generator=generator)  # no special ids
    query_ids, mask = ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    query_ids[1, :2], mask[1, :2] = model.config.pad_token_id, 0
    return dict(model=model, doc_ids_row0=ids(40), doc_ids_row1=ids(90), query_ids=query_ids, mask=mask,
                state=model.init_memory(batch_size=2), more_ids=ids(1, 20))


def chat_context(folder: Path) -> dict:
    """`model` and `tokenizer` loaded from the folder, and three sessions `alice`, `bob`, `carol` on them."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    sessions = {name: RxTChatSession(model, tokenizer) for name in ("alice", "bob", "carol")}
    return dict(model=model, tokenizer=tokenizer, **sessions)


# ---- what a run block's comments promise, checked after it ran (cwd: its working folder) ---------------------------
def check_use(names: dict) -> None:
    assert isinstance(names["state"], RxTMemoryState)
    assert {p.name for p in Path("my_conversation").iterdir()} >= {"memory_state.safetensors", "memory_state.json"}


def check_adapters(names: dict) -> None:
    assert names["model"].active_adapter == "actor"  # '"actor" is active'
    assert (Path("rxt-adapters") / "actor").is_dir() and (Path("rxt-adapters") / "critic").is_dir()
    assert names["out"].shape[0] == 3


def check_external_memory(names: dict) -> None:
    idx, model = names["idx"], names["model"]
    assert idx.shape[:2] == (2, model.config.num_attention_heads) and idx.shape[-1] == 8  # (B, heads, queries, k)
    assert names["memory"].lengths.tolist() == [40 + 20, 0]  # row 0 got the added memory, row 1 was cleared
    assert names["memory"].layers == (0, 1)


def check_chat(names: dict) -> None:
    assert (Path("chats") / "alice" / "session.json").is_file()
    assert len(names["session"].messages) == 4  # the loaded session holds both turns
    assert all(len(names[person].messages) == 2 for person in ("alice", "bob", "carol"))
    assert {"wait_s", "first_token_s", "generate_s", "write_s"} <= set(vars(names["session"].timings[-1]))


@dataclass(frozen=True)
class Run:
    context: Callable[[Path], dict]
    check: Callable[[dict], None]


RUN = {
    "## Use #1": Run(no_context, check_use),
    "## Adapters (PEFT LoRA): several roles on one base #1": Run(no_context, check_adapters),
    "## External memory: long documents at generation time #1": Run(external_memory_context, check_external_memory),
    "## Chat sessions #1": Run(chat_context, check_chat),
}

NOT_RUNNABLE = {
    "## Training (the curriculum on HF `Trainer`) and what the demo model remembers #1":
        "trains the `demo` recipe: about 14 minutes on 2 cores (even the `tiny` recipe takes ~60 s); the curriculum "
        "itself is tested in tests/test_curriculum.py",
}


# ---- the tiny model the blocks run against --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny RxT model from the `nano` preset (2 layers, as `nano` and the demo model) with a tokenizer (with the
    chat template), saved together."""
    tokenizer = train_tokenizer(TEXTS * 5, vocab_size=MIN_VOCAB_SIZE + 40)
    torch.manual_seed(0)
    config = load_preset(
        "nano", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, memory_slots=4, max_position_embeddings=64,
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN), bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
    )
    folder = tmp_path_factory.mktemp("tiny-rxt")
    RxTForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class ModelPaths(ast.NodeTransformer):
    """Replaces the string literals of MODEL_PATHS by the tiny model's folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def visit_Constant(self, node):
        if isinstance(node.value, str) and node.value in MODEL_PATHS:
            return ast.copy_location(ast.Constant(self.folder), node)
        return node


def compiled(block: Block, tiny_folder: Path | None = None):
    tree = ast.parse(block.source, filename=f"README.md, {block.key}")
    if tiny_folder is not None:
        tree = ast.fix_missing_locations(ModelPaths(tiny_folder).visit(tree))
    ast.increment_lineno(tree, block.line - 1)  # tracebacks point at README.md's own lines
    return compile(tree, "README.md", "exec")


# ---- tests ----------------------------------------------------------------------------------------------------------
def test_every_python_block_is_run_or_listed():
    assert BLOCKS, "no ```python block found in README.md: the parser or the README changed"
    unlisted = sorted(set(BLOCKS) - set(RUN) - set(NOT_RUNNABLE))
    assert not unlisted, (
        f"README.md blocks neither run nor listed as not runnable in {Path(__file__).name}: "
        + "; ".join(f"{key!r} (line {BLOCKS[key].line})" for key in unlisted)
    )
    stale = sorted((set(RUN) | set(NOT_RUNNABLE)) - set(BLOCKS))
    assert not stale, f"entries naming no README.md block (a section renamed or a block removed?): {stale}"
    assert not set(RUN) & set(NOT_RUNNABLE)


def test_the_parser_finds_blocks_by_section():
    text = "```bash\nmake\n```\n## A\n```python\nx = 1\n```\ntext\n```\ny\n```\n## B\n  ```py\nz\n  ```\n"
    assert [(b.key, b.line, b.language, b.source) for b in readme_blocks(text)] == [
        ("## A #1", 6, "python", "x = 1\n"), ("## A #2", 10, "", "y\n"), ("## B #1", 14, "py", "z\n"),
    ]


@pytest.mark.parametrize("key", sorted(RUN))
def test_readme_block_runs(key, tiny_folder, tmp_path, monkeypatch):
    if key not in BLOCKS:
        pytest.fail(f"{key!r} is in RUN but not in README.md (see test_every_python_block_is_run_or_listed)")
    block, run = BLOCKS[key], RUN[key]
    code = compiled(block, tiny_folder)
    names = {"__name__": "__readme__", **run.context(tiny_folder)}
    monkeypatch.chdir(tmp_path)
    grad_enabled = torch.is_grad_enabled()  # a block may switch autograd off for the whole process
    try:
        exec(code, names)
        run.check(names)
    finally:
        torch.set_grad_enabled(grad_enabled)
        for value in names.values():
            if isinstance(value, RxTChatSession):
                value.close()


@pytest.mark.parametrize("key", sorted(NOT_RUNNABLE))
def test_listed_blocks_name_real_apis(key):
    """A block that cannot run still compiles, imports names that exist and calls them with arguments that bind to
    their signatures."""
    if key not in BLOCKS:
        pytest.fail(f"{key!r} is in NOT_RUNNABLE but not in README.md (see test_every_python_block_is_run_or_listed)")
    block = BLOCKS[key]
    compiled(block)
    tree = ast.parse(block.source)
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds `a`, `import a.b as c` binds `c` to `a.b`
                module = importlib.import_module(alias.name)
                top = alias.name.split(".")[0]
                imported[alias.asname or top] = module if alias.asname else importlib.import_module(top)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{key}: `{node.module}` has no `{alias.name}`"
                imported[alias.asname or alias.name] = getattr(module, alias.name)

    def resolve(expr):
        if isinstance(expr, ast.Name):
            return imported.get(expr.id)
        if isinstance(expr, ast.Attribute):
            owner = resolve(expr.value)
            if owner is not None:
                assert hasattr(owner, expr.attr), f"{key}: {ast.unparse(expr.value)} has no `{expr.attr}`"
                return getattr(owner, expr.attr)
        return None

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or (function := resolve(node.func)) is None:
            continue
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            continue
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):  # a builtin without one
            continue
        try:
            signature.bind(*node.args, **{k.arg: k.value for k in node.keywords})
        except TypeError as error:
            pytest.fail(f"{key}, line {block.line + node.lineno - 1}: `{ast.unparse(node)}`: {error}")
