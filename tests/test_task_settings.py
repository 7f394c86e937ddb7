"""The task's option groups (``mmformer/tasks/settings.py``): each validated with the key a user writes; the flat keys
of earlier releases still train, with a FutureWarning naming the new key (in a YAML file, as command-line flags, as
constructor arguments and in an old checkpoint's hyper-parameters, loaded and resumed); ``configs/`` use the new keys;
and the zero-shot logit has one formula, used by the classifier, the task's evaluation and CoOp's loss."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from cli_helpers import (
    WORDS,
    checkpoint,
    fit_in_process,
    max_diff,
    model_weights,
    tiny_config,
    write_config,
    write_pairs,
)

import mmformer
from mmformer import ModelConfig, MultimodalTransformer, Processor, ZeroShotClassifier
from mmformer.adapt.prompts import ContextPrompt
from mmformer.preprocess.processor import ImageProcessorConfig
from mmformer.preprocess.tokenizer import Tokenizer
from mmformer.tasks import MultimodalTask
from mmformer.tasks.adapt import context_prompt_losses
from mmformer.tasks.settings import RENAMED, DistillSettings, ObjectiveSettings, ScheduleSettings, ZeroShotSettings
from mmformer.zeroshot import build_class_embeddings

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
BASE = "{base}"  # stands for the saved tiny model (init_from, teacher)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Image–caption pairs, and a tiny saved model with its processor: the tokenizer every run reads, the model that
    init_from starts from and the teacher distils from."""
    root = tmp_path_factory.mktemp("settings")
    train = write_pairs(root, n=8)
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    tokenizer = Tokenizer.train(texts, vocab_size=280, max_length=8)
    config = tiny_config(root, train)["model"]["model"]
    config = ModelConfig.from_dict({**config, "text": {**config["text"], "vocab_size": tokenizer.vocab_size}})
    torch.manual_seed(1)
    image = ImageProcessorConfig(image_size=[16, 16], channels=1, mean=(0.5,), std=(0.5,))
    MultimodalTransformer(config).save_pretrained(root / "base", processor=Processor(tokenizer, image))
    return root, train


def fill(value, base: Path):
    """``value`` with the BASE placeholder replaced by the saved model's path."""
    if isinstance(value, dict):
        return {k: fill(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, base) for v in value]
    return str(base) if value == BASE else value


def one_step_config(workspace, tmp_path, **model) -> Path:
    """A 1-step run on the workspace's pairs with its tokenizer, no checkpoints, and ``model`` merged into the task's
    options (None deletes a key)."""
    root, train = workspace
    config = tiny_config(
        tmp_path,
        train,
        max_steps=1,
        trainer={"callbacks": [], "enable_checkpointing": False},
        data={"tokenizer": str(root / "base" / "tokenizer.json")},
        model=fill(model, root / "base"),
    )
    return write_config(tmp_path / "config.yaml", config)


AUDIO_CTC = {"routes": {"audio": "shared"}, "audio": {"n_mels": 16, "max_frames": 64}, "ctc_head": True}
NO_MODEL = {"model": None}  # init_from brings its own
# old key: (its value in an old YAML file, the new options it needs beside it to mean something)
CASES = {
    "contrastive_weight": (0.5, {}),
    "caption_weight": (0.25, {}),
    "speech_weight": (0.0, {}),
    "ctc_weight": (0.3, {"model": AUDIO_CTC}),
    "lm_weight": (0.5, {}),
    "mlm_weight": (0.5, {"model": {"mlm_head": True, "text": {"mask_id": 3}}}),
    "moe_aux_weight": (0.1, {"model": {"stacks": {"shared": {"n_experts": 2, "experts_top_k": 1}}}}),
    "mlm_probability": (0.3, {}),
    "packed_attention": ("document", {}),
    "contrastive_loss": ("siglip", {"model": {"logit_bias_init": -10.0}}),
    "warmup_steps": (1, {}),
    "max_steps": (5, {}),
    "min_lr_ratio": (0.1, {}),
    "zeroshot_classes": (["zero", "one"], {}),
    "zeroshot_templates": (["a {}", "the {}"], {}),
    "zeroshot_batch_size": (8, {}),
    "val_generate": (True, {}),
    "generate_max_new_tokens": (4, {}),
    "init_from": (BASE, NO_MODEL),
    "init_strict": (False, {**NO_MODEL, "adapt": {"init_from": BASE}}),
    "resize_vocab": (True, {**NO_MODEL, "adapt": {"init_from": BASE}}),
    "trainable": (["heads"], {}),
    "frozen": (["image"], {}),
    "lora": ({"r": 2, "lora_alpha": 4.0}, {}),
    "prompt": ({"kind": "decoder_prefix", "length": 2}, {"objectives": {"contrastive": 0.0}}),
    "teacher": (BASE, {}),
    "distill_temperature": (2.0, {"distill": {"teacher": BASE}}),
    "distill_weight": (0.25, {"distill": {"teacher": BASE}}),
    "distill_feature_weight": (0.5, {"distill": {"teacher": BASE}}),
}


