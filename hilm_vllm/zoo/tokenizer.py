"""Byte-level BPE tokenizer shared by the whole model family, saved in Hugging Face format."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)  # ids 0..6, in this order

# A minimal role-tagged template. The demo models are trained on code, not dialogue, so
# "chat" is only a format; it exists so /v1/chat/completions renders through the model's
# own template exactly as it does for hub models.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE (a `tokenizers.Tokenizer`, BOS-prepending) of at most `vocab_size`
    tokens; fewer when the texts run out of pairs to merge."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Prepend BOS the way Llama tokenizers do, so vLLM and transformers encode prompts alike.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def as_transformers(tok):
    """Wrap a `tokenizers.Tokenizer` from `train_bpe` as a transformers fast tokenizer with the
    family's special tokens and chat template (what `save_pretrained` writes for vLLM)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20, clean_up_tokenization_spaces=False,
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE and wrap it as a transformers fast tokenizer."""
    return as_transformers(train_bpe(texts, vocab_size))


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    tokenizer.save_pretrained(str(out_dir))
