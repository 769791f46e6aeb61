"""Tokenizers rlx builds for number vocabularies (the sort task), as real `transformers` tokenizers.

Each number 0..V-1 is one word-level token, so ``AutoTokenizer.from_pretrained`` on a checkpoint gives
back exactly the tokenizer training used. With ``specials`` (for GPT-style models) the ids are
``<pad>=0 <bos>=1 <eos>=2 <sep>=3`` then the numbers, and a prompt "3 1 0 2" encodes as
``<bos> 3 1 0 2 <sep>``; without them (the toy models) token id == number.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>")


def build_number_tokenizer(vocab: int, *, specials: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the strings "0" .. str(vocab - 1)."""
    words = [*SPECIALS, *map(str, range(vocab))] if specials else [str(i) for i in range(vocab)]
    table = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(table, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    if not specials:
        return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <sep>", special_tokens=[("<bos>", table["<bos>"]), ("<sep>", table["<sep>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        sep_token="<sep>",
        padding_side="left",
    )


def tiny_gpt2_config(
    tokenizer: Any, *, n_layer: int, n_embd: int, n_head: int, n_positions: int, **extra: Any
) -> GPT2Config:
    """A GPT-2 config sized for ``tokenizer`` with dropout off (RL and reward models: no dropout).

    The MLP's activation is GPT-2's tanh-approximated GELU computed by torch's one fused op
    (``gelu_pytorch_tanh``) rather than transformers' ``gelu_new``, the same formula spelled in five
    elementwise ops: equal to 3e-7, and a forward + backward of the bench's toy model (2 x 64, 256 x 14
    tokens, 1 thread) 30% faster here. Saved models keep the activation they were built with."""
    extra = {"activation_function": "gelu_pytorch_tanh", **extra}
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


# A chat template for the character-level tokenizer: role markers are single special tokens; an
# assistant turn in a full conversation ends with EOS.
CHAR_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAR_SPECIALS = ("<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
# R1-style reasoning tags as single (non-special) tokens, as tokenizers of reasoning models have them
CHAR_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII and newline, with chat role tokens, the R1
    tags as single tokens and a chat template (a real ``tokenizers`` BPE model without merges, so
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it)."""
    chars = ["\n", *[chr(c) for c in range(32, 127)]]
    table = {w: i for i, w in enumerate([*CHAR_SPECIALS, *CHAR_TAGS, *chars])}
    tok = Tokenizer(models.BPE(vocab=table, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(CHAR_SPECIALS))
    tok.add_tokens(list(CHAR_TAGS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=list(CHAR_SPECIALS[3:]),
        padding_side="left",
        chat_template=CHAR_CHAT_TEMPLATE,
    )