def test_every_renamed_key_has_a_case():
    assert set(CASES) == set(RENAMED)


def renamed_warning(old: str) -> str:
    group, name = RENAMED[old]
    return re.escape(f"{old} → {group}.{name}")


@pytest.mark.parametrize("old", list(CASES))
def test_an_old_yaml_key_still_trains_with_a_warning_naming_the_new_key(old, workspace, tmp_path):
    value, beside = CASES[old]
    group, name = RENAMED[old]
    config = one_step_config(workspace, tmp_path, **beside, **{old: value})
    with pytest.warns(FutureWarning, match=renamed_warning(old)):
        cli = fit_in_process(config)
    task, expected = cli.model, fill(value, workspace[0] / "base")
    assert cli.trainer.global_step == 1  # it trained
    if old == "teacher":  # the teacher is loaded, never stored
        assert task.distiller is not None and "teacher" not in task.hparams["distill"]
    elif isinstance(value, dict):  # lora, prompt: the adapter's settings, with its defaults
        assert {k: task.hparams[group][name][k] for k in value} == value
    else:
        assert task.hparams[group][name] == expected
    # the config LightningCLI saves beside the run has the new key only
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert old not in saved
    assert saved[group][name] == expected or isinstance(value, dict) or old == "teacher"
    if old == "init_from":  # the link to the data module's processor holds for the old key too
        assert cli.datamodule.hparams.processor_from == expected


