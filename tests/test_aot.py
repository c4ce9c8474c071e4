"""Ahead-of-time compilation for a TPU topology (ldm_jax.aot), on this CPU host through libtpu.

One module-scoped compile of a miniature Stable Diffusion (frozen CLIP-style text encoder, bf16,
remat, empty-prompt dropout) for v5e:2x2: its train step, one guided sampler step and the 50-step
DDIM loop, through `analysis.analyse`, the function behind `python -m ldm_jax.aot`.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sd_v1_finetune
from ldm_jax import ldm as ldm_lib
from ldm_jax.aot import analysis, report, topology
from ldm_jax.kernels import flash_attention

LATENT = 32  # 256 px through the tiny KL-f8: 1024 latent tokens, attention at full resolution.
HEADS = 8


def tiny_sd():
  c = sd_v1_finetune.get_config("tiny")
  c.data.image_size = LATENT * 8
  c.model.diffusion.image_size = LATENT
  return c


@pytest.fixture(scope="module")
def compiled(tpu_v5e_devices):
  del tpu_v5e_devices  # libtpu is there; analyse asks it for the same topology.
  texts = {}
  out = analysis.analyse(tiny_sd(), "v5e:2x2", batch_per_chip=1, sample=True,
                         sample_batch_per_chip=1, sample_steps=50, guidance=7.5,
                         on_compiled=lambda name, c: texts.__setitem__(name, c.as_text()))
  return out, texts


def test_cpu_would_block_this_attention():
  """The CPU form of these attention layers loops over blocks (so the TPU checks below can
  fail): one image's self-attention gradient exceeds the CPU's gradient block."""
  assert HEADS * (LATENT * LATENT) ** 2 > flash_attention.CPU_ATTENTION_GRAD_BLOCK
  assert tiny_sd().model.unet.num_heads == HEADS


def test_train_step_is_the_tpu_program_without_cpu_kernels(compiled):
  out, texts = compiled
  assert (out["chip"], out["num_chips"], out["mesh"]) == ("v5e", 4, {"data": 4, "fsdp": 1})
  assert [p["name"] for p in out["programs"]] == ["train_step", "sample_step", "sample_loop"]
  assert "while" not in texts["train_step"]  # no blocked CPU attention, forward or backward
  assert out["programs"][0]["loops"] == {"while": 0, "windowed_einsum": 0}
  assert "tpu_custom_call" in texts["train_step"]  # the Pallas flash attention kernels
  assert texts["train_step"].count("bf16") > 0  # compute_dtype=bfloat16 reached the program


def test_sampling_loop_holds_one_loop(compiled):
  """The sampler is one while loop; blocked CPU attention would nest more inside it."""
  _, texts = compiled
  assert "while" not in texts["sample_step"]
  assert texts["sample_loop"].count(" while(") == 1


def test_state_bytes_follow_the_parameter_shapes(compiled):
  """Parameters, AdamW moments and EMA per chip, against the UNet's own parameter count
  (fsdp=1: each chip holds all of them, in float32)."""
  out, _ = compiled
  step = out["programs"][0]
  c = tiny_sd()
  params = jax.eval_shape(lambda r: ldm_lib.init_params(c.model, r), jax.random.PRNGKey(0))
  unet_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(params["unet"]))
  state = step["state_bytes"]
  assert state["params"] == unet_bytes  # the CLIP tower is frozen: not trained, not in the state
  assert state["ema_params"] == unet_bytes
  assert 2 * unet_bytes <= state["opt_state"] <= 2 * unet_bytes + 1024  # mu, nu (+ counters)
  frozen = sum(int(np.prod(x.shape)) * 4
               for x in jax.tree.leaves((params["first_stage"], params["cond_stage"])))
  assert step["figures"]["resident_bytes"] == frozen
  assert step["figures"]["used_bytes"] == step["memory"]["total"] + frozen


def test_advice_says_by_how_much_and_which_knobs():
  c = tiny_sd()
  c.train.remat, c.train.compute_dtype = False, "float32"
  chip = topology.CHIPS["v5e"]
  gib = topology.GIB
  mem = {"total": 18 * gib, "temp_size_in_bytes": 10 * gib}
  fig = report.figures(chip=chip, num_chips=4, images=16, mem=mem, costs={},
                       resident_bytes=gib)
  assert not fig["fits"] and fig["used_bytes"] == 19 * gib
  tips = report.advice(c, chip=chip, num_chips=4, figures=fig, mem=mem,
                       states={"params": gib, "opt_state": 2 * gib, "ema_params": gib},
                       batch_per_chip=4)
  text = "\n".join(tips)
  assert "3.00 GiB over" in tips[0]
  for knob in ("--batch_per_chip=2", "remat=True", "mesh.fsdp=4", "bfloat16", "use_ema=False",
               "latent_cache"):
    assert knob in text, knob
  assert "saves about 3.00 GiB" in text  # 4 GiB of state split 4 ways
  mem["total"] = 10 * gib
  assert report.advice(c, chip=chip, num_chips=4, mem=mem, states={}, batch_per_chip=4,
                       figures=report.figures(chip=chip, num_chips=4, images=16, mem=mem,
                                              costs={})) == []


def test_memory_and_cost_analyses_are_reported(compiled):
  out, _ = compiled
  for program in out["programs"]:
    mem, fig = program["memory"], program["figures"]
    assert mem["argument_size_in_bytes"] > 0 and mem["total"] > 0, program["name"]
    assert fig["fits"] and 0 < fig["hbm_fraction"] < 1
    assert fig["flops"] > 0 and fig["seconds"] > 0 and fig["images_per_second_per_chip"] > 0
    assert program["compile_seconds"] > 0
  train, step, loop = out["programs"]
  # Donation: the state's buffers are the outputs' buffers.
  assert train["memory"]["alias_size_in_bytes"] >= sum(train["state_bytes"].values()) - 1024
  assert loop["figures"]["flops"] == pytest.approx(50 * step["cost"]["flops"])
  assert train["advice"] == []


def test_bad_topology_and_mesh_are_user_errors():
  with pytest.raises(analysis.AotError, match="--topology='v9x:2x2'"):
    analysis.analyse(tiny_sd(), "v9x:2x2")
  c = tiny_sd()
  c.mesh.fsdp = 3
  with pytest.raises(analysis.AotError, match="mesh"):
    analysis.analyse(c, "v5e:2x2")
  with pytest.raises(analysis.AotError, match="batch_size=6"):
    c.mesh.fsdp, c.data.batch_size = 1, 6
    analysis.analyse(c, "v5e:2x2")
  c = tiny_sd()
  c.lora.rank = 4
  with pytest.raises(analysis.AotError, match="config.lora.rank=4"):
    analysis.analyse(c, "v5e:2x2")
  import configs.shapes_classifier
  c = configs.shapes_classifier.get_config("tiny")
  with pytest.raises(analysis.AotError, match="config.stage='classifier' config has no sampling"):
    analysis.analyse(c, "v5e:2x2", train=False, sample=True)
  c.stage = "lpips"
  with pytest.raises(analysis.AotError, match="config.stage='lpips'"):
    analysis.analyse(c, "v5e:2x2")


def test_classifier_train_step_compiles_for_tpu(tpu_v5e_devices):
  """The noisy-latent classifier's step (classifier guidance's stage) through the same command:
  its state is the EncoderUNet's parameters and AdamW moments (no EMA, as CompVis trains it),
  the frozen autoencoder that encodes its batches is resident beside it, the state is donated,
  and a program too large for the chip gets only the advice that applies to this stage."""
  del tpu_v5e_devices
  import configs.shapes_classifier
  from ldm_jax import networks
  from ldm_jax.train import classifier_task
  c = configs.shapes_classifier.get_config("tiny")
  texts = {}
  out = analysis.analyse(c, "v5e:2x2", batch_per_chip=2,
                         on_compiled=lambda name, compiled: texts.__setitem__(name,
                                                                              compiled.as_text()))
  (step,) = out["programs"]
  assert step["name"] == "train_step" and step["batch_per_chip"] == 2 and step["images"] == 8
  size = c.model.diffusion.image_size
  params = jax.eval_shape(classifier_task.make_classifier(c).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, size, size, 4)), jnp.zeros((1,), jnp.int32))["params"]
  param_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(params))
  state = step["state_bytes"]
  assert state["params"] == param_bytes and "ema_params" not in state
  assert 2 * param_bytes <= state["opt_state"] <= 2 * param_bytes + 1024
  first_stage = jax.eval_shape(lambda r: networks.init_first_stage(c.model.first_stage, r),
                               jax.random.PRNGKey(0))
  assert step["figures"]["resident_bytes"] == sum(int(np.prod(x.shape)) * 4
                                                  for x in jax.tree.leaves(first_stage)) > 0
  assert step["memory"]["alias_size_in_bytes"] >= sum(state.values()) - 1024
  assert step["figures"]["fits"] and step["figures"]["flops"] > 0 and step["advice"] == []
  assert "while" not in texts["train_step"]
  mem = {"total": 20 * topology.GIB, "temp_size_in_bytes": 10 * topology.GIB}
  c.train.remat = False
  fig = report.figures(chip=topology.CHIPS["v5e"], num_chips=4, images=8, mem=mem, costs={},
                       resident_bytes=topology.GIB)
  tips = "\n".join(report.advice(c, chip=topology.CHIPS["v5e"], num_chips=4, figures=fig, mem=mem,
                                 states=state, batch_per_chip=2))
  assert "--batch_per_chip=1" in tips and "mesh.fsdp=4" in tips
  assert "remat" not in tips and "latent_cache" not in tips  # stage 2's knobs only


@pytest.mark.parametrize("args, named", [
    (["--config", "configs/sd_v1_finetune.py:tiny", "--topology", "v5e:3x3x3x3"], "v5e:3x3x3x3"),
    (["--config", "configs/no_such_config.py", "--topology", "v5e:2x2"], "no_such_config.py"),
])
def test_cli_error_is_one_line_and_exit_code_2(args, named):
  proc = subprocess.run([sys.executable, "-m", "ldm_jax.aot", *args], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("ldm_jax.aot: error:")]
  assert len(errors) == 1 and named in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_lower_only_traces_every_program_without_compiling(monkeypatch):
  """--lower_only lowers the same programs for the topology (their state bytes are the compiled
  run's) and never calls XLA's compile, so it reports no memory or cost figures."""
  from ldm_jax.aot import programs

  def no_compile(program):
    raise AssertionError(f"{program.name} was compiled")
  monkeypatch.setattr(programs, "compile_program", no_compile)
  c = sd_v1_finetune.get_config("tiny")
  out = analysis.analyse(c, "v5e:2x2", batch_per_chip=1, sample=True, sample_batch_per_chip=1,
                         sample_steps=2, lower_only=True)
  assert [p["name"] for p in out["programs"]] == ["train_step", "sample_step", "sample_loop"]
  train = out["programs"][0]
  assert train["lower_seconds"] > 0 and "memory" not in train and "advice" not in train
  assert train["state_bytes"]["params"] > 0 and train["state_bytes"]["opt_state"] > 0


@pytest.mark.parametrize("name", ["sd_v2_inpainting", "sd_v2_depth", "sd_x4_upscaler"])
def test_sampling_loop_lowers_for_the_concat_families(name):
  """The text-family models with a concat condition get their image / mask, depth map or
  low-resolution image in the AOT sampling loop (without them it cannot be built at all)."""
  import importlib
  c = importlib.import_module(f"configs.{name}").get_config("tiny")
  out = analysis.analyse(c, "v5e:2x2", train=False, sample=True, sample_batch_per_chip=1,
                         sample_steps=2, lower_only=True)
  assert [p["name"] for p in out["programs"]] == ["sample_step", "sample_loop"]


def test_noattention_kernel_keeps_the_einsum_form(tpu_v5e_devices):
  """`--noattention_kernel` (the 'before' of the Pallas kernel in docs/scaling.md) lowers the same
  program with TPU attention as the one-block einsum: no Pallas call in it."""
  from ldm_jax.aot import programs
  from ldm_jax.train import loop
  c = tiny_sd()
  program = programs.sample_step(c, loop.make_mesh(c, tpu_v5e_devices), batch_per_chip=1)
  texts = {kernel: programs.lower_program(program, kernel)[0].as_text() for kernel in (True, False)}
  assert "tpu_custom_call" in texts[True]
  assert "tpu_custom_call" not in texts[False] and "while" not in texts[False]
  out = analysis.analyse(c, "v5e:2x2", train=False, sample=True, sample_batch_per_chip=1,
                         sample_steps=2, lower_only=True, attention_kernel=False)
  assert out["attention"] == "einsum"


def _flops(compiled) -> float:
  costs = compiled.cost_analysis()
  return (costs if isinstance(costs, dict) else costs[0])["flops"]


def test_windowed_einsum_loops_are_counted_and_their_undercount_flagged(tpu_v5e_devices):
  """On 8 chips XLA's TPU compiler turns a large FSDP matmul gradient into windowed-einsum loops
  (gather one weight shard per iteration) whose bodies its cost analysis counts once: the FLOPs
  fall below the closed form 2 x 2 x B x D x D / chips. The report counts those loops and says
  its figures are undercounts; a small gradient on the same mesh has no loop and the closed
  form's count."""
  del tpu_v5e_devices  # libtpu is there.
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  _, devices = topology.tpu_devices("v5e:2x4")
  mesh = Mesh(np.array(devices).reshape(8), ("fsdp",))
  rows = NamedSharding(mesh, PartitionSpec("fsdp", None))
  grad = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w).astype(jnp.float32))),
                 out_shardings=rows)
  found = {}
  for batch, width in ((2048, 640), (16384, 1280)):
    w, x = (jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=rows)
            for shape in ((width, width), (batch, width)))
    compiled = grad.lower(w, x).compile()
    closed_form = 2 * 2 * batch * width * width / 8  # two matmuls (dx is not asked), per chip
    found[batch] = (report.loops(compiled.as_text()), _flops(compiled) / closed_form)
  small, large = found[2048], found[16384]
  assert small[0] == {"while": 0, "windowed_einsum": 0} and small[1] == pytest.approx(1, rel=0.01)
  assert large[0]["windowed_einsum"] >= 1 and large[0]["while"] == large[0]["windowed_einsum"]
  assert large[1] < 0.75  # XLA counts each loop body once
  assert "undercount" in report.undercount_note({"loops": large[0]})
  assert report.undercount_note({"loops": small[0]}) is None


