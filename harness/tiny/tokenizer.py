"""A small byte-level BPE tokenizer trained on the tiny world's text, with a chat template.

Pre-tokenization keeps each fixed word of the world (template words, with their
leading space) as one unit and isolates every other character. BPE therefore
merges only the fixed words, while payload letters and digits stay one token
each: reversing, sorting and counting letters, and adding digit by digit,
stay learnable for a tiny model. Any text still encodes (bytes are the base
alphabet), so the tokenizer is an ordinary HF tokenizer.
"""

from __future__ import annotations

import re
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# One template for generation, training and evaluation. Assistant turns end with
# the eos token; with add_generation_prompt the text ends right where the answer starts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _pre_tokenizer(words: Iterable[str]) -> pre_tokenizers.PreTokenizer:
    # longest first, so that "letters" wins over "letter"
    alts = "|".join(re.escape(w) for w in sorted(set(words), key=lambda w: (-len(w), w)))
    pattern = Regex(rf" ?\b(?:{alts})\b|[\s\S]")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_tokenizer(texts: Iterable[str], words: Iterable[str], vocab_size: int = 512,
                    model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """BPE over ``texts``; merges happen only inside the fixed ``words``.

    Training stops early when every fixed word is one token, so the final
    vocabulary is usually below ``vocab_size``. Deterministic for the same input.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(words)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), padding_side="left",
        model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf
