"""TPU scaling rows from ahead-of-time compilation: `python -m ldm_jax.aot` per row, and the table.

  python benchmarks/aot_scaling.py --rows sd15_v5e2x2_b1 [--timeout 1800]   # compile, keep JSON
  python benchmarks/aot_scaling.py --table                                    # -> docs/scaling.md

Each row runs the AOT command in a subprocess (niced, with a timeout, one at a time) and writes
its JSON, with the command, date, commit, machine and wall time, to
benchmarks/results/aot/<row>.json. `--table` rewrites the table between the AOT markers of
docs/scaling.md from the JSON files there: measured rows only; a row that timed out says so.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "aot")
DOC = os.path.join(ROOT, "docs", "scaling.md")
BEGIN, END = "<!-- aot-table:begin -->", "<!-- aot-table:end -->"

SD15 = "configs/sd_v1_finetune.py"
SD2 = "configs/sd_v2_finetune.py"
# name -> AOT command-line arguments (after `python -m ldm_jax.aot`).
ROWS = {
    "sd15_v5e2x2_b1": ["--config", SD15, "--topology", "v5e:2x2", "--config.mesh.fsdp=4",
                       "--batch_per_chip", "1"],
    "sd15_v5e2x2_b8": ["--config", SD15, "--topology", "v5e:2x2", "--config.mesh.fsdp=4",
                       "--batch_per_chip", "8"],
    # The largest batch: b1 and b8 put temporaries at about 0.34 GiB per image with remat, so
    # 32 per chip should still fit a v5e's 16 GiB.
    "sd15_v5e2x2_b32": ["--config", SD15, "--topology", "v5e:2x2", "--config.mesh.fsdp=4",
                        "--batch_per_chip", "32"],
    "sd15_v5e2x2_b8_noremat": ["--config", SD15, "--topology", "v5e:2x2",
                               "--config.mesh.fsdp=4", "--config.train.remat=False",
                               "--batch_per_chip", "8"],
    # Without FSDP every chip holds the whole fp32 state (about 12.8 GiB).
    "sd15_v5e2x2_b1_nofsdp": ["--config", SD15, "--topology", "v5e:2x2", "--config.mesh.fsdp=1",
                              "--batch_per_chip", "1"],
    # The Pallas kernel's effect on the whole step: the same row with TPU attention in its
    # one-block einsum form.
    "sd15_v5e2x2_b8_einsum": ["--config", SD15, "--topology", "v5e:2x2", "--config.mesh.fsdp=4",
                              "--batch_per_chip", "8", "--noattention_kernel"],
    "sd15_v5e2x4_b8": ["--config", SD15, "--topology", "v5e:2x4", "--config.mesh.fsdp=8",
                       "--batch_per_chip", "8"],
    # The b8 step's compile for v4 outgrew the 24 GB build machine; one image per chip needs less.
    "sd15_v4_2x2x1_b1": ["--config", SD15, "--topology", "v4:2x2x1", "--config.mesh.fsdp=4",
                         "--batch_per_chip", "1"],
    "sd15_v4_2x2x1_b8": ["--config", SD15, "--topology", "v4:2x2x1", "--config.mesh.fsdp=4",
                         "--batch_per_chip", "8"],
    "sd15_v5p_2x2x1_b16": ["--config", SD15, "--topology", "v5p:2x2x1", "--config.mesh.fsdp=4",
                           "--batch_per_chip", "16"],
    # The same step without remat, as the MLPerf SD2 reference trains it.
    "sd15_v5p_2x2x1_b16_noremat": ["--config", SD15, "--topology", "v5p:2x2x1",
                                   "--config.mesh.fsdp=4", "--config.train.remat=False",
                                   "--batch_per_chip", "16"],
    "sd2base_v5e2x2_b8": ["--config", SD2 + ":base", "--topology", "v5e:2x2",
                          "--config.mesh.fsdp=4", "--batch_per_chip", "8"],
    # SD2 at 512 px on the other topologies, at the SD1.5 rows' batches.
    "sd2base_v5e2x4_b8": ["--config", SD2 + ":base", "--topology", "v5e:2x4",
                          "--config.mesh.fsdp=8", "--batch_per_chip", "8"],
    "sd2base_v4_2x2x1_b1": ["--config", SD2 + ":base", "--topology", "v4:2x2x1",
                            "--config.mesh.fsdp=4", "--batch_per_chip", "1"],
    "sd2base_v5p_2x2x1_b16": ["--config", SD2 + ":base", "--topology", "v5p:2x2x1",
                              "--config.mesh.fsdp=4", "--batch_per_chip", "16"],
    # The paper's pixel-space-256 LDMs on KL/VQ-f4 latents (64x64x3), data-parallel as released.
    "celebahq_ldm4_v5e2x2_b12": ["--config", "configs/celebahq_ldm_vq4.py", "--topology",
                                 "v5e:2x2", "--batch_per_chip", "12"],
    "cin256_v2_v5e2x2_b8": ["--config", "configs/cin256_v2.py", "--topology", "v5e:2x2",
                            "--batch_per_chip", "8"],
    "sd15_sample_v5e2x2_b8": ["--config", SD15, "--topology", "v5e:2x2", "--config.mesh.fsdp=4",
                              "--notrain", "--sample", "--sample_batch_per_chip", "8"],
    "shapes_text_tiny_v5e2x2": ["--config", "configs/shapes_ldm_text.py:tiny", "--topology",
                                "v5e:2x2", "--batch_per_chip", "1", "--sample",
                                "--sample_batch_per_chip", "2"],
}


def commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return out + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def machine() -> str:
  return f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start"


def run_row(name: str, timeout: float) -> dict:
  """Runs one row's AOT command; returns (and saves) its JSON plus the run's metadata."""
  os.makedirs(RESULTS, exist_ok=True)
  path = os.path.join(RESULTS, f"{name}.json")
  args = ROWS[name] + ["--json", path + ".tmp"]
  command = "python -m ldm_jax.aot " + " ".join(shlex.quote(a) for a in ROWS[name])
  meta = {"row": name, "command": command, "commit": commit(), "machine": machine(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
  start = time.perf_counter()
  try:
    proc = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "ldm_jax.aot", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    meta["returncode"] = proc.returncode
    meta["stdout"] = proc.stdout
    if proc.returncode:
      meta["error"] = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
  except subprocess.TimeoutExpired:
    meta["timed_out_after_seconds"] = timeout
  meta["wall_seconds"] = time.perf_counter() - start
  if os.path.exists(path + ".tmp"):
    with open(path + ".tmp") as f:
      meta["aot"] = json.load(f)
    os.remove(path + ".tmp")
  with open(path, "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  return meta


_DTYPES = {"bfloat16": "bf16", "float32": "fp32"}


def _gib(n) -> str:
  return f"{n / 2 ** 30:.2f}"


def table_rows(results: list[dict]) -> list[str]:
  lines = ["| row | chips | batch/chip | compute, remat | state GiB/chip (params+opt+EMA) | temp GiB | "
           "used GiB / HBM | fits | FLOPs/chip | est. time (source) | img/s/chip (at most) | "
           "trace + compile s wall (compile CPU s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for meta in results:
    aot = meta.get("aot")
    if aot is None:
      error = meta.get("error")
      error = "; ".join(error) if isinstance(error, list) else error
      why = (f"did not finish in {meta['timed_out_after_seconds']:.0f} s wall"
             if "timed_out_after_seconds" in meta else f"failed: {error}")
      if meta.get("note"):
        why += f" ({meta['note']})"
      lines.append(f"| {meta['row']} | | | | | | | | | {why} | | |")
      continue
    for p in aot["programs"]:
      fig, mem = p["figures"], p["memory"]
      state = sum(p.get("state_bytes", {}).values())
      seconds = (f"{1e3 * fig['seconds']:.1f} ms ({fig['time_source']})" if "seconds" in fig
                 else "n/a")
      ips = f"{fig['images_per_second_per_chip']:.2f}" if "images_per_second_per_chip" in fig \
          else "n/a"
      verdict = "yes" if fig["fits"] else ("NO (XLA refused it)" if "refused" in p else "NO")
      flops = f"{fig['flops']:.3g}" if "flops" in fig else "-"
      windowed = p.get("loops", {}).get("windowed_einsum", 0)
      undercount = f" (undercount: {windowed} windowed-einsum loops)" if windowed else ""
      lines.append(
          f"| {meta['row']}: {p['name']} | {aot['num_chips']} {aot['chip']} | "
          f"{p.get('batch_per_chip', '')} | {_DTYPES.get(aot['compute_dtype'], aot['compute_dtype'])}"
          f"{', remat' if aot['remat'] else ''}"
          f"{', einsum attention' if aot.get('attention') == 'einsum' else ''} | "
          f"{_gib(state) if state else '-'} | "
          f"{_gib(mem.get('temp_size_in_bytes', 0))} | {_gib(fig.get('used_bytes', mem['total']))} / "
          f"{_gib(fig['hbm_bytes'])} | {verdict} | "
          f"{flops}{undercount} | {seconds} | {ips} | "
          f"{p['lower_seconds']:.0f} + {p['compile_seconds']:.0f} "
          f"({p.get('compile_cpu_seconds', float('nan')):.0f} CPU) |")
  return lines


def write_table() -> None:
  results = []
  for name in ROWS:
    path = os.path.join(RESULTS, f"{name}.json")
    if os.path.exists(path):
      with open(path) as f:
        results.append(json.load(f))
  lines = [BEGIN, "", *table_rows(results), "", "Commands, dates, commits and machines:", ""]
  for meta in results:
    lines.append(f"- {meta['row']}: `{meta['command']}` ({meta['date']}, commit {meta['commit']}, "
                 f"{meta['machine']}; wall {meta['wall_seconds']:.0f} s)")
  lines += ["", END]
  with open(DOC) as f:
    doc = f.read()
  if BEGIN not in doc or END not in doc:
    raise SystemExit(f"{DOC}: the markers {BEGIN} ... {END} are missing.")
  head, rest = doc.split(BEGIN, 1)
  tail = rest.split(END, 1)[1]
  with open(DOC, "w") as f:
    f.write(head + "\n".join(lines) + tail)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default="", help=f"comma-separated, of {sorted(ROWS)}")
  parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
  parser.add_argument("--table", action="store_true", help="rewrite docs/scaling.md's table")
  args = parser.parse_args()
  for name in [r for r in args.rows.split(",") if r]:
    if name not in ROWS:
      raise SystemExit(f"--rows: unknown row {name!r}; expected one of {sorted(ROWS)}")
    meta = run_row(name, args.timeout)
    print(meta.get("stdout") or meta.get("error") or meta, flush=True)
  if args.table:
    write_table()


if __name__ == "__main__":
  main()
