"""A tiny, randomly initialised Idefics2 that is built offline.

It uses the real Idefics2 classes (config, model, image processor, processor) and a byte-level
tokenizer that carries Idefics2's special tokens and chat template, so a checkpoint saved with
``save_pretrained`` loads through exactly the same ``from_pretrained`` path as
HuggingFaceM4/idefics2-8b. Its answers are noise; its shapes, token handling and code paths are not.
"""

from __future__ import annotations

from pathlib import Path

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


def build_tiny_idefics2(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny Idefics2 checkpoint and save model and processor to ``path``."""
    import torch
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=True,
        size={"shortest_edge": TINY_SHORTEST_EDGE, "longest_edge": TINY_LONGEST_EDGE},
    )
    processor = Idefics2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=TINY_IMAGE_SEQ_LEN,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )
    config = Idefics2Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_LONGEST_EDGE,
            "patch_size": 14,
        },
        perceiver_config={
            "hidden_size": 64,
            "rms_norm_eps": 1e-6,
            "resampler_n_latents": TINY_IMAGE_SEQ_LEN,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 8,
            "num_key_value_heads": 1,
        },
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config).eval()
    # Default initialisation (std 0.02) leaves the answers almost blind to the image; wider weights make
    # every answer depend on its page, so a test that mixes up pages or image features fails.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, TINY_WEIGHT_STD)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<end_of_utterance>"),
    ]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
