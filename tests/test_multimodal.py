"""The multimodal input path: a vision-language teacher/student pair (tiny LLaVA models built from configs).

TRL's SFTTrainer treats a model as a VLM when its processing class is a `ProcessorMixin`; rows with `images` (a list
of PIL images) and `prompt`/`completion` or `messages` then go through its `DataCollatorForVisionLanguageModeling`.
Our SFT host must take the same inputs: with the feature loss on, the teacher (scoring pass and training-time call)
sees the pixels; with it off, the logged losses equal the parent's. TRL's GKDTrainer is text-only (its ChatML
collator and `compute_loss` pass `input_ids`/`attention_mask` only): our GKD host fails on image data exactly as the
parent does, and trains a VLM pair on text data as the parent does.
"""

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaModel, ProcessorMixin
from trl import SFTConfig, SFTTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer

from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer, TaskFeatureDistillConfig
from hf_taskdistill.hooks import decoder_layers
from hf_taskdistill.selection import load_unit_selection
from hf_taskdistill.toy import build_toy_processor, make_toy_examples, tiny_llava, to_messages, to_prompt_completion

from .test_trl_contract import COMMON, STEPS, _losses


SCORED = 8  # selection_num_samples: 2 scoring batches of 4


@pytest.fixture(scope="module")
def processor():
    return build_toy_processor()


def _student(processor):
    return tiny_llava(processor, hidden_size=16, num_layers=2, seed=2)


def _teacher(processor):
    return tiny_llava(processor, hidden_size=32, num_layers=3, seed=1, vision_hidden_size=16)


def _image_ds(fmt: str, n: int = 16) -> Dataset:
    """`n` toy rows, each with one random RGB image (12x16, resized and cropped to 8x8 by the processor)."""
    rng = np.random.default_rng(0)
    rows = []
    for r in make_toy_examples(n, seed=0):
        image = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        rows.append({"images": [image], **(to_prompt_completion(r) if fmt == "prompt_completion" else to_messages(r))})
    return Dataset.from_list(rows)


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_vlm_pair_is_what_the_hosts_expect(processor):
    teacher, student = _teacher(processor), _student(processor)
    assert isinstance(processor, ProcessorMixin)  # TRL's VLM switch
    assert isinstance(teacher.base_model, LlavaModel)  # the SFT host's backbone-only teacher call takes pixel_values
    # The taps sit on the text decoder, not on the CLIP vision tower's encoder layers.
    assert decoder_layers(teacher) is teacher.model.language_model.layers and len(decoder_layers(teacher)) == 3
    assert decoder_layers(student) is student.model.language_model.layers and len(decoder_layers(student)) == 2
    assert teacher.config.get_text_config().vocab_size == student.config.get_text_config().vocab_size
    batch = processor(images=[Image.new("RGB", (16, 12))], text=["<image> please do copy"], return_tensors="pt")
    assert (batch["input_ids"] == processor.image_token_id).sum() == 4 and batch["pixel_values"].shape == (1, 3, 8, 8)


@pytest.mark.parametrize("fmt", ["prompt_completion", "messages"])
def test_sft_host_image_dataset(fmt, processor, tmp_path):
    kwargs = {**COMMON, "output_dir": str(tmp_path / "x")}
    teacher = _teacher(processor)
    vision_calls = _count_calls(teacher.model.vision_tower)
    ours = FeatureDistillSFTTrainer(model=_student(processor), teacher_model=teacher,
                                    args=TaskFeatureDistillConfig(**kwargs, selection_num_samples=SCORED),
                                    train_dataset=_image_ds(fmt), eval_dataset=_image_ds(fmt, 8),
                                    processing_class=processor)  # fmt: skip
    assert vision_calls[0] == SCORED // COMMON["per_device_train_batch_size"]  # the scoring pass saw the pixels
    ours.train()
    assert vision_calls[0] == SCORED // COMMON["per_device_train_batch_size"] + STEPS  # so did each teacher call
    values = _losses(ours, "feature_loss")
    assert len(values) == STEPS and all(np.isfinite(v) and v > 0 for v in values), values
    selection = ours.unit_selection
    assert selection.k == 16 and [(ls.student_layer, ls.teacher_layer) for ls in selection.layers] == [(1, 2)]
    metrics = ours.evaluate()
    assert metrics["eval_feature_loss"] > 0 and metrics["eval_loss"] > 0, metrics

    ours.save_model(str(tmp_path / "saved"))
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved")  # config.json keeps the selection
    assert load_unit_selection(reloaded).layers[0].indices == selection.layers[0].indices

    off = FeatureDistillSFTTrainer(model=_student(processor), teacher_model=_teacher(processor),
                                   args=TaskFeatureDistillConfig(**kwargs, feature_loss_weight=0),
                                   train_dataset=_image_ds(fmt), processing_class=processor)  # fmt: skip
    off.train()
    parent = SFTTrainer(model=_student(processor), args=SFTConfig(**kwargs), train_dataset=_image_ds(fmt),
                        processing_class=processor)  # fmt: skip
    parent.train()
    assert _losses(off) == _losses(parent) and len(_losses(parent)) == STEPS


