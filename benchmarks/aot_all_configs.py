"""Does every config in configs/ trace and lower for a TPU topology? (a benchmark, not a test)

  TPU_SKIP_MDS_QUERY=1 python benchmarks/aot_all_configs.py [--topology v5e:2x2] \
      [--variants tiny,] [--compile_tiny] [--compile_full] [--resume] \
      [--out benchmarks/results/aot/all_configs.json]

For each config module and variant ('' is the full size), runs what `python -m ldm_jax.aot
--config configs/NAME.py[:VARIANT] --topology T --batch_per_chip 1 --lower_only [--sample]` runs,
in this process (a config's fsdp larger than the topology's chips is set to the chip count, as the
row says): stage 1 and classifier configs lower their train step, stage 2 configs their train step
and sampling loop (batch 1 per chip). Lowering checks the project's shardings, kernel choices and
shapes for the TPU devices; XLA's compile is what `--compile_tiny` adds for the tiny variants
(minutes each here) and `--compile_full` for the full-size ones (10-40 minutes each on 2 cores, and
up to ~21 GB of host memory for the SD-size ones: run those alone). Prints one row per config and
writes JSON after every row, each row with its commit and date; a config that fails is a row with
the error's last line, and the run goes on. `--resume` keeps the rows of the --out file that were
already done the same way (same topology, lowered or compiled) and runs only the others, so a long
sweep can be spread over several runs.

  python benchmarks/aot_all_configs.py --table [--out benchmarks/results/aot/all_configs_full_compiled.json]

rewrites the table between the full-size markers of docs/scaling.md from a compiled run's JSON: per
config, each program's memory per chip and FLOPs, the compile time, the commit and the date.
"""

import argparse
import datetime
import glob
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from ldm_jax.aot import analysis  # noqa: E402  (after the repository is on the path)
from ldm_jax.aot import topology as aot_topology  # noqa: E402

DOC = os.path.join(ROOT, "docs", "scaling.md")
BEGIN, END = "<!-- full-configs:begin -->", "<!-- full-configs:end -->"
PROGRAMS = ("train_step", "sample_step", "sample_loop")


def config_names() -> list[str]:
  return sorted(os.path.splitext(os.path.basename(p))[0]
                for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                if os.path.basename(p) != "common.py")


