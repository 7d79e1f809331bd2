"""Every recipe under `recipes/` parses through the CLI's own `TrlParser`, so a renamed field breaks CI, not a run.

Recipes are parsed, not run: their models are Hub ids or local paths and their data lives in `../shared/data`.
`tests/test_cli.py` runs the same parser end to end on tiny models.
"""

import pathlib
import re
import warnings

import pytest
import yaml


RECIPES = pathlib.Path(__file__).resolve().parents[1] / "recipes"
ACCELERATE_CONFIGS = RECIPES / "accelerate_configs"
TRAIN_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if ACCELERATE_CONFIGS not in p.parents)
EXPECTED_DISTRIBUTED_TYPE = {
    "single_gpu": "NO",
    "ddp": "MULTI_GPU",
    "zero3": "DEEPSPEED",
    "fsdp": "FSDP",
    "fsdp_cpu": "FSDP",
}
# CPU twins (executed by the multi-process tests) and the only keys they may change in their GPU config.
CPU_TWINS = {"fsdp_cpu": "fsdp"}
CPU_ONLY_KEYS = {"mixed_precision", "num_processes", "use_cpu"}
TASK_OF_FOLDER = {"dolly": "instruction", "dialogsum": "summarization"}


def _ids(paths):
    return [str(p.relative_to(RECIPES)) for p in paths]


def _parse(path: pathlib.Path, *overrides: str):
    from hf_taskdistill.scripts.common import make_parser

    # A fresh parser per call: TrlParser stores a recipe's values as parser defaults.
    return make_parser("hf-taskdistill train").parse_args_and_config(args=["--config", str(path), *overrides])


def test_recipes_exist():
    names = set(_ids(TRAIN_RECIPES))
    for pair in (
        "dolly/gpt2-xl-to-gpt2",
        "dolly/qwen2.5-1.5b-to-qwen2.5-0.5b",
        "dialogsum/qwen2.5-1.5b-to-qwen2.5-0.5b",
    ):
        for variant in ("units", "projector", "logit_only"):
            assert f"{pair}/{variant}.yaml" in names
    for variant in ("units", "logit_only"):
        assert f"dolly/smollm2-135m-to-llama-256/{variant}.yaml" in names
    assert sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")) == sorted(EXPECTED_DISTRIBUTED_TYPE)


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=_ids(TRAIN_RECIPES))
def test_recipe_parses(path):
    rel = path.relative_to(RECIPES)
    task_folder, pair, variant = rel.parts[0], rel.parts[1], path.stem
    text = path.read_text()
    raw = yaml.safe_load(text)

    # Header and size (style.md section 8): what it reproduces, the hardware, the exact command.
    assert len(text.splitlines()) <= 60
    assert text.startswith("# Reproduces:")
    assert "Sized for:" in text
    assert f"hf-taskdistill train --config recipes/{rel.as_posix()}" in text
    # Set explicitly: TRL's default gradient_checkpointing=True emits a transformers FutureWarning.
    assert "activation_checkpointing" in raw

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        script_args, training_args, model_args = _parse(path)

    assert script_args.task == TASK_OF_FOLDER[task_folder]
    assert script_args.train_file == f"../shared/data/{task_folder}/train.jsonl"
    assert model_args.model_name_or_path and training_args.teacher_model_name_or_path
    assert training_args.output_dir == f"outputs/{task_folder}/{pair}/{variant}"
    assert training_args.logit_loss == "jsd" and training_args.lmbda == 0.0 and training_args.beta == 0.0
    assert training_args.teacher_model_init_kwargs["dtype"] in ("bfloat16", "float32")
    assert training_args.report_to in ([], ["none"], "none")  # no tracker unless the user asks for one
    if variant.startswith("units"):
        assert training_args.feature_loss_weight > 0 and not training_args.feature_projector
        assert training_args.selection_method in ("grad", "grad_x_act")
        assert training_args.layer_pairs == [(-1, -1)]
    elif variant == "projector":
        assert training_args.feature_projector and training_args.feature_loss_type == "mse"
        assert training_args.feature_loss_weight > 0
    elif variant == "logit_only":
        assert training_args.feature_loss_weight == 0.0 and not training_args.feature_projector
    else:
        raise AssertionError(f"unknown variant {variant!r}: extend this test")
    assert model_args.use_peft == variant.endswith("_lora")
    if model_args.use_peft:
        assert model_args.lora_r > 0 and model_args.lora_target_modules


