#!/usr/bin/env bash
# Runs the same train.py command on every worker of a Cloud TPU VM pod slice (docs/scaling.md).
#
# Each worker clones (or pulls) the repository, creates a venv, installs requirements.txt and
# jax[tpu], then starts train.py; jax.distributed.initialize() finds the other workers by itself
# (parallel.maybe_initialize_distributed detects TPU_WORKER_HOSTNAMES), so the command is the same
# on every worker. The workdir must be one place that every worker sees: a gs:// bucket path.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/launch_tpu_pod.sh -n TPU_NAME -z ZONE -c CONFIG -w WORKDIR [options] [-- TRAIN_FLAGS...]

Runs `python train.py --config CONFIG --workdir WORKDIR TRAIN_FLAGS...` on all workers of a TPU VM
pod slice through `gcloud compute tpus tpu-vm ssh --worker=all`.

Required:
  -n TPU_NAME     the TPU VM (pod slice) name             (or env TPU_NAME)
  -z ZONE         its zone, e.g. us-central2-b            (or env ZONE)
  -c CONFIG       experiment config, path[:variant]       e.g. configs/txt2img_laion.py
  -w WORKDIR      gs://bucket/path (mounted with gcsfuse at ~/gcs/bucket on every worker), or an
                  absolute path on a filesystem all workers share (checkpoints, logs, summaries)
Options:
  -p PROJECT      gcloud project (default: gcloud's current one)
  -r REPO_URL     git URL to clone        (default: env LDM_JAX_REPO, else this checkout's origin)
  -b BRANCH       branch or commit        (default: this checkout's current branch)
  -d DIR          checkout dir on workers (default: ~/ldm_jax)
  -j JAX_SPEC     pip spec for JAX on TPU (default: 'jax[tpu]')
  -l              also write each worker's output to ~/ldm_jax_train.log and run under nohup
                  (the ssh session can then drop without stopping training)
  -x              dry run: print the gcloud command, run nothing
  -h              this help
Everything after `--` goes to train.py unchanged, e.g. -- --config.data.batch_size=512

Examples (docs/scaling.md explains batch, mesh and learning rate):
  # v4-32 (16 chips, 4 workers): global batch 256, pure data parallel.
  scripts/launch_tpu_pod.sh -n my-v4-32 -z us-central2-b -c configs/cin256_v2.py \
      -w gs://my-bucket/ldm/cin256 -- --config.data.batch_size=256 --config.mesh.data=-1
  # v5e-64 (64 chips, 16 workers): batch 1024, FSDP over 4 chips, 16-way data parallel.
  scripts/launch_tpu_pod.sh -n my-v5e-64 -z us-west4-a -c configs/txt2img_laion.py \
      -w gs://my-bucket/ldm/laion -- --config.data.batch_size=1024 \
      --config.mesh.data=-1 --config.mesh.fsdp=4 --config.train.compute_dtype=bfloat16
USAGE
}

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=""
CONFIG=""
WORKDIR=""
REPO_URL=${LDM_JAX_REPO:-}
BRANCH=""
DIR='~/ldm_jax'
JAX_SPEC='jax[tpu]'
BACKGROUND=0
DRY_RUN=0

while getopts "n:z:c:w:p:r:b:d:j:lxh" opt; do
  case "$opt" in
    n) TPU_NAME=$OPTARG ;;
    z) ZONE=$OPTARG ;;
    c) CONFIG=$OPTARG ;;
    w) WORKDIR=$OPTARG ;;
    p) PROJECT=$OPTARG ;;
    r) REPO_URL=$OPTARG ;;
    b) BRANCH=$OPTARG ;;
    d) DIR=$OPTARG ;;
    j) JAX_SPEC=$OPTARG ;;
    l) BACKGROUND=1 ;;
    x) DRY_RUN=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ "${1:-}" = "--" ]; then shift; fi
TRAIN_FLAGS=("$@")

fail() { echo "launch_tpu_pod.sh: error: $*" >&2; echo "Run with -h for usage." >&2; exit 2; }
[ -n "$TPU_NAME" ] || fail "no TPU name: pass -n TPU_NAME (or set TPU_NAME)"
[ -n "$ZONE" ] || fail "no zone: pass -z ZONE (or set ZONE)"
[ -n "$CONFIG" ] || fail "no config: pass -c CONFIG, e.g. -c configs/cin256_v2.py"
[ -n "$WORKDIR" ] || fail "no workdir: pass -w gs://bucket/path"
# train.py writes its logs and summaries with plain file I/O, so a bucket is mounted with gcsfuse
# at the same path on every worker and train.py gets that path.
MOUNT=""
case "$WORKDIR" in
  gs://*/*) BUCKET=${WORKDIR#gs://}; BUCKET=${BUCKET%%/*}
            MOUNT="\$HOME/gcs/$BUCKET"; RUN_WORKDIR="$MOUNT/${WORKDIR#gs://$BUCKET/}" ;;
  /*) RUN_WORKDIR=$WORKDIR ;;
  *) fail "-w $WORKDIR: expected gs://bucket/path, or an absolute path on a filesystem that \
every worker mounts (e.g. Filestore)" ;;
esac

HERE=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$REPO_URL" ]; then
  REPO_URL=$(git -C "$HERE" remote get-url origin 2>/dev/null) ||
    fail "no repository URL: pass -r REPO_URL (this checkout has no 'origin' remote)"
fi
if [ -z "$BRANCH" ]; then
  BRANCH=$(git -C "$HERE" rev-parse --abbrev-ref HEAD 2>/dev/null || echo main)
fi

# The remote command, with every user value quoted for the worker's shell.
q() { printf '%q' "$1"; }
TRAIN="python train.py --config $(q "$CONFIG") --workdir \"$RUN_WORKDIR\""
for f in "${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}"; do TRAIN+=" $(q "$f")"; done
if [ "$BACKGROUND" = 1 ]; then
  TRAIN="nohup $TRAIN > ~/ldm_jax_train.log 2>&1 &"
fi
MOUNT_CMD=""
if [ -n "$MOUNT" ]; then
  MOUNT_CMD="if ! command -v gcsfuse >/dev/null; then
  # Google's documented apt install of gcsfuse.
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
mkdir -p \"$MOUNT\"
mountpoint -q \"$MOUNT\" || gcsfuse --implicit-dirs $(q "$BUCKET") \"$MOUNT\""
fi
REMOTE="set -e
[ -d $DIR/.git ] || git clone --quiet $(q "$REPO_URL") $DIR
git -C $DIR fetch --quiet origin
# A branch name follows origin's tip; anything else (a tag, a commit) is checked out as is.
git -C $DIR checkout --quiet --detach $(q "origin/$BRANCH") 2>/dev/null ||
  git -C $DIR checkout --quiet --detach $(q "$BRANCH")
cd $DIR
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet -r requirements.txt $(q "$JAX_SPEC")
export JAX_PLATFORMS=tpu
$MOUNT_CMD
$TRAIN"

CMD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE")
if [ -n "$PROJECT" ]; then CMD+=(--project "$PROJECT"); fi

if [ "$DRY_RUN" = 1 ]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
command -v gcloud >/dev/null || fail "gcloud is not installed (https://cloud.google.com/sdk)"
exec "${CMD[@]}"
