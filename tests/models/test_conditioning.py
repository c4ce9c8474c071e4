"""Tokenizers, ClassEmbedder, SpatialRescaler and the conditioning factory.

References: open_clip's own SimpleTokenizer (vocabulary built from the same BPE file by its authors'
code), transformers' CLIP/BERT tokenizers, well-known token ids, torch `F.interpolate` + a 1x1
`nn.Conv2d` with random weights, and torch `nn.Embedding`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from assets_util import assert_close, minilm_dir, open_clip_simple_tokenizer
from ldm_jax.convert.common import WeightLoadError
from ldm_jax.convert.text import class_embedder_from_compvis, spatial_rescaler_from_compvis
from ldm_jax.models.conditioning import ClassEmbedder, SpatialRescaler
from ldm_jax.models.tokenizers import (TokenizerError, attention_mask, load_tokenizer, tokenize,
                                       write_clip_tokenizer_dir)

transformers.logging.set_verbosity_error()

PROMPTS = [
    "a photo of a cat",
    "A Painting of a SQUIRREL eating a burger!! (oil on canvas), 4k, trending on artstation",
    "naïve café at 12:30 -- isn't it great? #dreamy @night",
    "fish &amp; chips, ÆØÅ 🐱\n\tsitting   ",
    " ".join(["a very long prompt about a red fox"] * 20),  # > 77 tokens: truncated
    "",
]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  return write_clip_tokenizer_dir(str(tmp_path_factory.mktemp("clip_tokenizer")))


def test_openclip_tokenizer_matches_open_clip(clip_dir):
  want = open_clip_simple_tokenizer()(PROMPTS).numpy()  # pads with 0 after <end_of_text>
  got = tokenize(load_tokenizer("openclip", clip_dir), PROMPTS)
  assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
  np.testing.assert_array_equal(got, want)
  assert got[4, 76] == 49407 and got[5, :3].tolist() == [49406, 49407, 0]


def test_clip_tokenizer_pads_with_eos_like_transformers(clip_dir):
  tok = load_tokenizer("clip", clip_dir)
  got = tokenize(tok, PROMPTS)
  ref = transformers.CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
  want = ref(PROMPTS, padding="max_length", truncation=True, max_length=77).input_ids
  np.testing.assert_array_equal(got, np.asarray(want))
  # The well-known OpenAI CLIP ids for "a photo of a cat", then EOS as padding.
  assert got[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
  assert (got[0, 7:] == 49407).all() and tok.vocab_size == 49408
  # Same tokens as OpenCLIP up to the padding convention.
  openclip = tokenize(load_tokenizer("openclip", clip_dir), PROMPTS)
  mask = attention_mask(tok, got)
  same = [i for i, p in enumerate(PROMPTS) if "&amp;" not in p]  # only open_clip unescapes HTML
  np.testing.assert_array_equal(np.where(mask == 1, got, 0)[same], openclip[same])
  assert mask[0].sum() == 7 and mask[4].sum() == 77


def test_bert_tokenizer_pads_with_zero_like_compvis():
  path = minilm_dir()
  tok = load_tokenizer("bert", path)
  got = tokenize(tok, PROMPTS)
  ref = transformers.BertTokenizerFast.from_pretrained(path, local_files_only=True)
  want = ref(PROMPTS, padding="max_length", truncation=True, max_length=77).input_ids
  np.testing.assert_array_equal(got, np.asarray(want))
  # [CLS] a photo of a cat [SEP] then [PAD] = 0: bert-base-uncased ids (a 1037, of 1997).
  assert got[0, 0] == 101 and got[0, 1] == 1037 and got[0, 3] == 1997
  assert got[0, 6] == 102 and (got[0, 7:] == 0).all()
  assert got[4, 76] == 102 and got[5, :3].tolist() == [101, 102, 0]
  np.testing.assert_array_equal(attention_mask(tok, got), (got != 0).astype(np.int32))


def test_tokenizer_errors(tmp_path, clip_dir):
  with pytest.raises(TokenizerError, match="does not exist"):
    load_tokenizer("clip", str(tmp_path / "nowhere"))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n")
  with pytest.raises(TokenizerError, match="incomplete: expected .*vocab.json\\+merges.txt"):
    load_tokenizer("openclip", str(tmp_path))
  with pytest.raises(TokenizerError, match="incomplete: expected .*vocab.txt"):
    load_tokenizer("bert", clip_dir)
  with pytest.raises(TokenizerError, match="kind='t5'"):
    load_tokenizer("t5", clip_dir)
  with pytest.raises(TokenizerError, match="eos_token='\\[SEP\\]'"):  # a BERT dir loaded as CLIP
    load_tokenizer("clip", _bert_dir_with_clip_files(tmp_path, clip_dir))
  tok = load_tokenizer("clip", clip_dir)
  with pytest.raises(TypeError, match="expected a TextTokenizer"):
    tokenize(tok.hf, ["x"])
  with pytest.raises(TypeError, match="single string"):
    tokenize(tok, "a cat")


def _bert_dir_with_clip_files(tmp_path, clip_dir):
  """CLIP vocab files with a tokenizer_config.json whose special tokens are BERT's."""
  d = tmp_path / "mixed"
  d.mkdir()
  for name in ("vocab.json", "merges.txt"):
    (d / name).write_bytes(open(os.path.join(clip_dir, name), "rb").read())
  (d / "tokenizer_config.json").write_text('{"eos_token": "[SEP]", "bos_token": "[CLS]"}')
  return str(d)


