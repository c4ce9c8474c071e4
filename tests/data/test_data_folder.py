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


def _save_with_orientation(path, rgb, orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.fromarray(rgb).save(path, exif=exif.tobytes())


@pytest.mark.parametrize("verify", [True, False])
def test_exif_orientation_is_applied(tmp_path, verify):
  """A photo stored sideways with EXIF orientation 6 reads upright (turned 90 degrees clockwise)."""
  raw = _gradient(12, 20)  # stored 20 wide, 12 high
  _save_with_orientation(tmp_path / "sideways.png", raw, 6)
  Image.fromarray(raw).save(tmp_path / "plain.png")
  from ldm_jax.data import folder
  assert folder.image_size(str(tmp_path / "sideways.png")) == (20, 12)  # header-only scan
  src = ImageFolderSource(str(tmp_path), verify=verify)
  images = {p.rsplit("/", 1)[-1]: src[i]["image"] for i, p in enumerate(src.files)}
  assert np.array_equal(images["plain.png"], raw)
  assert images["sideways.png"].shape == (20, 12, 3)
  assert np.array_equal(images["sideways.png"], np.rot90(raw, k=-1))


def test_extension_decides_the_decoder(tmp_path, caplog):
  """A TIFF (or any other format) named .png is refused, naming the file; real PNGs still load."""
  rgb = _gradient(16, 16)
  Image.fromarray(rgb).save(tmp_path / "good.png")
  Image.fromarray(rgb).save(tmp_path / "tiff_inside.png", format="TIFF")
  Image.fromarray(rgb).save(tmp_path / "png_inside.jpg", format="PNG")
  with caplog.at_level(logging.WARNING, logger="ldm_jax.data.folder"):
    src = ImageFolderSource(str(tmp_path))
  assert [p.rsplit("/", 1)[-1] for p in src.files] == ["good.png"]
  reasons = {p.rsplit("/", 1)[-1]: r for p, r in src.skipped}
  assert "not a readable PNG file" in reasons["tiff_inside.png"]
  assert "not a readable JPEG file" in reasons["png_inside.jpg"]
  assert sum("tiff_inside.png" in r.getMessage() for r in caplog.records) == 1
  from ldm_jax.data import folder
  with pytest.raises(folder.ImageReadError, match="extension '.tif' is not an accepted"):
    folder.open_image(str(tmp_path / "x.tif"))


def test_non_utf8_caption_skips_its_image_and_names_the_file(tmp_path, caplog):
  """Policy: the image of a Latin-1 caption is skipped with one warning naming the caption file and
  counted in num_skipped; every other image keeps its own caption and label."""
  for cls in ("a", "b"):
    (tmp_path / cls).mkdir()
    for j in range(2):
      Image.fromarray(np.full((8, 8, 3), 40 * j, np.uint8)).save(tmp_path / cls / f"{j}.png")
      (tmp_path / cls / f"{j}.txt").write_text(f"{cls} {j} caf\u00e9", encoding="utf-8")
  (tmp_path / "a" / "1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
  with caplog.at_level(logging.WARNING, logger="ldm_jax.data.folder"):
    src = ImageFolderSource(str(tmp_path), caption_source="txt", labels_from_subfolders=True)
  names = [p.split(str(tmp_path) + "/")[1] for p in src.files]
  assert names == ["a/0.png", "b/0.png", "b/1.png"]
  assert src.captions == ["a 0 caf\u00e9", "b 0 caf\u00e9", "b 1 caf\u00e9"]
  assert src.labels == [0, 1, 1]
  assert src.num_skipped == 1 and src.stats()["data/num_skipped"] == 1
  (path, reason), = src.skipped
  assert path.endswith("a/1.png") and str(tmp_path / "a" / "1.txt") in reason and "UTF-8" in reason
  assert sum(str(tmp_path / "a" / "1.txt") in r.getMessage() for r in caplog.records) == 1


def test_non_utf8_metadata_jsonl_names_file_and_line(tmp_path):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
  (tmp_path / "metadata.jsonl").write_bytes(
      b'{"file_name": "x.png", "text": "ok"}\n' + '{"file_name": "y.png", "text": "\u00e9"}\n'
      .encode("latin-1"))
  with pytest.raises(ValueError, match=r"metadata.jsonl:2: not UTF-8"):
    ImageFolderSource(str(tmp_path), caption_source="jsonl")
