"""Tiny, randomly initialised models of every supported family, built offline.

They use the real classes (Idefics2 and Idefics1 configs, models, image processors, processors; PEFT for
LoRA adapters) and a byte-level tokenizer that carries the Idefics special tokens and chat template, so a
checkpoint saved with ``save_pretrained`` loads through exactly the same ``from_pretrained`` path as
HuggingFaceM4/idefics2-8b. Their answers are noise; their shapes, token handling and code paths are not.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pipeline.config import ConfigError

# Idefics2's chat template, as shipped with HuggingFaceM4/idefics2-8b.
IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

TINY_IMAGE_SEQ_LEN = 16
TINY_LONGEST_EDGE = 448
TINY_SHORTEST_EDGE = 224
TINY_WEIGHT_STD = 0.2
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte → printable-unicode mapping used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return symbols


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer over printable ASCII (one token per character, no merges; anything else is
    <unk>) with Idefics2's special tokens, so that even random answers decode to readable text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    symbols = _byte_symbols()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for byte in [ord("\n"), *range(ord(" "), ord("~") + 1)]:
        vocab[symbols[byte]] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        padding_side="left",
    )
    return tokenizer


# The architecture of HuggingFaceM4/idefics2-8b (SigLIP-so400m at 980 px, perceiver to 64 latents,
# Mistral-7B), for benchmarks with random weights where the checkpoint cannot be downloaded.
IDEFICS2_8B = {
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 980,
        "patch_size": 14,
    },
    "perceiver_config": {
        "hidden_size": 4096,
        "rms_norm_eps": 1e-6,
        "resampler_n_latents": 64,
        "resampler_depth": 3,
        "resampler_n_heads": 16,
        "resampler_head_dim": 96,
        "num_key_value_heads": 4,
    },
    "text_config": {
        "model_type": "mistral",
        "vocab_size": 32003,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
        "rope_theta": 10000.0,
    },
    "image": {"longest_edge": 980, "shortest_edge": 378},
}
TINY = {
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": TINY_LONGEST_EDGE,
        "patch_size": 14,
    },
    "perceiver_config": {
        "hidden_size": 64,
        "rms_norm_eps": 1e-6,
        "resampler_n_latents": TINY_IMAGE_SEQ_LEN,
        "resampler_depth": 1,
        "resampler_n_heads": 2,
        "resampler_head_dim": 8,
        "num_key_value_heads": 1,
    },
    "text_config": {
        "model_type": "mistral",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
    },
    "image": {"longest_edge": TINY_LONGEST_EDGE, "shortest_edge": TINY_SHORTEST_EDGE},
}
# Tiny's vision side with Idefics2-8B's 64 image tokens per sub-image (326 per split page) and a small
# Mistral: reading the prompt costs on a CPU about what it costs the 8B on a GPU next to decoding, which
# the tiny model (16 tokens per sub-image, 64 wide) is too small to show.
SMALL = {
    **TINY,
    "perceiver_config": {**TINY["perceiver_config"], "hidden_size": 512, "resampler_n_latents": 64},
    "text_config": {
        **TINY["text_config"],
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
    },
}
ARCHITECTURES = {"tiny": TINY, "small": SMALL, "idefics2-8b": IDEFICS2_8B}


def special_token_ids(tokenizer) -> dict[str, int]:
    """The offline tokenizer's pad, BOS and EOS ids, as model configs take them."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def build_random_idefics2(architecture: str = "tiny", seed: int = 0):
    """(model, processor) with random weights, in memory, on the current default device and dtype (set
    them with ``torch.device(...)`` and ``torch.set_default_dtype``): the real Idefics2 classes, the offline
    tokenizer, and the processor settings the architecture expects."""
    import torch
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    sizes = ARCHITECTURES[architecture]
    tokenizer = build_tiny_tokenizer()
    image_seq_len = sizes["perceiver_config"]["resampler_n_latents"]
    processor = Idefics2Processor(
        image_processor=Idefics2ImageProcessorPil(do_image_splitting=True, size=sizes["image"]),
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )
    special = special_token_ids(tokenizer)
    text_config = {"vocab_size": len(tokenizer), **sizes["text_config"], **special}
    config = Idefics2Config(
        vision_config=sizes["vision_config"],
        perceiver_config=sizes["perceiver_config"],
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        **special,
    )
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<end_of_utterance>"),
    ]
    return model, processor


def _new_directory(path: str | Path) -> Path:
    """``path``, refused if it already holds something: a tiny model never overwrites a checkpoint."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} already exists and is not an empty directory; name a new one")
    return path


def _save_widened(model, processor, path: str | Path) -> Path:
    """Default initialisation (std 0.02) leaves the answers almost blind to the image; wider weights make
    every answer depend on its page, so a test that mixes up pages or image features fails."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, TINY_WEIGHT_STD)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_idefics2(path: str | Path, seed: int = 0, chat_template: bool = True) -> Path:
    """Build the tiny Idefics2 checkpoint and save model and processor to ``path``. Without the chat
    template it stands for a base checkpoint (idefics2-8b-base): prompts are raw."""
    path = _new_directory(path)
    model, processor = build_random_idefics2("tiny", seed)
    if not chat_template:
        processor.chat_template = None
    return _save_widened(model, processor, path)


TINY_IDEFICS1_IMAGE_SIZE = 112


def build_tiny_idefics1(path: str | Path, seed: int = 0) -> Path:
    """A tiny Idefics1 (IdeficsForVisionText2Text with a perceiver, IdeficsProcessor) saved to ``path``. Its
    gated cross-attention starts open (alpha 1) so that answers depend on the image."""
    import torch
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    path = _new_directory(path)
    tokenizer = build_tiny_tokenizer()
    processor = IdeficsProcessor(
        image_processor=IdeficsImageProcessorPil(image_size=TINY_IDEFICS1_IMAGE_SIZE), tokenizer=tokenizer
    )
    special = special_token_ids(tokenizer)
    config = IdeficsConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        cross_layer_interval=1,
        use_resampler=True,
        alpha_initializer="ones",
        vision_config={
            "embed_dim": 32,
            "image_size": TINY_IDEFICS1_IMAGE_SIZE,
            "intermediate_size": 64,
            "patch_size": 14,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        perceiver_config={
            "use_resampler": True,
            "resampler_n_latents": 8,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 8,
        },
        **special,
    )
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    return _save_widened(model, processor, path)


# The LoRA targets of the Idefics2 fine-tuning tutorial: the language model, connector and perceiver.
LORA_TARGETS = (
    r".*(text_model|modality_projection|perceiver_resampler).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj).*$"
)


def build_tiny_lora(base: str | Path, path: str | Path, seed: int = 0) -> Path:
    """A LoRA adapter (PEFT) for the checkpoint at ``base``, saved to ``path``. Its weights are random (not
    the usual zero B matrix), so the adapter changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    path = _new_directory(path)
    model = AutoModelForImageTextToText.from_pretrained(base)
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(path)
    return path


TINY_FAMILIES = {
    "idefics2": build_tiny_idefics2,
    "idefics2-base": partial(build_tiny_idefics2, chat_template=False),
    "idefics": build_tiny_idefics1,
}
