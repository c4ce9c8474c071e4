"""LoRA training (config.lora), its checkpoints, export and loading.

A tiny Stable-Diffusion-like model (configs/sd_v1_finetune.py:tiny, random weights) is saved as the
frozen base; train.py's entry point trains rank-4 adapters on it (attention, convs and the CLIP text
encoder) for 2 steps on shapes, then resumes for a third. The run must change nothing but the
adapters, checkpoint nothing but them, and its exports must read back as the same updates through the
LoRA reader and sample.py's --lora path.

The torch check trains adapters with the generic step on a tiny diffusers UNet's imported weights,
exports them in the PEFT layout and loads the file with diffusers' own `load_lora_adapter` (PEFT):
the torch UNet with the adapters must give ldm_jax's adapted outputs (<= 1e-4).
"""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common as configs_common
from configs import sd_v1_finetune
from ldm_jax import model_io
from ldm_jax import networks
from ldm_jax import workdir_layout as layout
from ldm_jax.cli import common as cli_common
from ldm_jax.cli import train as entry
from ldm_jax.convert import __main__ as convert_main
from ldm_jax.convert import common
from ldm_jax.convert import lora as lora_files
from ldm_jax.errors import UserError
from ldm_jax.train import lora as lora_lib
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib

RANK, ALPHA = 4, 8.0
TARGETS = ("attention", "convs", "text_encoder")


