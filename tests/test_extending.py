"""Extending mmformer from outside the package: a model subclass with its own config class saves and loads back
(``config_class``), the generic loader refuses its folder naming the way to load it, and every code block of
docs/extending.md runs (the subclass, a plain PyTorch loop, an own LightningModule, continuing a ``mmformer fit`` run
with an own Trainer — exactly, as ``--ckpt_path last`` does)."""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
import types
from pathlib import Path

import pytest
import torch
from cli_helpers import fit_in_process, max_diff, model_weights, tiny_config, write_config, write_pairs
from torch import nn

import mmformer
from mmformer.config import ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.io import pretrained

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "extending.md"
CONTINUE = "## Continue a `mmformer fit` run"  # the doc's section on continuing a fit run


@dataclasses.dataclass
class HeadConfig(ModelConfig):
    n_classes: int = 10


class HeadModel(mmformer.MultimodalTransformer):
    config_class = HeadConfig

    def __init__(self, config: HeadConfig):
        super().__init__(config)
        self.cls_head = nn.Linear(config.embed_dim, config.n_classes)

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.cls_head(self.encode_image(pixel_values))


def head_config(n_classes: int = 7) -> HeadConfig:
    return HeadConfig(
        stacks={"shared": StackConfig(width=32, depth=1, n_heads=2, cross_attention=True)},
        routes={"image": "shared", "text": "shared", "decoder": "shared"},
        image=ImageConfig(image_size=[16, 16], patch_size=8, channels=1),
        audio=None,
        text=TextConfig(vocab_size=64, max_length=8),
        embed_dim=16,
        n_classes=n_classes,
    )


def head_model() -> HeadModel:
    torch.manual_seed(0)
    return HeadModel(head_config()).eval()


def as_lightning_checkpoint(model: nn.Module, path: Path) -> Path:
    """What a LightningModule holding the model as ``self.model`` writes, with the config recorded where
    ``mmformer fit`` records it."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "mmformer": {"model_config": model.config.to_dict()}}, path)
    return path


@pytest.mark.parametrize("layout", ["folder", "lightning checkpoint", "safetensors file"])
def test_a_subclass_with_its_own_config_loads_back_as_itself(tmp_path, layout):
    """What save_pretrained writes of a subclass (its config's extra field, its head's weights), from_pretrained on
    that subclass reads back — from a folder, a Lightning .ckpt and a bare .safetensors (the config in its
    metadata) — as the subclass with its config class and the same outputs. Before config_class these were refused
    ("ModelConfig: unknown keys ['n_classes']") unless config= was passed by hand."""
    model = head_model()
    if layout == "lightning checkpoint":
        path = as_lightning_checkpoint(model, tmp_path / "run.ckpt")
    else:
        model.save_pretrained(tmp_path / "model")
        path = tmp_path / "model"
        if layout == "safetensors file":  # alone: its config is read from the header's metadata
            path = (tmp_path / "model" / pretrained.WEIGHTS_NAME).rename(tmp_path / "weights.safetensors")
    loaded = HeadModel.from_pretrained(path)
    assert type(loaded) is HeadModel and type(loaded.config) is HeadConfig
    assert loaded.config == model.config
    pixels = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.classify(pixels), model.classify(pixels), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["folder", "lightning checkpoint"])
def test_the_generic_loader_refuses_a_subclass_folder_naming_its_from_pretrained(tmp_path, layout):
    """mmformer.from_pretrained (and MultimodalTransformer.from_pretrained) cannot know a subclass's fields: the
    refusal names them and says to load with that model class's from_pretrained (its config_class)."""
    model = head_model()
    if layout == "folder":
        model.save_pretrained(tmp_path / "model")
        path = tmp_path / "model"
    else:
        path = as_lightning_checkpoint(model, tmp_path / "run.ckpt")
    for load in (mmformer.from_pretrained, mmformer.MultimodalTransformer.from_pretrained):
        with pytest.raises(ValueError, match=r"no field of mmformer ModelConfig: \['n_classes'\]") as e:
            load(path)
        assert "from_pretrained(path)" in str(e.value) and "config_class" in str(e.value)


def test_a_subclass_refuses_a_config_of_another_class(tmp_path):
    """A subclass built or loaded with a plain ModelConfig is refused with a TypeError naming its config class,
    not an AttributeError from inside its __init__."""
    plain = ModelConfig(**{f.name: getattr(head_config(), f.name) for f in dataclasses.fields(ModelConfig)})
    with pytest.raises(TypeError, match=r"config: expected HeadConfig \(HeadModel.config_class\), got ModelConfig"):
        HeadModel(plain)
    head_model().save_pretrained(tmp_path / "model")
    with pytest.raises(TypeError, match=r"config: expected HeadConfig or None, got ModelConfig"):
        HeadModel.from_pretrained(tmp_path / "model", config=plain)


