"""ldm_jax.data: datasets, transforms and the Grain input pipeline.

Modules (imported on demand, so that `import ldm_jax.data` stays cheap and never needs Grain or
TFDS):
- `shapes`: the built-in synthetic dataset (coloured shapes with captions, labels and boxes);
- `shapes_detect`: a detector that grades samples against their shapes captions (`match_rate`);
- `folder`: `ImageFolderSource` over jpg/png/webp files with .txt / metadata.jsonl captions, boxes
  and segmentation maps;
- `annotations`: the box (metadata.jsonl, COCO JSON) and segmentation-map (maps/) formats, checked;
- `tfds_source`: `TfdsSource` over TFDS ArrayRecord datasets, without TensorFlow;
- `transforms`: crops, flips, [-1, 1] floats, super-resolution pairs, inpainting masks, layouts;
- `sources`: the registry of sources by name (`config.data.source`), what each yields;
- `loader`: `make_dataset` / `make_loader`, a resumable, per-host-sharded Grain loader;
- `latent_cache`: a dataset encoded once (by an encoder function it is given) and its source.
"""