def _config(base: str, steps: int):
  """sd_v1_finetune's tiny variant, smaller still: a one-level UNet (attention, resnets), one CLIP
  block, a 2x first stage on 16 px shapes (tracing and compiling two runs is this file's cost)."""
  cfg = sd_v1_finetune.get_config("tiny")
  cfg.model.unet = configs_common.unet_kwargs(
      in_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
      attention_resolutions=(1,), num_heads=2, use_spatial_transformer=True, transformer_depth=1,
      context_dim=64, legacy=False)
  cfg.model.cond_stage.kwargs.layers = 1
  cfg.model.first_stage = configs_common.first_stage(
      "kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
  cfg.data.image_size = 16
  cfg.mesh.num_devices = 1
  cfg.init_from = base
  cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = RANK, ALPHA, TARGETS
  cfg.train.num_steps = steps
  cfg.train.learning_rate = 1e-2  # Adam moves every factor by ~lr a step: visible after one.
  cfg.train.weight_decay = 0.0     # So a factor without gradient keeps its value exactly.
  cfg.checkpoint.every = 1
  return cfg


def _flat(tree) -> dict:
  """{'a/b/c': numpy leaf} of any pytree (optimizer states restored as lists or dicts too)."""
  def name(k):
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return {"/".join(map(name, path)): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The base model (saved, and its parameters before training), a workdir trained 2 steps, the
  adapters of its checkpoints 1 and 2 (raw), and the same workdir resumed to step 3."""
  root = tmp_path_factory.mktemp("lora_train")
  cfg = _config("", 2)
  # Random weights drawn on the host from the parameters' shapes (norm scales near 1): compiling
  # the three networks' initialisers would cost more than the whole LoRA run.
  abstract = jax.eval_shape(lambda: networks.init_params(cfg.model, jax.random.PRNGKey(0)))
  rs = np.random.RandomState(0)
  weights = jax.tree_util.tree_map_with_path(
      lambda path, a: (float(path[-1].key == "scale") + 0.05 * rs.standard_normal(a.shape)
                       ).astype(a.dtype), abstract)
  base_dir = str(root / "base")
  model_io.save_model(base_dir, cfg.model, weights)
  before = _flat(model_io.load_model(base_dir)[1])
  workdir = str(root / "run")
  summary = entry.train(_config(base_dir, 2), workdir)
  assert summary["step"] == 2 and np.isfinite(summary["loss"])
  state2 = model_io.read_newest_state(workdir)
  state1 = _restore_step(layout.checkpoints_dir(workdir), 1)
  # The exports and readers are checked on the 2-step adapters, before the resume.
  kohya, peft = str(root / "kohya.safetensors"), str(root / "peft.safetensors")
  codes = [convert_main.main(["--export_lora", workdir, "--out", out, "--layout", name])
           for out, name in ((kohya, "kohya"), (peft, "peft"))]
  ema = model_io.restore_trained_params(workdir)["lora"]
  config, params = model_io.load_model(base_dir)
  model = types.SimpleNamespace(config=config, params=params)
  merged = {spec: cli_common.merge_loras(model, [spec]) for spec in (workdir, kohya, peft)}
  resumed = entry.train(_config(base_dir, 3), workdir)
  return dict(base_dir=base_dir, before=before, workdir=workdir, state2=state2, state1=state1,
              kohya=kohya, peft=peft, codes=codes, ema=ema, config=config, params=params,
              merged=merged, resumed=resumed, root=root)


def _restore_step(ckpt_dir: str, step: int) -> dict:
  from ldm_jax.train import checkpoint as ckpt_lib
  with ckpt_lib.Checkpointer(ckpt_dir, read_only=True) as c:
    state, _ = c.restore(step)
  return jax.tree.map(np.asarray, dict(state))


def test_only_the_adapters_train_and_the_base_stays_bit_identical(run):
  after = _flat(model_io.load_model(run["base_dir"])[1])
  assert after.keys() == run["before"].keys()
  assert all(np.array_equal(after[k], run["before"][k]) for k in after)
  assert not os.path.exists(layout.model_dir(run["workdir"]))  # No copy of the base.
  record = lora_lib.read_record(run["workdir"])
  assert record["base"] == os.path.abspath(run["base_dir"])
  assert (record["rank"], record["alpha"], record["targets"]) == (RANK, ALPHA, list(TARGETS))
  adapters = run["state2"]["params"]["lora"]
  # Every targeted kernel, and nothing else, moved off the base once the adapters are added.
  selected = lora_lib.selected_kernels(run["config"], TARGETS)
  adapted = lora_lib.adapted(run["params"], adapters, ALPHA / RANK)
  changed = {(c,) + tuple(k.split("/")[1:])  # [1:]: below the 'params' level
             for c in ("unet", "cond_stage")
             for k, v in _flat(adapted[c]).items()
             if not np.array_equal(v, run["before"][f"{c}/{k}"])}
  assert changed == {(c,) + p for c, paths in selected.items() for p in paths}
  names = {lora_files.module_names(run["config"])[c][p][0] for c, ps in selected.items()
           for p in ps}
  assert any(n.endswith("attn2.to_k") for n in names)
  assert any(n.endswith("resnets.0.conv1") for n in names)
  assert any(n.endswith("self_attn.q_proj") for n in names)
  assert not any(n.endswith(("ff.net.2", "proj_in", "fc1")) for n in names)


def test_up_starts_at_zero_and_trains_first_down_is_peft_uniform(run):
  step1 = _flat(run["state1"]["params"]["lora"])
  step2 = _flat(run["state2"]["params"]["lora"])
  ups = [k for k in step1 if k.endswith("/up")]
  assert ups and all(np.abs(step1[k]).max() > 1e-3 for k in ups)  # Zero-initialised, then trained.
  # Step 1 gave the down factors no gradient (up was 0): they are still the initial draws, which
  # are the same again from the run's seed, bounded by 1/sqrt(fan_in); step 2 moved them.
  selected = lora_lib.selected_kernels(run["config"], TARGETS)
  shapes = {c: {p: common.flatten(run["params"][c]["params"])[p].shape for p in paths}
            for c, paths in selected.items()}
  init = _flat(lora_lib.init_adapters(shapes, RANK, jax.random.PRNGKey(_config("", 1).seed + 3)))
  assert init.keys() == step1.keys()
  for k, v in init.items():
    if k.endswith("/up"):
      assert not v.any()
      continue
    np.testing.assert_array_equal(step1[k], v, err_msg=k)
    bound = 1 / np.sqrt(np.prod(v.shape[:-1]))
    assert np.abs(v).max() <= bound and np.abs(v).max() > 0.5 * bound
    assert not np.array_equal(step2[k], v), k


def test_the_sample_grid_and_eval_hook_see_base_plus_adapters(run):
  """The trainer's model for its sample grid and eval hook is the base with the adapters added."""
  from ldm_jax.train import ldm_trainer
  from ldm_jax.train import loop
  cfg = _config(run["base_dir"], 2)
  task = ldm_trainer.LatentDiffusionTask(cfg, run["workdir"])
  task.build(loop.make_mesh(cfg), {})
  adapters = run["state2"]["params"]["lora"]
  model = task._trained_model(types.SimpleNamespace(ema_params=None, params={"lora": adapters}))
  expected = lora_lib.adapted(run["params"], adapters, ALPHA / RANK)
  for c in ("unet", "cond_stage", "first_stage"):
    a, e = _flat(model.params[c]), _flat(expected[c])
    assert a.keys() == e.keys()
    for k in a:
      np.testing.assert_allclose(a[k], e[k], rtol=1e-6, atol=1e-7, err_msg=f"{c}/{k}")
  assert any(not np.array_equal(v, run["before"]["unet/" + k])
             for k, v in _flat(model.params["unet"]).items())


def test_adapters_and_frozen_base_follow_the_sharding_rules(run):
  """On 8 devices (fsdp 4) the frozen base and the adapters' state are laid out by the rules every
  parameter follows: large leaves split over 'fsdp', small ones replicated."""
  from ldm_jax import ldm
  from ldm_jax import parallel
  from ldm_jax.train import loop
  cfg = _config(run["base_dir"], 2)
  cfg.mesh.num_devices, cfg.mesh.fsdp, cfg.mesh.min_shard_size = 8, 4, 256
  mesh = loop.make_mesh(cfg)
  training = lora_lib.LoraTraining(ldm.LatentDiffusion.from_checkpoint(run["base_dir"]), cfg, mesh)
  frozen = jax.tree.leaves(training.frozen)
  rules = jax.tree.leaves(parallel.infer_param_shardings(training.frozen, mesh, 256))
  assert all(x.sharding == s for x, s in zip(frozen, rules))
  assert any("fsdp" in str(x.sharding.spec) for x in frozen)
  init_fn, args = training.init_state(optax.adam(1e-3))
  state = parallel.abstract_sharded(init_fn, *args, mesh=mesh, min_size=256)
  specs = {k: (leaf.shape, leaf.sharding.spec) for k, leaf in _flat_abstract(state.params).items()}
  assert specs and all(spec == parallel.fsdp_spec(shape, 4, 256)
                       for shape, spec in specs.values())
  assert any("fsdp" in str(spec) for _, spec in specs.values())  # the 3x3 conv downs are split
  assert any(spec == jax.sharding.PartitionSpec() for _, spec in specs.values())


def _flat_abstract(tree) -> dict:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_the_checkpoint_holds_the_adapters_only(run):
  state = run["state2"]
  assert set(state["params"]) == {"lora"} and set(state["ema_params"]) == {"lora"}
  arrays = _flat({k: state[k] for k in ("params", "ema_params", "opt_state")})
  big = {k: v.shape for k, v in arrays.items() if v.size > 1 and not k.endswith(("/down", "/up"))}
  assert not big, big
  saved = sum(v.nbytes for v in _flat(state).values())
  base = sum(v.nbytes for v in run["before"].values())
  assert saved < base / 4, (saved, base)


def test_a_restart_resumes_the_adapters(run):
  assert run["resumed"]["step"] == 3
  state3 = model_io.read_newest_state(run["workdir"])
  assert int(state3["step"]) == 3
  a2, a3 = _flat(run["state2"]["params"]["lora"]), _flat(state3["params"]["lora"])
  assert a2.keys() == a3.keys() and any(not np.array_equal(a2[k], a3[k]) for k in a2)
  steps = [json.loads(line)["step"] for line in open(layout.metrics_path(run["workdir"]))]
  assert steps == [1, 2, 3]  # The third step continued the run; none was repeated.


def test_a_restart_with_another_base_or_rank_is_refused(run):
  other = _config(run["base_dir"], 4)
  other.lora.rank = 8
  with pytest.raises(UserError, match=r"config\.lora\.rank=8.*rank 4"):
    entry.train(other, run["workdir"])
  other = _config(str(run["root"] / "elsewhere"), 4)
  with pytest.raises(UserError, match="config.init_from=.*trained on"):
    entry.train(other, run["workdir"])
  assert int(model_io.read_newest_state(run["workdir"])["step"]) == 3  # Nothing was trained.


def test_exports_read_back_as_the_adapters(run):
  assert run["codes"] == [0, 0]
  scale = ALPHA / RANK
  expected = {c: {p: scale * np.tensordot(d, u, 1) for p, (d, u) in pairs.items()}
              for c, pairs in lora_files.adapter_factors(run["ema"]).items()}
  for path in (run["kohya"], run["peft"]):
    lora = lora_files.read(path, run["config"])
    got = {(u.component, u.path): u.delta() for u in lora.updates}
    assert got.keys() == {(c, p) for c, ps in expected.items() for p in ps}
    for (c, p), delta in got.items():
      np.testing.assert_allclose(delta, expected[c][p], rtol=1e-5, atol=1e-7)
  import safetensors.numpy
  kohya = safetensors.numpy.load_file(run["kohya"])
  assert all(float(v) == ALPHA for k, v in kohya.items() if k.endswith(".alpha"))
  assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya)
  peft = safetensors.numpy.load_file(run["peft"])
  assert ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
          in peft)


