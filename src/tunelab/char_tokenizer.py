"""The embedded tokenizer: one token per printable ASCII character, built in code so nothing is downloaded.

It is a real `PreTrainedTokenizerFast` (save_pretrained, chat template, padding), so the data pipeline treats it
exactly like a hub tokenizer.
"""

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# An assistant turn ends with EOS, the template's own end-of-turn (as Mistral's does): where a model learns to stop.
# The newline follows an expression, not a block tag, whose next newline transformers' Jinja (trim_blocks) drops.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token if m['role'] == 'assistant' else '' }}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    # BPE without merges splits text into single characters, spaces and newlines included.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