def test_a_program_too_large_for_the_chip_is_refused_with_its_sizes(tpu_v5e_devices):
  """XLA's TPU compiler refuses a program whose temporaries exceed the chip's HBM; compile_program
  turns that into HbmRefusal with the sizes it named. Here each chip's cumulative sum holds a
  [2^14, 2^18] float32 array: 16 GiB by the closed form, more than a v5e's 16 GiB can spare."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from ldm_jax.aot import programs
  mesh = Mesh(np.array(tpu_v5e_devices), ("data",))
  x = jax.ShapeDtypeStruct((4 * 2 ** 14,), jnp.float32,
                           sharding=NamedSharding(mesh, PartitionSpec("data")))
  fn = jax.jit(lambda x: jnp.cumsum(jnp.outer(x, jnp.arange(2 ** 18, dtype=jnp.float32)),
                                    axis=0)[::2 ** 12, ::2 ** 12],
               out_shardings=NamedSharding(mesh, PartitionSpec()))
  with pytest.raises(programs.HbmRefusal) as refused:
    programs.compile_program(programs.Program("too_large", fn, (x,), images=1))
  assert refused.value.temp_bytes >= 2 ** 34  # at least the one [2^14, 2^18] float32 buffer
  assert 15 * 2 ** 30 < refused.value.available_bytes <= 16 * 2 ** 30
  assert refused.value.seconds["compile"] > 0


def test_a_refused_train_step_is_reported_as_not_fitting_with_advice(monkeypatch):
  """analyse turns a refusal into a row that does not fit: the arguments from their shardings,
  the temporaries XLA named, by how much it is over and which knobs help; no FLOPs."""
  from ldm_jax.aot import programs

  def refuse(program, attention_kernel=True):
    _, seconds = programs.lower_program(program, attention_kernel)
    seconds.update(compile=1.0, compile_cpu=1.0)
    raise programs.HbmRefusal(20 * 2 ** 30, int(15.75 * 2 ** 30), seconds)

  monkeypatch.setattr(programs, "compile_program", refuse)
  out = analysis.analyse(tiny_sd(), "v5e:2x2", batch_per_chip=2)
  step = out["programs"][0]
  assert "refused" in step and "20.00 GiB" in step["refused"]
  assert step["memory"]["temp_size_in_bytes"] == 20 * 2 ** 30
  assert step["memory"]["argument_size_in_bytes"] > sum(step["state_bytes"].values())
  assert not step["figures"]["fits"] and "flops" not in step["figures"]
  assert any("over" in tip for tip in step["advice"])
  assert any(tip.startswith("batch:") for tip in step["advice"])
  text = "\n".join(report.format_program(step))
  assert "refused" in text and "does NOT fit" in text


@pytest.mark.parametrize("name, chips", [("v4:2x2x1", 4), ("v4:2x2x2", 8), ("v5p:2x2x1", 4),
                                         ("v5e:2x4", 8)])
def test_topologies_have_one_device_per_chip(name, chips):
  """A v4 host runs each chip's two TensorCores as one device (megacore), and the report's
  figures are per chip: libtpu's v4 topology would otherwise hold a device per core."""
  chip, devices = topology.tpu_devices(name)
  assert len(devices) == chips == len({tuple(d.coords) for d in devices})
  assert chip.name == name.split(":")[0]