def test_sample_lora_path_takes_the_workdir_and_its_exports_alike(run):
  """What sample.py --lora merges: the workdir and both exported files give the same weights,
  the base plus scale * down . up of the (EMA) adapters."""
  expected = lora_lib.adapted(run["params"], run["ema"], ALPHA / RANK)
  for spec, merged in run["merged"].items():
    for c in ("unet", "cond_stage"):
      a, e = _flat(merged[c]), _flat(expected[c])
      assert a.keys() == e.keys()
      for k in a:
        np.testing.assert_allclose(a[k], e[k], rtol=1e-5, atol=1e-6, err_msg=f"{spec}: {k}")


def test_export_errors_exit_2_naming_the_problem(run, capsys):
  assert convert_main.main(["--export_lora", run["workdir"], "--out",
                            str(run["root"] / "x.bin")]) == 2
  assert "expected a .safetensors file" in capsys.readouterr().err
  assert convert_main.main(["--export_lora", run["base_dir"], "--out",
                            str(run["root"] / "x.safetensors")]) == 2
  assert "lora.json" in capsys.readouterr().err
  assert not os.path.exists(run["root"] / "x.safetensors")


def test_a_lora_workdir_as_the_model_says_to_pass_it_as_lora(run):
  from ldm_jax import model_io
  from ldm_jax.errors import CheckpointNotFoundError
  with pytest.raises(CheckpointNotFoundError, match="LoRA training run.*this workdir as --lora"):
    model_io.load_model(run["workdir"])