def test_old_command_line_flags_move_like_yaml_keys_and_the_new_flags_take_json(workspace, tmp_path):
    config = one_step_config(workspace, tmp_path)
    old = ["--model.caption_weight", "0.25", "--model.lora", '{"r": 2}', "--model.zeroshot_classes", '["one"]']
    with pytest.warns(FutureWarning, match=renamed_warning("lora")):
        cli = fit_in_process(config, *old, run=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*deprecated flat options", category=FutureWarning)
        new = ["--model.objectives.caption", "0.25", "--model.adapt.lora", '{"r": 2}', "--model.zeroshot.classes",
               '["one"]']  # fmt: skip
        fresh = fit_in_process(config, *new, run=False)
    for task in (cli.model, fresh.model):
        assert task.objectives.caption == 0.25 and task.zeroshot.classes == ["one"]
        assert task.hparams["adapt"]["lora"]["r"] == 2
    assert cli.model.hparams == fresh.model.hparams


def test_old_constructor_arguments_equal_the_groups_and_unknown_ones_are_named():
    config = ModelConfig()
    with pytest.warns(FutureWarning, match=r"caption_weight → objectives\.caption.*warmup_steps → schedule"):
        old = MultimodalTask(config, caption_weight=0.5, warmup_steps=3, zeroshot_classes=["a", "b"])
    new = MultimodalTask(
        config,
        objectives=ObjectiveSettings(caption=0.5),
        schedule={"warmup_steps": 3},
        zeroshot={"classes": ["a", "b"]},
    )
    assert old.hparams == new.hparams
    assert old.objectives == new.objectives and old.schedule == new.schedule and old.zeroshot == new.zeroshot
    with pytest.raises(TypeError, match=r"unexpected options \['caption_wieght'\]"):
        MultimodalTask(config, caption_wieght=0.5)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ObjectiveSettings(ctc=-1.0), r"objectives\.ctc: expected a number >= 0, got -1\.0"),
        (lambda: ObjectiveSettings(caption=True), r"objectives\.caption: expected a number >= 0, got True"),
        (lambda: ObjectiveSettings(contrastive_loss="info"), r"objectives\.contrastive_loss: expected one of"),
        (lambda: ObjectiveSettings(mlm_probability=1.0), r"objectives\.mlm_probability: expected a number in \(0, 1\)"),
        (lambda: ScheduleSettings(max_steps=0), r"schedule\.max_steps: expected an int >= 1 or None, got 0"),
        (lambda: ScheduleSettings(warmup_steps=-1), r"schedule\.warmup_steps must be an int >= 0, got -1"),
        (lambda: ZeroShotSettings(templates=["a photo"]), r"zeroshot\.templates\[0\]: expected a template with '\{\}'"),
        (lambda: ZeroShotSettings(classes=["a", "a"]), r"zeroshot\.classes: expected distinct names"),
        (lambda: ZeroShotSettings(batch_size=0), r"zeroshot\.batch_size: expected an int >= 1, got 0"),
        (lambda: DistillSettings(temperature=0), r"distill\.temperature: expected a number > 0, got 0"),
        (lambda: DistillSettings(weight=1.5), r"distill\.weight: expected a number in \[0, 1\]"),
        (lambda: MultimodalTask(ModelConfig(), adapt={"lora": {"r": 2}, "prompt": {}}), r"train one kind of adapter"),
        (lambda: MultimodalTask(ModelConfig(), generation={"max_new_tokens": 0}), r"generation\.max_new_tokens"),
        (lambda: MultimodalTask(ModelConfig(), adapt={"frozen": "image"}), r"adapt\.frozen: expected a list"),
    ],
)
def test_each_group_validates_and_names_the_key(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_configs_use_the_new_keys():
    assert CONFIGS
    for path in CONFIGS:
        options = yaml.safe_load(path.read_text())["model"]
        assert not set(options) & set(RENAMED), f"{path.name}: {sorted(set(options) & set(RENAMED))}"


# ---------------------------------------------------------------------------------------------------- checkpoints
def old_hyper_parameters(model: dict) -> dict:
    """The hyper-parameters ``mmformer fit`` wrote before the options were grouped (flat keys; the CLI's instantiator),
    with caption 0.5, two zero-shot classes, and a 2-step schedule."""
    return {
        "contrastive_weight": 1.0, "caption_weight": 0.5, "speech_weight": 1.0, "ctc_weight": 0.0, "lm_weight": 0.0,
        "mlm_weight": 0.0, "mlm_probability": 0.15, "packed_attention": "none", "moe_aux_weight": 0.01,
        "contrastive_loss": "clip", "optimizer": "mmformer.tasks.adamw", "warmup_steps": 2, "max_steps": 4,
        "min_lr_ratio": 0.0, "zeroshot_classes": ["zero", "one"], "zeroshot_templates": ["{}"],
        "zeroshot_batch_size": 64, "val_generate": False, "generate_max_new_tokens": 16, "nonfinite": "stop",
        "compile": False, "init_from": None, "init_strict": True, "resize_vocab": False, "trainable": None,
        "frozen": None, "distill_temperature": 1.0, "distill_weight": 0.5, "distill_feature_weight": 0.0, "qat": None,
        "vocab_size": model["text"]["vocab_size"], "_instantiator": "lightning.pytorch.cli.instantiate_module",
        "model": model, "lora": None, "prompt": None,
    }  # fmt: skip


def test_a_checkpoint_with_the_old_flat_hyper_parameters_loads_and_resumes(workspace, tmp_path):
    root, train = workspace
    options = {"objectives": {"caption": 0.5}, "zeroshot": {"classes": ["zero", "one"]}}
    config = tiny_config(tmp_path, train, max_steps=4, every=2, model=options)
    config["data"]["tokenizer"] = str(root / "base" / "tokenizer.json")
    path = write_config(tmp_path / "config.yaml", config)
    first = fit_in_process(path, "--trainer.max_steps", "2")  # stops half-way: step 2 of the 4-step schedule
    new = checkpoint(tmp_path / "ckpt" / "last.ckpt")
    groups = {"model", "objectives", "schedule", "zeroshot", "generation", "adapt", "distill", "qat", "nonfinite",
              "compile", "vocab_size"}  # fmt: skip
    assert set(new["hyper_parameters"]) - {"optimizer"} == groups  # the optimizer as the CLI's plain config
    old = {**new, "hyper_parameters": old_hyper_parameters(new["hyper_parameters"]["model"])}
    torch.save(old, tmp_path / "old.ckpt")

    # load_pretrained reads the model (its weights and config) as from a new checkpoint
    loaded = mmformer.load_pretrained(tmp_path / "old.ckpt")
    assert max_diff(model_weights(loaded), model_weights(first.model.model)) == 0.0
    # the task is rebuilt from the flat keys, with the warning, and equals the new checkpoint's
    with pytest.warns(FutureWarning, match=renamed_warning("caption_weight")):
        task = MultimodalTask.load_from_checkpoint(tmp_path / "old.ckpt")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*deprecated flat options", category=FutureWarning)
        same = MultimodalTask.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert {k: v for k, v in task.hparams.items() if k != "optimizer"} == same.hparams
    assert isinstance(task.optimizer([torch.nn.Parameter(torch.zeros(2))]), torch.optim.AdamW)  # the stored one
    assert task.objectives.caption == 0.5 and task.zeroshot.classes == ["zero", "one"]
    assert max_diff(model_weights(task), model_weights(same)) == 0.0

    # --ckpt_path resumes from it: its hyper-parameters (flat) are read into the run's configuration and moved
    with pytest.warns(FutureWarning, match=renamed_warning("zeroshot_classes")):
        resumed = fit_in_process(path, "--ckpt_path", str(tmp_path / "old.ckpt"))
    assert resumed.trainer.global_step == 4
    assert resumed.model.objectives.caption == 0.5 and resumed.model.schedule.max_steps == 4
    whole = fit_in_process(write_config(tmp_path / "whole.yaml", tiny_config(tmp_path / "w", train, max_steps=4,
                           model=options, data={"tokenizer": str(root / "base" / "tokenizer.json")})))  # fmt: skip
    assert max_diff(model_weights(resumed.model), model_weights(whole.model)) <= 1e-6  # as if never interrupted


# ---------------------------------------------------------------------------------------------------- zero-shot logit
@pytest.mark.parametrize("bias", [None, -2.5], ids=["clip", "siglip-bias"])
def test_one_zero_shot_logit_in_the_classifier_the_task_and_coop(bias, monkeypatch):
    """The classifier's logits, the task's zero-shot evaluation logits and CoOp's training loss equal a float64
    ``scale · features @ class_embeddings.T (+ bias)`` with the model's (non-default) scale and, where it has one,
    its bias."""
    tokenizer = Tokenizer.train([f"{a} {b}" for a in WORDS for b in WORDS], vocab_size=280, max_length=8)
    config = ModelConfig.from_dict(
        {
            "stacks": {"shared": {"width": 32, "depth": 1, "n_heads": 2}},
            "routes": {"image": "shared", "text": "shared"},
            "image": {"image_size": [16, 16], "patch_size": 8, "channels": 1},
            "audio": None,
            "text": {"max_length": 8, "vocab_size": tokenizer.vocab_size},
            "embed_dim": 16,
            "logit_bias_init": bias,
        }
    )
    classes, templates = WORDS[:4], ["{}", "the digit {}"]
    torch.manual_seed(0)
    task = MultimodalTask(config, zeroshot={"classes": classes, "templates": templates}).eval()
    task.tokenizer = tokenizer
    model = task.model
    with torch.no_grad():
        model.logit_scale.fill_(math.log(7.0))
    pixels = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    texts = [classes[i % 4] for i in range(8)]
    with torch.no_grad():
        features = model.encode_image(pixels).double()
        embeddings = build_class_embeddings(model, tokenizer, classes, templates).double()
    reference = 7.0 * features @ embeddings.T + (bias or 0.0)  # (B, C)
    tolerance = 1e-5 * float(reference.abs().max())

    api = ZeroShotClassifier(model, tokenizer, classes, templates).logits(pixels)
    assert float((api.double() - reference).abs().max()) <= tolerance

    seen = []
    task._start_eval()
    monkeypatch.setattr(task.metrics["val"].zeroshot_image, "update", lambda logits, target: seen.append(logits))
    batch = {"pixel_values": pixels, "text": texts, **tokenizer(texts)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        task._eval_step(batch, "val")
    assert len(seen) == 1 and float((seen[0].double() - reference).abs().max()) <= tolerance

    torch.manual_seed(2)
    prompt = ContextPrompt(2, ContextPrompt.model_width(model))
    parts, _ = context_prompt_losses(model, prompt, tokenizer, classes, batch)
    with torch.no_grad():
        prompted = build_class_embeddings(model, tokenizer, classes, prompt=prompt).double()
    targets = torch.tensor([i % 4 for i in range(8)])
    expected = F.cross_entropy(7.0 * features @ prompted.T + (bias or 0.0), targets)
    assert abs(float(parts["prompt_image"]) - float(expected)) <= 1e-5 * float(expected)
    coop_api = ZeroShotClassifier(model, tokenizer, classes, prompt=prompt).logits(pixels)
    assert float(F.cross_entropy(coop_api, targets)) == pytest.approx(float(parts["prompt_image"]), rel=1e-5)


def test_print_config_shows_an_old_key_at_its_new_place(workspace, tmp_path, capsys):
    config = one_step_config(workspace, tmp_path)
    with pytest.warns(FutureWarning, match=renamed_warning("caption_weight")), pytest.raises(SystemExit):
        fit_in_process(config, "--model.caption_weight", "0.25", "--model.init_from", BASE, "--print_config")
    printed = capsys.readouterr().out
    options = yaml.safe_load(printed)["model"]
    assert "caption_weight" not in options and "init_from" not in options
    assert options["objectives"]["caption"] == 0.25 and options["adapt"]["init_from"] == BASE


def test_texts_longer_than_the_models_table_are_cut_to_it(tmp_path):
    """A caption of more tokens than the model's text table (``text.max_length``, 8 here) trains, cut to it: with
    ``data.text_max_length`` unset the texts were cut at the tokenizer's own limit (77), and training stopped at the
    model's check ("input_ids: expected at most 8 tokens") part-way through the run. An explicit value holds."""
    train = write_pairs(tmp_path / "data", n=8)
    rows = train.read_text().splitlines()
    rows[3] = json.dumps({"image": "img/3.png", "text": " ".join(["two seven one"] * 5)})  # ~17 words
    train.write_text("\n".join(rows) + "\n")
    config = tiny_config(tmp_path, train, max_steps=4, model={"model": {"text": {"max_length": 8}}})
    cli = fit_in_process(write_config(tmp_path / "config.yaml", config))
    assert cli.trainer.global_step == 4 and cli.datamodule.text_max_length == 8
    cli = fit_in_process(write_config(tmp_path / "config.yaml", config), "--data.text_max_length", "6", run=False)
    assert cli.datamodule.text_max_length == 6


def test_a_resume_whose_data_gives_another_tokenizer_is_refused(tmp_path):
    """Training texts changed before ``--ckpt_path last``: the tokenizer learned again from them has the same size
    and other ids (the weights would read every text as other tokens, silently): refused, naming the way out — the
    checkpoint's own tokenizer, exported — with which the run resumes."""
    from mmformer.cli.main import main

    train = write_pairs(tmp_path / "data", n=8)
    path = write_config(tmp_path / "config.yaml", tiny_config(tmp_path, train, every=2, max_steps=2))
    fit_in_process(path)
    with train.open("a") as f:
        for text in ("apple banana", "cherry grape", "melon lemon"):
            f.write(json.dumps({"image": "img/0.png", "text": text}) + "\n")
    with pytest.raises(ValueError, match=r"tokenizer: the data module's tokenizer maps texts to other ids"):
        fit_in_process(path, "--ckpt_path", "last", "--trainer.max_steps", "4")
    main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "exported")])
    tokenizer = str(tmp_path / "exported" / "tokenizer.json")
    cli = fit_in_process(path, "--ckpt_path", "last", "--trainer.max_steps", "4", "--data.tokenizer", tokenizer)
    assert cli.trainer.global_step == 4