def test_class_embedder_shapes_null_label_and_import():
  ref = torch.nn.Embedding(1001, 16)  # cin256-v2: 1000 classes + the null class
  model = ClassEmbedder(n_classes=1001, embed_dim=16)
  assert model.null_label == 1000
  sd = {"cond_stage_model.embedding.weight": ref.weight.detach().numpy(),
        "model.diffusion_model.out.0.bias": np.zeros(3, np.float32)}
  params = class_embedder_from_compvis(sd, model)
  labels = np.array([0, 7, 999, 1000], np.int32)
  out = model.apply({"params": params}, jnp.asarray(labels))
  assert out.shape == (4, 1, 16)
  with torch.no_grad():
    want = ref(torch.from_numpy(labels).long()[:, None]).numpy()  # CompVis: embedding(c[:, None])
  assert_close(out, want, rel=1e-6, what="class embedding")
  # Label dropout for classifier-free guidance training.
  drop_all = model.clone(ucg_rate=1.0)
  out = drop_all.apply({"params": params}, jnp.asarray(labels), deterministic=False,
                       rngs={"dropout": jax.random.PRNGKey(0)})
  assert_close(out, np.repeat(want[3:], 4, axis=0), rel=1e-6, what="all dropped")
  half = model.clone(ucg_rate=0.5)
  many = jnp.zeros((512,), jnp.int32)
  out = half.apply({"params": params}, many, deterministic=False,
                   rngs={"dropout": jax.random.PRNGKey(1)})
  dropped = float(np.mean(np.abs(np.asarray(out)[:, 0] - want[3, 0]).max(-1) < 1e-6))
  assert 0.4 < dropped < 0.6
  kept = half.apply({"params": params}, many)  # deterministic by default: nothing dropped
  assert_close(kept, np.repeat(want[:1], 512, axis=0), rel=1e-6, what="deterministic")
  with pytest.raises(WeightLoadError, match="expects \\(1001, 16\\)"):
    class_embedder_from_compvis({"embedding.weight": np.zeros((1000, 16), np.float32)}, model)


def _torch_rescaler(x, n_stages, method, multiplier, conv):
  y = torch.from_numpy(x).permute(0, 3, 1, 2)  # NHWC -> NCHW
  for _ in range(n_stages):
    y = F.interpolate(y, scale_factor=multiplier, mode=method)
  if conv is not None:
    y = conv(y)
  return y.permute(0, 2, 3, 1).detach().numpy()


@pytest.mark.parametrize("method,n_stages,multiplier,out_channels,bias", [
    ("bilinear", 1, 0.5, 5, False),
    ("bilinear", 2, 0.5, None, False),  # CompVis semantic-synthesis style: no channel map
    ("bilinear", 1, 0.7, 4, True),  # non-integer scale: coordinates use 1/scale, not the size ratio
    ("nearest", 2, 0.5, 5, True),
    ("nearest", 1, 1.5, 3, False),
    ("bicubic", 1, 0.5, 4, True),
    ("bicubic", 1, 2.0, None, False),
    ("area", 2, 0.5, 3, False),
    ("area", 1, 0.3, 2, True),
])
def test_spatial_rescaler_matches_torch_interpolate(method, n_stages, multiplier, out_channels,
                                                    bias):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 13, 10, 3)).astype(np.float32)  # odd sizes exercise the rounding
  conv = None
  sd = {}
  if out_channels is not None:
    conv = torch.nn.Conv2d(3, out_channels, 1, bias=bias)
    with torch.no_grad():
      for p in conv.parameters():
        p.normal_(0, 0.5)
    sd = {f"cond_stage_model.{k}": v.detach().numpy() for k, v in
          {"channel_mapper." + n: p for n, p in conv.named_parameters()}.items()}
  model = SpatialRescaler(n_stages=n_stages, method=method, multiplier=multiplier, in_channels=3,
                          out_channels=out_channels, bias=bias)
  params = spatial_rescaler_from_compvis(sd, model)
  got = model.apply({"params": params}, jnp.asarray(x))
  assert_close(got, _torch_rescaler(x, n_stages, method, multiplier, conv), rel=1e-5,
               what=f"{method} x{multiplier} ^{n_stages}")


def test_spatial_rescaler_errors():
  with pytest.raises(ValueError, match="method='linear'"):
    SpatialRescaler(method="linear").init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="in_channels=3"):
    SpatialRescaler().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)))
  with pytest.raises(ValueError, match="rounds to 0 pixels"):
    SpatialRescaler(n_stages=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(WeightLoadError, match="channel_mapper.bias"):
    spatial_rescaler_from_compvis({"channel_mapper.weight": np.zeros((4, 3, 1, 1), np.float32)},
                                  SpatialRescaler(out_channels=4, bias=True))
