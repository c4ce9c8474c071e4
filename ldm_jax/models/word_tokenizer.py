"""Word-level tokenizers for small closed-vocabulary caption sets (the built-in shapes dataset).

The paper's text models use the BERT tokenizer; the quickstart has no vocabulary file to download, and
its captions use a few dozen words, so it uses a `transformers` fast tokenizer over exactly those
words. It is saved to / loaded from a local directory like any other tokenizer.
"""

import os
from typing import Sequence

import numpy as np

SPECIAL = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3; [PAD] = 0 as the BERT embedder pads.


def build_word_tokenizer(words: Sequence[str]):
  """A PreTrainedTokenizerFast splitting on whitespace, lower-casing, over SPECIAL + words."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(list(SPECIAL) + sorted(set(words)))}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                 bos_token="[BOS]", eos_token="[EOS]")


def load_word_tokenizer(path: str, builtin_words: Sequence[str] = ()):
  """A word tokenizer saved with `save_pretrained`, or for path '' one built over `builtin_words`
  (the caller's closed vocabulary, e.g. `data.shapes.caption_words()`)."""
  if not path:
    if not builtin_words:
      raise ValueError("a word tokenizer with no path needs its vocabulary (builtin_words); "
                       "got none.")
    return build_word_tokenizer(builtin_words)
  from transformers import PreTrainedTokenizerFast
  if not os.path.isfile(os.path.join(path, "tokenizer.json")):
    raise FileNotFoundError(f"tokenizer path {path!r} has no tokenizer.json.")
  return PreTrainedTokenizerFast.from_pretrained(path)


def word_tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> np.ndarray:
  """[BOS] words [EOS], padded with 0 / truncated to max_length -> int32 [B, max_length]."""
  out = np.zeros((len(prompts), max_length), np.int32)
  for i, p in enumerate(prompts):
    ids = [tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False)
    ids = ids[:max_length - 1] + [tokenizer.eos_token_id]
    out[i, :len(ids)] = ids
  return out
