"""Image folders: bad files are skipped and counted, odd modes become RGB, captions and labels."""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data.folder import ImageFolderSource


def _gradient(h, w):
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256],
                  -1).astype(np.uint8)


@pytest.fixture
def messy_folder(tmp_path):
  rgb = _gradient(24, 40)
  Image.fromarray(rgb).save(tmp_path / "a_rgb.png")
  Image.fromarray(rgb).save(tmp_path / "b_rgb.jpg", quality=95)
  Image.fromarray(rgb).save(tmp_path / "c_rgb.webp", lossless=True)
  Image.fromarray(rgb[..., 0]).save(tmp_path / "d_gray.png")
  rgba = np.concatenate([rgb, np.full((24, 40, 1), 255, np.uint8)], -1)
  rgba[:, :10, 3] = 0  # transparent left strip -> white
  Image.fromarray(rgba, "RGBA").save(tmp_path / "e_rgba.png")
  Image.fromarray(rgb).convert("CMYK").save(tmp_path / "f_cmyk.jpg", quality=95)
  Image.fromarray(rgb).convert("P").save(tmp_path / "g_palette.png")
  Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "h_gray16.png")
  # Bad files.
  (tmp_path / "x_corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
  (tmp_path / "x_empty.jpg").write_bytes(b"")
  buf = io.BytesIO()
  # Noise makes the file mostly scan data, so the header survives the cut below.
  noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(noise).save(buf, format="JPEG", quality=90)
  (tmp_path / "x_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  Image.fromarray(_gradient(120, 120)).save(tmp_path / "x_bomb.png")  # over max_pixels below
  # Filtered (too small), and a file that is not an image at all (ignored by extension).
  Image.fromarray(_gradient(8, 8)).save(tmp_path / "y_small.png")
  (tmp_path / "notes.md").write_text("not an image")
  (tmp_path / "a_rgb.txt").write_text("  a gradient \n")
  return tmp_path, rgb


def test_loads_good_files_and_reports_skips(messy_folder, caplog):
  root, rgb = messy_folder
  with caplog.at_level(logging.WARNING, logger="ldm_jax.data.folder"):
    src = ImageFolderSource(str(root), min_size=16, caption_source="txt", max_pixels=100 * 100)
  names = [p.rsplit("/", 1)[-1] for p in src.files]
  assert names == ["a_rgb.png", "b_rgb.jpg", "c_rgb.webp", "d_gray.png", "e_rgba.png",
                   "f_cmyk.jpg", "g_palette.png", "h_gray16.png"]
  skipped = sorted(p.rsplit("/", 1)[-1] for p, _ in src.skipped)
  assert skipped == ["x_bomb.png", "x_corrupt.png", "x_empty.jpg", "x_truncated.jpg"]
  assert src.num_skipped == 4 and src.num_filtered_small == 1
  assert src.stats()["data/num_skipped"] == 4
  # One warning per skipped file, naming it.
  skip_msgs = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
  assert len(skip_msgs) == 4 and all(any(s in m for m in skip_msgs) for s in skipped)
  assert "max_pixels" in dict((p.rsplit("/", 1)[-1], r) for p, r in src.skipped)["x_bomb.png"]

  recs = [src[i] for i in range(len(src))]
  for r in recs:
    assert r["image"].dtype == np.uint8 and r["image"].shape == (24, 40, 3)
  assert np.array_equal(recs[0]["image"], rgb)  # png is lossless
  assert np.array_equal(recs[2]["image"], rgb)  # lossless webp
  assert np.abs(recs[1]["image"].astype(int) - rgb).mean() < 4  # jpeg
  gray = recs[3]["image"]
  assert np.array_equal(gray[..., 0], rgb[..., 0]) and np.array_equal(gray[..., 0], gray[..., 2])
  rgba = recs[4]["image"]
  assert (rgba[:, :10] == 255).all() and np.array_equal(rgba[:, 10:], rgb[:, 10:])
  assert np.abs(recs[5]["image"].astype(int) - rgb).mean() < 6  # CMYK round trip
  assert np.abs(recs[6]["image"].astype(int) - rgb).mean() < 30  # 256-colour palette
  assert np.array_equal(recs[7]["image"][..., 1], rgb[..., 0])  # 16-bit rescaled, not clipped
  assert recs[0]["caption"] == "a gradient"
  assert recs[1]["caption"] == "" and src.num_missing_captions == len(src) - 1


def test_header_only_scan_replaces_files_that_fail_later(messy_folder, caplog):
  root, rgb = messy_folder
  src = ImageFolderSource(str(root), min_size=16, max_pixels=100 * 100, verify=False)
  # Without a full decode the truncated JPEG passes the scan and fails when read: the record is
  # the next file's (wrapping around to the first), with one warning and a count.
  assert src.files[-1] == str(root / "x_truncated.jpg") and src.num_skipped == 3
  with caplog.at_level(logging.WARNING, logger="ldm_jax.data.folder"):
    for _ in range(2):
      assert np.array_equal(src[len(src) - 1]["image"], rgb)  # a_rgb.png
  assert len([r for r in caplog.records if "cannot read" in r.getMessage()]) == 1
  assert src.num_read_failures == 1 and src.stats()["data/num_read_failures"] == 1
  with pytest.raises(IndexError):
    src[len(src)]


def test_empty_or_all_bad_folder_fails_fast(tmp_path):
  with pytest.raises(ValueError, match=str(tmp_path)):
    ImageFolderSource(str(tmp_path))
  (tmp_path / "bad.png").write_bytes(b"nope")
  with pytest.raises(ValueError, match="no usable image.*1 unreadable"):
    ImageFolderSource(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    ImageFolderSource(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="caption_source"):
    ImageFolderSource(str(tmp_path), caption_source="csv")


def test_jsonl_captions_and_subfolder_labels(tmp_path):
  for cls, shade in [("dog", 10), ("ant", 20), ("cat", 30)]:
    (tmp_path / cls).mkdir()
    for j in range(2):
      Image.fromarray(np.full((20, 20, 3), shade + j, np.uint8)).save(tmp_path / cls / f"{j}.png")
  rows = [{"file_name": f"{c}/{j}.png", "text": f"{c} number {j}"}
          for c in ("dog", "ant", "cat") for j in range(2) if (c, j) != ("cat", 1)]
  (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  src = ImageFolderSource(str(tmp_path), caption_source="jsonl", labels_from_subfolders=True)
  assert src.classes == ["ant", "cat", "dog"]
  by_file = {p.split(str(tmp_path) + "/")[1]: src[i] for i, p in enumerate(src.files)}
  assert by_file["ant/1.png"]["label"] == 0 and by_file["ant/1.png"]["caption"] == "ant number 1"
  assert by_file["dog/0.png"]["label"] == 2 and by_file["dog/0.png"]["caption"] == "dog number 0"
  assert by_file["cat/1.png"]["caption"] == "" and src.num_missing_captions == 1
  assert by_file["cat/0.png"]["image"][0, 0].tolist() == [30, 30, 30]
  (tmp_path / "metadata.jsonl").write_text('{"file": "x.png"}\n')
  with pytest.raises(ValueError, match="metadata.jsonl:1: expected a JSON object"):
    ImageFolderSource(str(tmp_path), caption_source="jsonl")