# ------------------------------------------------------------------------------------------------
# Against diffusers + PEFT.
# ------------------------------------------------------------------------------------------------
def test_peft_export_loaded_by_diffusers_matches_ldm_jax(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  from assets_util import assert_close, state_dict_numpy, tiny_lora_unet
  from ldm_jax.convert import unet as unet_convert
  from ldm_jax.models import build

  unet = tiny_lora_unet(seed=2)
  config = {"unet": unet_convert.unet_kwargs_from_diffusers_config(dict(unet.config))}
  ours = build.build_unet(config["unet"])
  base = {"unet": {"params": unet_convert.unet_from_diffusers(state_dict_numpy(unet), ours)}}

  # Adapters trained 2 steps by the generic step, the base a frozen argument. The loss pulls the
  # adapted kernels towards random targets (the diffusion loss through a UNet, as train.py runs it,
  # is the run fixture's; compiling its gradient again here would only cost time).
  selected = lora_lib.selected_kernels(config, ("attention", "convs"))
  flat = common.flatten(base["unet"]["params"])
  shapes = {"unet": {p: flat[p].shape for p in selected["unet"]}}
  rs = np.random.RandomState(0)
  goals = {p: rs.randn(*flat[p].shape).astype(np.float32) for p in selected["unet"]}
  scale = lora_lib.scaling(RANK, ALPHA)

  def loss_fn(trainable, batch, rng, frozen):
    del rng
    kernels = common.flatten(lora_lib.adapted(frozen, trainable["lora"], scale)["unet"]["params"])
    return sum(jnp.mean((kernels[p] - g) ** 2) for p, g in batch.items()), {}

  adapters = jax.jit(lambda rng: lora_lib.init_adapters(shapes, RANK, rng))(jax.random.PRNGKey(1))
  state = state_lib.create_train_state({"lora": adapters}, optax.adam(1e-2), jax.random.PRNGKey(2),
                                       use_ema=False)
  step = step_lib.make_train_step(loss_fn, optax.adam(1e-2), ema_decay=None)
  for _ in range(2):
    state, _ = step(state, goals, base)
  trained = jax.tree.map(np.asarray, state.params["lora"])
  assert all(np.abs(u).max() > 0 for k, u in _flat(trained).items() if k.endswith("/up"))
  x = jnp.asarray(rs.randn(2, 8, 8, 4), jnp.float32)
  t = jnp.asarray([3.0, 731.0])
  ctx = jnp.asarray(rs.randn(2, 5, 32), jnp.float32)

  lora = lora_files.from_adapters(config, trained, scale, "trained")
  lora_files.write(str(tmp_path / "a.safetensors"), lora, "peft")
  plain = _torch_out(torch, unet, x, t, ctx)
  unet.load_lora_adapter(str(tmp_path), weight_name="a.safetensors", prefix="unet",
                         adapter_name="trained")
  with_adapters = _torch_out(torch, unet, x, t, ctx)
  assert np.abs(with_adapters - plain).max() > 1e-3 * np.abs(plain).max()
  adapted = lora_lib.adapted(base, trained, scale)
  mine = np.asarray(jax.jit(ours.apply)(adapted["unet"], x, t, ctx))
  assert_close(mine, with_adapters, what="adapted UNet vs diffusers + PEFT")


def _torch_out(torch, unet, x, t, ctx) -> np.ndarray:
  with torch.no_grad():
    out = unet(torch.tensor(np.asarray(x).transpose(0, 3, 1, 2)), torch.tensor(np.asarray(t)),
               encoder_hidden_states=torch.tensor(np.asarray(ctx))).sample
  return out.numpy().transpose(0, 2, 3, 1)
