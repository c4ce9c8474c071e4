"""pytorch-fid 0.3.0's FID Inception as the test reference, built with random weights offline.

pytorch-fid imports torchvision, whose PyPI wheel does not load beside this CPU torch build
("operator torchvision::nms does not exist"). scripts/test.sh installs both packages alone into
.venv/fid-refs (`pip install --no-deps --target`), outside site-packages so transformers and
diffusers never see torchvision; here the two C++ operators torchvision registers at import are
declared (never called), the folder is put on sys.path and `pytorch_fid.inception` is imported.

`fid_inception_v3()` normally downloads pt_inception; its downloader is replaced by one returning a
seeded random state dict with the keys of torchvision's Inception3(num_classes=1008,
aux_logits=False), which the FID blocks share. The network itself is pytorch-fid's own code.
"""

import os
import sys

import numpy as np
import pytest

FID_REFS = os.path.join(os.path.dirname(__file__), "..", "..", ".venv", "fid-refs")
_LIBRARY = []  # keeps the torch.library registration alive for the whole session


def pytorch_fid_inception():
  """The `pytorch_fid.inception` module, or skip with the reason."""
  torch = pytest.importorskip("torch")
  if not os.path.isdir(os.path.join(FID_REFS, "pytorch_fid")):
    pytest.skip(f"pytorch-fid reference not installed in {os.path.abspath(FID_REFS)}; run "
                "pip install --no-deps --target .venv/fid-refs torchvision==0.28.0 "
                "pytorch-fid==0.3.0 (scripts/test.sh does)")
  if not _LIBRARY:
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.append(lib)
    sys.path.insert(0, os.path.abspath(FID_REFS))
  import pytorch_fid.inception  # pylint: disable=g-import-not-at-top
  return pytorch_fid.inception


def random_state_dict(seed: int) -> dict:
  """Seeded random weights and BatchNorm statistics for the FID Inception (torch tensors).

  Scales keep activations O(1) through the 94 conv layers (He-style conv weights, BatchNorm gains
  near 1), while every tensor is non-trivial: biases, means and variances all differ from the
  identity values, so a swapped or mis-transposed tensor changes the output.
  """
  import torch  # pylint: disable=g-import-not-at-top
  fid = pytorch_fid_inception()
  skeleton = fid.torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                                 init_weights=False)
  rng = np.random.default_rng(seed)
  out = {}
  for name, t in skeleton.state_dict().items():
    shape = tuple(t.shape)
    if name.endswith("num_batches_tracked"):
      out[name] = torch.tensor(int(rng.integers(1, 1000)))
      continue
    if name.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      v = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif name.endswith("bn.weight"):
      v = rng.uniform(0.6, 1.4, shape)
    elif name.endswith("bn.running_var"):
      v = rng.uniform(0.5, 2.0, shape)
    elif name.endswith("bn.running_mean"):
      v = rng.normal(0.0, 0.2, shape)
    elif name == "fc.weight":
      v = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
    else:  # bn.bias, fc.bias
      v = rng.normal(0.0, 0.2, shape)
    out[name] = torch.from_numpy(v.astype(np.float32))
  return out


def reference_models(state_dict: dict):
  """(pytorch-fid's InceptionV3 wrapper for pool features, its full fid_inception_v3), eval mode.

  Both are built by pytorch-fid's code with `state_dict` served in place of the download.
  """
  fid = pytorch_fid_inception()
  original = fid.load_state_dict_from_url
  fid.load_state_dict_from_url = lambda url, progress=True: dict(state_dict)
  try:
    wrapper = fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    full = fid.fid_inception_v3().eval()
  finally:
    fid.load_state_dict_from_url = original
  return wrapper, full


def reference_outputs(models, images_uint8: np.ndarray) -> dict:
  """pytorch-fid's pool features and logits for uint8 [B, H, W, 3] images (float64 numpy).

  models: `reference_models(...)`. Logits are the FID network's own `fc` on the pool features,
  which is what Inception3's forward does after its pool (dropout is off in eval mode).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  wrapper, full = models
  # pytorch-fid's ImagePathDataset: PIL -> ToTensor, i.e. uint8 / 255 in NCHW.
  x = torch.from_numpy(np.asarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0
  with torch.no_grad():
    pool = wrapper(x)[0][:, :, 0, 0]  # [B, 2048]
    logits = full.fc(pool)  # [B, 1008]
    unbiased = F.linear(pool, full.fc.weight)  # [B, 1008]
  return {"pool": pool.double().numpy(), "logits": logits.double().numpy(),
          "logits_unbiased": unbiased.double().numpy()}
