"""A procedurally generated instruction task, a word-level tokenizer and tiny Llama models.

Used by `hf-taskdistill demo` (the offline embedded default) and by the test suite: no download, no data files.
Each example asks for one operation on a short list of symbols, e.g. `reverse : k c f a` -> `a f c k`.
"""

from __future__ import annotations

import random

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


SYMBOLS = [chr(c) for c in range(ord("a"), ord("a") + 16)]
OPERATIONS = ("copy", "reverse", "sort", "first", "last", "drop", "double")
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant", ":", "please", "do", "the", "list"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level fast tokenizer (48 tokens) with a ChatML-style template and a pad token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + list(OPERATIONS) + SYMBOLS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def solve(operation: str, items: list[str]) -> list[str]:
    """The gold answer of one task instance."""
    if operation == "copy":
        return list(items)
    if operation == "reverse":
        return items[::-1]
    if operation == "sort":
        return sorted(items)
    if operation == "first":
        return items[:1]
    if operation == "last":
        return items[-1:]
    if operation == "drop":
        return items[1:]
    if operation == "double":
        return [x for x in items for _ in range(2)]
    raise ValueError(f"unknown operation {operation!r}")


def make_toy_examples(n: int, seed: int = 0, min_len: int = 3, max_len: int = 6) -> list[dict[str, str]]:
    """`n` examples as dicts with `instruction`, `input` and `output` (the Dolly shape)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        op = rng.choice(OPERATIONS)
        items = [rng.choice(SYMBOLS) for _ in range(rng.randint(min_len, max_len))]
        rows.append(
            {
                "instruction": f"please do {op} : the list",
                "input": " ".join(items),
                "output": " ".join(solve(op, items)),
            }
        )
    return rows


def to_messages(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """Conversational form for the GKD host."""
    return {
        "messages": [
            {"role": "user", "content": f"{row['instruction']} {row['input']}".strip()},
            {"role": "assistant", "content": row["output"]},
        ]
    }


def to_prompt_completion(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """Conversational prompt/completion form for the SFT host."""
    msgs = to_messages(row)["messages"]
    return {"prompt": msgs[:1], "completion": msgs[1:]}


def tiny_llama(
    vocab_size: int, hidden_size: int = 16, num_layers: int = 2, seed: int = 0, **overrides
) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM of a few thousand parameters (deterministic for a seed)."""
    import torch

    heads = overrides.pop("num_attention_heads", 2)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=overrides.pop("intermediate_size", hidden_size * 2),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=overrides.pop("num_key_value_heads", heads),
        max_position_embeddings=overrides.pop("max_position_embeddings", 128),
        tie_word_embeddings=overrides.pop("tie_word_embeddings", False),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ----- a tiny vision-language pair (LLaVA), for the SFT host's multimodal input path -----
IMAGE_TOKEN = "<image>"
VLM_IMAGE_SIZE = 8  # pixels per side after resizing / cropping
VLM_PATCH_SIZE = 4  # -> (8 / 4)^2 = 4 image tokens per image (the CLS token is dropped)
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build_toy_processor():
    """A `LlavaProcessor` over the toy word-level tokenizer plus an `<image>` token (the last id).

    Images are resized and cropped to 8x8 pixels and become 4 `<image>` tokens; the chat template renders TRL's
    structured content parts (`{"type": "image"}` -> `<image>`, `{"type": "text"}` -> its text), so TRL's
    `SFTTrainer` treats the pair as a vision-language model (the processing class is a `ProcessorMixin`).
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tok = build_toy_tokenizer()
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": VLM_IMAGE_SIZE}, crop_size={"height": VLM_IMAGE_SIZE, "width": VLM_IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=VLM_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        image_token=IMAGE_TOKEN,
        chat_template=VLM_CHAT_TEMPLATE,
    )


def tiny_llava(processor, hidden_size: int = 16, num_layers: int = 2, seed: int = 0, vision_hidden_size: int = 8):
    """A randomly initialised `LlavaForConditionalGeneration`: a one-layer CLIP vision tower, a projector and a tiny
    Llama text decoder (`hidden_size`, `num_layers`) over `processor`'s vocabulary (deterministic for a seed)."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=VLM_IMAGE_SIZE,
        patch_size=VLM_PATCH_SIZE,
        projection_dim=vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(processor.tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)