def test_sft_host_max_length_that_cuts_image_tokens_fails_before_training(processor, tmp_path):
    """The parent fails at its first step ("`max_length` (4) is too short ..."); ours fails earlier, in the scoring
    pass, while the trainer is built."""
    kwargs = {**COMMON, "output_dir": str(tmp_path / "x"), "max_length": 4}
    with pytest.raises(ValueError, match=r"max_length=4 is too short"):
        FeatureDistillSFTTrainer(model=_student(processor), teacher_model=_teacher(processor),
                                 args=TaskFeatureDistillConfig(**kwargs, selection_num_samples=SCORED),
                                 train_dataset=_image_ds("prompt_completion"), processing_class=processor)  # fmt: skip


def test_gkd_host_rejects_image_data_as_the_parent_does(processor, tmp_path):
    """TRL's GKDTrainer has no image path; our GKD host raises exactly the parent's errors, before any scoring."""
    kwargs = {**COMMON, "output_dir": str(tmp_path / "x"), "lmbda": 0.0}
    errors = {}
    hosts = ((GKDTrainer, GKDConfig), (FeatureDistillTrainer, TaskFeatureDistillConfig))
    for name, processing_class in (("processor", processor), ("tokenizer", processor.tokenizer)):
        for cls, config in hosts:
            with pytest.raises((AttributeError, ValueError)) as info:
                cls(model=_student(processor), teacher_model=_teacher(processor), args=config(**kwargs),
                    train_dataset=_image_ds("messages", 8), processing_class=processing_class)  # fmt: skip
            errors.setdefault(name, []).append((type(info.value), str(info.value)))
        assert errors[name][0] == errors[name][1], errors[name]
    # processor: TRL's ChatML collator reads `pad_token_id` off it; tokenizer: SFT's "image data needs a processor".
    assert errors["processor"][0][0] is AttributeError and "pad_token_id" in errors["processor"][0][1]
    assert errors["tokenizer"][0][0] is ValueError and "vision-related" in errors["tokenizer"][0][1]


def test_gkd_host_trains_a_vlm_pair_on_text(processor, tmp_path):
    """What the GKD host does take from a VLM pair: text-only `messages` with the processor's tokenizer."""
    tokenizer = processor.tokenizer
    kwargs = {**COMMON, "output_dir": str(tmp_path / "x"), "lmbda": 0.0}

    def ds():
        return Dataset.from_list([to_messages(r) for r in make_toy_examples(16, seed=0)])

    ours = FeatureDistillTrainer(model=_student(processor), teacher_model=_teacher(processor),
                                 args=TaskFeatureDistillConfig(**kwargs, selection_num_samples=SCORED),
                                 train_dataset=ds(), processing_class=tokenizer)  # fmt: skip
    ours.train()
    values = _losses(ours, "feature_loss")
    assert len(values) == STEPS and all(np.isfinite(v) and v > 0 for v in values) and ours.unit_selection.k == 16
    off = FeatureDistillTrainer(model=_student(processor), teacher_model=_teacher(processor),
                                args=TaskFeatureDistillConfig(**kwargs, feature_loss_weight=0),
                                train_dataset=ds(), processing_class=tokenizer)  # fmt: skip
    off.train()
    parent = GKDTrainer(model=_student(processor), teacher_model=_teacher(processor), args=GKDConfig(**kwargs),
                        train_dataset=ds(), processing_class=tokenizer)  # fmt: skip
    parent.train()
    assert _losses(off) == _losses(parent) and len(_losses(parent)) == STEPS