def load(name: str, variant: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def run_one(name: str, variant: str, topology: str, compile_: bool) -> dict:
  row = {"config": name, "variant": variant}
  start = time.perf_counter()
  try:
    config = load(name, variant)
    row["stage"] = config.stage
    chips = len(aot_topology.tpu_devices(topology)[1])
    if config.mesh.get("fsdp", 1) > chips:  # SD configs shard over 8 chips: as many as there are.
      row["override"] = f"--config.mesh.fsdp={chips}"
      with config.unlocked():
        config.mesh.fsdp = chips
    out = analysis.analyse(config, topology, batch_per_chip=1,
                           sample=config.stage == "ldm", sample_batch_per_chip=1,
                           sample_steps=2, lower_only=not compile_)
    row["programs"] = {p["name"]: {k: p[k] for k in ("lower_seconds", "compile_seconds")
                                   if k in p} for p in out["programs"]}
    for p in out["programs"]:  # A compiled program's memory against the chip, and its FLOPs.
      figures = p.get("figures", {})
      row["programs"][p["name"]].update(
          {k: figures[k] for k in ("used_bytes", "hbm_bytes", "fits", "flops") if k in figures})
    row["status"] = "compiled" if compile_ else "lowered"
  except Exception as e:  # A row per failure; the sweep goes on.  # noqa: BLE001
    lines = [l for l in traceback.format_exception_only(type(e), e)[-1].splitlines() if l.strip()]
    row["status"] = "FAILED: " + (lines[-1] if lines else type(e).__name__)
  finally:
    row["seconds"] = round(time.perf_counter() - start, 1)
  return row


def previous_rows(path: str, topology: str) -> dict[tuple[str, str], dict]:
  """(config, variant) -> row of an earlier run's JSON for the same topology ({} if none)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    earlier = json.load(f)
  if earlier.get("topology") != topology:
    return {}
  return {(r["config"], r["variant"]): dict(r, commit=r.get("commit", earlier.get("commit")))
          for r in earlier.get("rows", [])}


def table_lines(report: dict) -> list[str]:
  """A markdown table of a compiled run's rows: memory per chip and FLOPs per program."""
  def program(row: dict, name: str) -> str:
    p = row.get("programs", {}).get(name)
    if not p or "used_bytes" not in p:
      return "-"
    if "flops" not in p:  # XLA's compiler refused it: the bytes are what it asked for.
      return f"{p['used_bytes'] / 2 ** 30:.2f}: does NOT fit (XLA refused it)"
    verdict = "" if p["fits"] else " (does NOT fit)"
    return f"{p['used_bytes'] / 2 ** 30:.2f}{verdict}, {p['flops']:.2e}"

  lines = ["| config | stage | train step: GiB/chip, FLOPs/chip | guided sampling step | "
           "2-step sampling loop | compile min | commit, date |",
           "|---|---|---|---|---|---|---|"]
  for row in sorted(report["rows"], key=lambda r: (r.get("stage", ""), r["config"])):
    name = row["config"] + (f":{row['variant']}" if row["variant"] else "")
    if row["status"] != "compiled":
      lines.append(f"| {name} | {row.get('stage', '')} | {row['status']} | | | "
                   f"{row['seconds'] / 60:.0f} | {row.get('commit', '?')}, {row.get('date', '?')} |")
      continue
    compile_s = sum(p.get("compile_seconds", 0) for p in row["programs"].values())
    override = f" ({row['override']})" if "override" in row else ""
    lines.append(f"| {name}{override} | {row['stage']} | "
                 + " | ".join(program(row, p) for p in PROGRAMS)
                 + f" | {compile_s / 60:.1f} | {row.get('commit', '?')}, {row.get('date', '?')} |")
  return lines


def table_block(path: str) -> str:
  """docs/scaling.md's full-size section, markers included, from a compiled run's JSON."""
  with open(path) as f:
    report = json.load(f)
  compiled = [r for r in report["rows"] if r["status"] == "compiled"]
  fitting = [r for r in compiled if all(p.get("fits", True) for p in r["programs"].values())]
  wanted = config_names()
  missing = sorted(set(wanted) - {r["config"] for r in compiled if not r["variant"]})
  lines = [BEGIN, "",
           f"{len(compiled)} of the {len(wanted)} full-size configs compiled "
           f"for {report['topology']} at batch 1 per chip, {len(fitting)} of them fitting the chip "
           f"in every program (`{os.path.relpath(path, ROOT)}`, machine: {report['machine']})"
           + (f"; not compiled yet: {', '.join(f'`{n}`' for n in missing)}." if missing else "."),
           "", *table_lines(report), "", END]
  return "\n".join(lines)


def write_table(path: str) -> None:
  with open(DOC) as f:
    doc = f.read()
  if BEGIN not in doc or END not in doc:
    raise SystemExit(f"{DOC}: the markers {BEGIN} ... {END} are missing.")
  head, rest = doc.split(BEGIN, 1)
  doc = head + table_block(path) + rest.split(END, 1)[1]
  with open(DOC, "w") as f:
    f.write(doc)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--variants", default="tiny,", help="comma-separated; '' is full size")
  parser.add_argument("--configs", default="", help="comma-separated names (default: all)")
  parser.add_argument("--compile_tiny", action="store_true",
                      help="compile the tiny variants with XLA's TPU compiler (minutes each)")
  parser.add_argument("--compile_full", action="store_true",
                      help="compile the full-size variants too (10-40 minutes each)")
  parser.add_argument("--resume", action="store_true",
                      help="keep the --out file's rows already done the same way; run the rest")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/aot/all_configs.json"))
  parser.add_argument("--table", action="store_true",
                      help="rewrite docs/scaling.md's full-size table from --out; compile nothing")
  args = parser.parse_args()
  if args.table:
    write_table(args.out)
    return
  names = [n for n in args.configs.split(",") if n] or config_names()
  variants = args.variants.split(",")
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
  report = {"topology": args.topology, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "command": "python benchmarks/aot_all_configs.py " + " ".join(sys.argv[1:]),
            "rows": []}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  compiles = lambda variant: args.compile_tiny if variant == "tiny" else args.compile_full
  done = previous_rows(args.out, args.topology) if args.resume else {}
  # Rows of configs this run does not cover stay in the file, first.
  report["rows"] = [row for key, row in done.items()
                    if key[0] not in names or key[1] not in variants]
  for name in names:
    for variant in variants:
      wanted = "compiled" if compiles(variant) else "lowered"
      row = done.get((name, variant))
      if row is not None and row["status"] == wanted:
        report["rows"].append(row)
        print(f"{name}:{variant or 'full'}: {wanted} at {row.get('commit', '?')} (kept)",
              flush=True)
        continue
      row = run_one(name, variant, args.topology, compiles(variant))
      row.update(commit=commit, date=datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"))
      report["rows"].append(row)
      with open(args.out, "w") as f:  # After every row: a sweep stopped part-way keeps its rows.
        json.dump(report, f, indent=2)
      programs = ", ".join(
          f"{k} {v.get('lower_seconds', 0):.1f} s"
          + (f" + {v['compile_seconds']:.1f} s compile, {v['used_bytes'] / 2 ** 20:.0f} MiB"
             if "compile_seconds" in v and "used_bytes" in v else "")
          for k, v in row.get("programs", {}).items())
      print(f"{name}:{variant or 'full'}: {row['status']} ({row['seconds']} s) {programs}"
            f"{' with ' + row['override'] if 'override' in row else ''}",
            flush=True)
  failed = [r for r in report["rows"] if r["status"].startswith("FAILED")]
  print(f"{len(report['rows'])} rows, {len(failed)} failed")


if __name__ == "__main__":
  main()