def test_a_batch_of_unreadable_samples_steps_neither_the_optimizer_nor_the_schedule(tmp_path):
    """The loader yields None for a batch whose every sample is unreadable (skipped with a warning each): Lightning
    steps no optimizer for it, and stepped the learning-rate schedule anyway — warmup and decay one step ahead of
    the updates for each such batch (and torch's "lr_scheduler.step() before optimizer.step()" warning)."""
    train = write_pairs(tmp_path / "data", n=30)
    for i in (0, 1):  # the first batch of two, in order
        (tmp_path / "data" / "img" / f"{i}.png").write_bytes(b"not a png")
    config = tiny_config(tmp_path, train, max_steps=4, data={"batch_size": 2, "shuffle": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped samples' and Lightning's None-batch warnings
        cli = fit_in_process(write_config(tmp_path / "config.yaml", config))
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert cli.trainer.global_step == 4 and scheduler.last_epoch == 4


def test_a_resume_with_another_model_shape_names_the_tensors(tmp_path):
    """``--ckpt_path last`` with the stack's width changed: one error naming the tensors that differ, before
    Lightning's strict load (its traceback listed every tensor)."""
    train = write_pairs(tmp_path / "data", n=8)
    path = write_config(tmp_path / "config.yaml", tiny_config(tmp_path, train, every=2, max_steps=2))
    fit_in_process(path)
    with pytest.raises(ValueError, match=r"ckpt_path: the checkpoint's weights do not fit .* checkpoint vs config: "):
        fit_in_process(path, "--ckpt_path", "last", "--trainer.max_steps", "4",
                       "--model.model.stacks.shared.width", "48")  # fmt: skip
