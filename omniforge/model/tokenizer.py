"""The LLM's tokenizer, extended with omniforge's placeholder and state tokens."""

from __future__ import annotations

from pathlib import Path

from omniforge.config import LLMConfig, SpecialTokens
from omniforge.errors import ConfigError

BYTE_LEVEL = "byte-level"

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML, the default chat template for tokenizers that bring none."""

CHATML_END = "<|im_end|>"
"""Ends every ChatML turn, so generation stops at it."""
CHATML_MARKERS = ("<|im_start|>", CHATML_END)
"""The tokens ChatML frames turns with."""


def load_tokenizer(config: LLMConfig, tokens: SpecialTokens):
    """The tokenizer named by `llm.tokenizer` (default: the LLM folder), with `tokens` added."""
    from transformers import AutoTokenizer

    source = config.tokenizer or config.path
    if source == BYTE_LEVEL:
        tokenizer = byte_level_tokenizer()
    else:
        key = "llm.tokenizer" if config.tokenizer else "llm.path"
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{key}: {folder} is not a folder (a local tokenizer folder, or {BYTE_LEVEL!r})")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    added = [t for t in tokens.all() if t not in tokenizer.get_vocab()]
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
        # each marker one special token: as ordinary text <|im_end|> is a run of byte tokens that
        # generation never stops at. New ids grow the LLM's embeddings (OmniModel.__init__ resizes them).
        added += [t for t in CHATML_MARKERS if t not in tokenizer.all_special_tokens]
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def byte_level_tokenizer():
    """A 256-symbol byte-level tokenizer with ChatML markers: any text, no training, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                  "additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer

