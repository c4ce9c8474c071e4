"""Text tokenizers for the conditioning encoders, loaded only from local directories.

Three padding conventions, one per model family, all giving int32 [B, max_length]:
  'clip'     (SD 1.x, HF CLIPTokenizer): <|startoftext|> ... <|endoftext|>, padded with
             <|endoftext|> (49407), truncated so the EOS is kept as the last token.
  'openclip' (SD 2.x, open_clip.tokenize): same ids, but padded with 0 after the EOS.
  'bert'     (CompVis BERTTokenizer, LDM text model): [CLS] ... [SEP], padded with [PAD] = 0.

open_clip cleans text before BPE (ftfy.fix_text, html.unescape twice, strip); transformers'
CLIPTokenizer only normalises Unicode and whitespace. For 'openclip' the same cleaning is applied
here (ftfy only if installed: it repairs mojibake, which well-formed prompts do not contain).

Nothing is ever downloaded: `load_tokenizer` reads a directory (`local_files_only`). The CLIP BPE
vocabulary ships inside the `open-clip-torch` package (`bpe_simple_vocab_16e6.txt.gz`);
`write_clip_tokenizer_dir` turns it into the vocab.json + merges.txt directory that
transformers' CLIPTokenizer reads, so configs can point at a local folder.
"""

import dataclasses
import gzip
import html
import importlib.util
import json
import os
from typing import Any, Sequence

import numpy as np

KINDS = ("bert", "clip", "openclip")

# Files from which transformers can build each tokenizer (any one set suffices).
_REQUIRED_FILES = {
    "bert": (("tokenizer.json",), ("vocab.txt",)),
    "clip": (("tokenizer.json",), ("vocab.json", "merges.txt")),
    "openclip": (("tokenizer.json",), ("vocab.json", "merges.txt")),
}

# The open_clip BPE file lists merges after a version line; CLIP uses the first 48894 of them so
# that 256 bytes + 256 end-of-word bytes + merges + 2 special tokens = 49408 ids.
_NUM_MERGES = 49152 - 256 - 2
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


class TokenizerError(ValueError):
  """A tokenizer directory is missing, incomplete or of the wrong kind."""


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
  """A transformers tokenizer plus the padding convention of the model family it feeds."""
  kind: str
  hf: Any  # transformers.PreTrainedTokenizerBase

  @property
  def vocab_size(self) -> int:
    return len(self.hf)


def load_tokenizer(kind: str, path: str) -> TextTokenizer:
  """Loads a 'bert' | 'clip' | 'openclip' tokenizer from the local directory `path`.

  Raises:
    TokenizerError if `kind` is unknown or the directory lacks the needed files.
  """
  if kind not in KINDS:
    raise TokenizerError(f"tokenizer kind={kind!r}; expected one of {KINDS}.")
  if not path or not os.path.isdir(path):
    raise TokenizerError(f"{kind} tokenizer: directory {path!r} does not exist (tokenizers load "
                         "only from local directories; for CLIP/OpenCLIP create one with "
                         "ldm_jax.models.tokenizers.write_clip_tokenizer_dir).")
  options = _REQUIRED_FILES[kind]
  present = set(os.listdir(path))
  if not any(all(f in present for f in files) for files in options):
    wanted = " or ".join("+".join(files) for files in options)
    raise TokenizerError(f"{kind} tokenizer: directory {path!r} is incomplete: expected {wanted}, "
                         f"found {sorted(present)}.")
  import transformers  # deferred: importing transformers is slow and only tokenization needs it
  cls = transformers.BertTokenizerFast if kind == "bert" else transformers.CLIPTokenizer
  try:
    hf = cls.from_pretrained(path, local_files_only=True)
  except Exception as e:  # transformers raises several types for unreadable files
    raise TokenizerError(f"{kind} tokenizer: could not load {path!r} with {cls.__name__}: "
                         f"{e}") from e
  if kind != "bert" and hf.eos_token != CLIP_EOS:
    raise TokenizerError(f"{kind} tokenizer at {path!r}: eos_token={hf.eos_token!r}; expected "
                         f"{CLIP_EOS!r} (is this a CLIP vocabulary?).")
  return TextTokenizer(kind, hf)


def tokenize(tokenizer: TextTokenizer, prompts: Sequence[str], max_length: int = 77) -> np.ndarray:
  """prompts -> np.int32 [B, max_length] in the tokenizer family's padding convention."""
  if not isinstance(tokenizer, TextTokenizer):
    raise TypeError(f"tokenize: got {type(tokenizer).__name__}; expected a TextTokenizer from "
                    "load_tokenizer (it carries the padding convention).")
  if isinstance(prompts, str):
    raise TypeError("tokenize: prompts must be a list of strings, got a single string.")
  prompts = list(prompts)
  if tokenizer.kind == "openclip":
    prompts = [_openclip_clean(p) for p in prompts]
  enc = tokenizer.hf(prompts, padding="max_length", truncation=True, max_length=max_length,
                     return_attention_mask=True)
  ids = np.asarray(enc["input_ids"], dtype=np.int32)  # [B, max_length]
  if tokenizer.kind == "openclip":
    # open_clip fills everything after the EOS with 0 (the id of "!"), not with the EOS token.
    ids = np.where(np.asarray(enc["attention_mask"], bool), ids, 0).astype(np.int32)
  return ids


def _openclip_clean(text: str) -> str:
  """open_clip's basic_clean: fix mojibake, unescape HTML entities (twice), strip."""
  try:
    import ftfy  # optional, as in transformers' CLIPTokenizer
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  return html.unescape(html.unescape(text)).strip()


def attention_mask(tokenizer: TextTokenizer, ids: np.ndarray) -> np.ndarray:
  """[B, L] int32, 1 for real tokens (for BertEncoder). Padding is found from the right: a CLIP
  EOS used as padding is indistinguishable from the real EOS, so the first EOS is kept."""
  ids = np.asarray(ids)
  if tokenizer.kind == "bert":
    return (ids != tokenizer.hf.pad_token_id).astype(np.int32)
  eos = tokenizer.hf.eos_token_id
  is_eos = ids == eos
  first_eos = np.where(is_eos.any(1), is_eos.argmax(1), ids.shape[1] - 1)  # [B]
  return (np.arange(ids.shape[1])[None] <= first_eos[:, None]).astype(np.int32)


def clip_bpe_path() -> str:
  """Path of open_clip's bpe_simple_vocab_16e6.txt.gz, found without importing open_clip."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise TokenizerError("the CLIP BPE vocabulary ships in the PyPI package open-clip-torch; "
                         "install it with `pip install --no-deps open-clip-torch`.")
  path = os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
  if not os.path.isfile(path):
    raise TokenizerError(f"open-clip-torch is installed but {path} is missing.")
  return path


def _bytes_to_unicode() -> list[str]:
  """CLIP's reversible byte -> character table in vocabulary order: the 188 printable latin-1
  bytes as themselves first, then the other 68 bytes as chr(256 + n), n counting in byte order."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars = [chr(b) for b in printable]
  extra = [b for b in range(256) if b not in set(printable)]
  return chars + [chr(256 + n) for n in range(len(extra))]


def write_clip_tokenizer_dir(out_dir: str, bpe_path: str | None = None) -> str:
  """Writes vocab.json, merges.txt and tokenizer_config.json for transformers' CLIPTokenizer.

  The vocabulary is OpenAI CLIP's 49408 tokens (shared by OpenCLIP): byte tokens, byte tokens with
  the end-of-word marker "</w>", one token per merge, then <|startoftext|>, <|endoftext|>.
  Returns out_dir.
  """
  bpe_path = bpe_path or clip_bpe_path()
  with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = lines[1:1 + _NUM_MERGES]  # line 0 is a version header
  if len(merges) != _NUM_MERGES:
    raise TokenizerError(f"{bpe_path}: found {len(merges)} merges; expected {_NUM_MERGES}.")
  byte_tokens = _bytes_to_unicode()
  vocab = (byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
           + [CLIP_BOS, CLIP_EOS])
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": CLIP_BOS,
            "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS,
            "do_lower_case": True}
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=1)
  return out_dir