@pytest.mark.parametrize("variant", ["units", "logit_only"])
def test_cpu_recipe_builds_a_narrow_student(variant):
    path = RECIPES / "dolly" / "smollm2-135m-to-llama-256" / f"{variant}.yaml"
    script_args, training_args, model_args = _parse(path)
    overrides = script_args.student_config_overrides
    assert isinstance(overrides, dict) and overrides["hidden_size"] == 256
    assert overrides["num_attention_heads"] * overrides["head_dim"] == overrides["hidden_size"]
    assert model_args.model_name_or_path == training_args.teacher_model_name_or_path == "local/smollm2-135m-instruct"
    assert training_args.use_cpu and not training_args.bf16 and not training_args.activation_checkpointing


def test_cli_flags_override_the_recipe():
    path = RECIPES / "dolly" / "gpt2-xl-to-gpt2" / "units.yaml"
    script_args, training_args, model_args = _parse(
        path, "--use_cpu", "true", "--bf16", "false", "--max_steps", "3", "--selection_method", "random",
        "--feature_layers", "-1", "-1", "5", "40", "--teacher_model_name_or_path", "local/teacher-sft",
        "--max_train_samples", "64", "--student_config_overrides", '{"hidden_size": 384}',
    )  # fmt: skip
    assert training_args.use_cpu and training_args.bf16 is False and training_args.max_steps == 3
    assert training_args.selection_method == "random" and training_args.feature_layers == [[-1, -1], [5, 40]]
    assert training_args.teacher_model_name_or_path == "local/teacher-sft"
    assert script_args.max_train_samples == 64 and script_args.student_config_overrides == {"hidden_size": 384}
    assert training_args.learning_rate == 5e-4  # untouched recipe values survive
    assert model_args.model_name_or_path == "openai-community/gpt2"


def test_unknown_recipe_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("selection_metod: grad\noutput_dir: out\nactivation_checkpointing: false\n")
    with pytest.raises(ValueError, match="selection_metod"):
        _parse(bad)


def test_recipe_data_paths_exist(shared_data):
    # Relative paths in recipes are resolved from the repository root, where the commands are run.
    root = RECIPES.parent
    for path in TRAIN_RECIPES:
        raw = yaml.safe_load(path.read_text())
        for key in ("train_file", "eval_file"):
            if raw.get(key):
                assert (root / raw[key]).is_file(), f"{path}: {key} {raw[key]} does not exist"


@pytest.mark.parametrize("name", sorted(EXPECTED_DISTRIBUTED_TYPE))
def test_accelerate_config_loads(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["distributed_type"] == EXPECTED_DISTRIBUTED_TYPE[name]
    config = load_config_from_file(str(path))  # accelerate's own loader: rejects unknown keys
    assert config.distributed_type.value == EXPECTED_DISTRIBUTED_TYPE[name]
    assert config.num_machines == 1
    if name in CPU_TWINS:
        assert config.mixed_precision == "no" and config.use_cpu and config.num_processes == 2
    else:
        assert config.mixed_precision == "bf16"
    if name == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3
    if name in ("fsdp", "fsdp_cpu"):
        assert config.fsdp_config["fsdp_version"] == 2
    assert re.search(
        r"accelerate launch --config_file recipes/accelerate_configs/\S+ -m hf_taskdistill\.cli", path.read_text()
    )


@pytest.mark.parametrize("twin", sorted(CPU_TWINS))
def test_cpu_twin_differs_only_where_cpu_requires(twin):
    cpu = yaml.safe_load((ACCELERATE_CONFIGS / f"{twin}.yaml").read_text())
    gpu = yaml.safe_load((ACCELERATE_CONFIGS / f"{CPU_TWINS[twin]}.yaml").read_text())
    assert set(cpu) == set(gpu)
    assert {k for k in gpu if cpu[k] != gpu[k]} <= CPU_ONLY_KEYS