# ------------------------------------------------------------------------------------------ docs/extending.md
def doc_sections() -> dict[str, list[tuple[str, str]]]:
    """The doc's ``## `` sections → their code blocks, as (language, code) in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    for part in re.split(r"^(?=## )", DOC.read_text(encoding="utf-8"), flags=re.M):
        heading = part.splitlines()[0]
        sections[heading] = re.findall(r"^```(\w+)\n(.*?)^```", part, flags=re.S | re.M)
    return sections


def run_block(language: str, code: str, namespace: dict) -> None:
    """A python block executed in ``namespace``; a bash block's ``mmformer fit`` commands run in this process."""
    if language == "python":
        exec(compile(code, str(DOC), "exec", dont_inherit=True), namespace)  # not this file's __future__ imports
        return
    assert language == "bash", language
    for line in code.splitlines():
        argv = shlex.split(line, comments=True)
        assert argv[:2] == ["mmformer", "fit"], line  # the only command the doc runs
        fit_in_process(*_config_and_args(argv[2:]))


def _config_and_args(args: list[str]) -> tuple[str, ...]:
    at = args.index("--config")
    return args[at + 1], *args[:at], *args[at + 2 :]


@pytest.fixture
def doc_module(monkeypatch) -> dict:
    """The namespace the doc's blocks run in: a module's, registered as a script's is (dataclasses look their
    class's module up)."""
    module = types.ModuleType("extending_doc")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__dict__


@pytest.fixture
def in_a_clone(tmp_path, monkeypatch) -> Path:
    """A working folder where the doc's relative paths resolve as in a clone of the repository (``data/``), and
    what it writes stays in ``tmp_path``."""
    (tmp_path / "data").symlink_to(REPO / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_doc_has_only_blocks_these_tests_run():
    """Every block is python (executed) or bash (`mmformer fit` commands, run in process), and the continuation
    section, which the last test runs apart, is where it looks for it."""
    sections = doc_sections()
    assert any(heading.startswith(CONTINUE) for heading in sections), list(sections)
    assert {language for blocks in sections.values() for language, _ in blocks} == {"python", "bash"}


def test_the_doc_subclass_loop_and_lightning_module(in_a_clone, doc_module):
    """docs/extending.md up to its continuation section: the subclass from the digits model, its save/load and the
    generic loader's refusal, a plain loop and an own LightningModule whose .ckpt loads as the subclass."""
    namespace = doc_module
    with pytest.warns(UserWarning, match="missing keys .*cls_head") as caught:  # strict=False: the new head
        for heading, blocks in doc_sections().items():
            if not heading.startswith(CONTINUE):
                for language, code in blocks:
                    run_block(language, code, namespace)
    # the doc puts the loaded model (eval mode) in train mode before Lightning trains it (which keeps the mode)
    assert not [w.message for w in caught if "eval mode" in str(w.message)]
    trained, model = namespace["trained"], namespace["model"]
    assert type(trained) is namespace["Classifier"] and trained.config == model.config
    assert max_diff(trained.state_dict(), model.state_dict()) == 0  # the .ckpt holds the weights the trainer left
    assert namespace["trainer"].global_step == 4


def test_the_doc_continues_a_fit_run_exactly_as_ckpt_path_last(in_a_clone, doc_module):
    """The doc's continuation: ``mmformer fit`` stops after 4 steps (``my_run.yaml``, dropout 0.1, its schedule set
    for 8), an own Trainer continues it to 8 and ends with the weights of ``fit --ckpt_path last --trainer.max_steps
    8``; without RandomStateCallback it ends elsewhere (about 2e-3 on this run), as the doc says."""
    data = write_pairs(in_a_clone / "pairs")
    settings = tiny_config(
        in_a_clone,
        data,
        max_steps=4,
        model={"model": {"stacks": {"shared": {"dropout": 0.1}}}, "schedule": {"max_steps": 8}},
    )
    settings["trainer"]["callbacks"][0]["init_args"]["dirpath"] = "runs/my_run/checkpoints"
    write_config(in_a_clone / "my_run.yaml", settings)
    blocks = next(blocks for heading, blocks in doc_sections().items() if heading.startswith(CONTINUE))
    namespace = doc_module
    for language, code in blocks:
        run_block(language, code, namespace)
    assert namespace["trainer"].global_step == 8
    continued = model_weights(namespace["task"])

    import lightning as L

    from mmformer.data.datamodule import MultimodalDataModule
    from mmformer.tasks.module import MultimodalTask

    ckpt = namespace["ckpt"]  # still the 4-step last.ckpt: the doc's trainer writes its checkpoints elsewhere
    task = MultimodalTask.load_from_checkpoint(ckpt)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(task, datamodule=MultimodalDataModule.load_from_checkpoint(ckpt), ckpt_path=ckpt)
    assert max_diff(model_weights(task), continued) > 1e-4  # without RandomStateCallback: 2.0e-3 measured

    reference = fit_in_process("my_run.yaml", "--ckpt_path", "last", "--trainer.max_steps", "8")
    assert reference.trainer.global_step == 8
    assert max_diff(continued, model_weights(reference.model)) == 0
