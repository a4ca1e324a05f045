#!/usr/bin/env bash
# Runs `python -m lmm_align.main ARGS` on every worker of a Cloud TPU VM (single host or pod).
#
#   launch/tpu_run.sh --name llava-sft --zone us-central2-b --accelerator v4-32 -- \
#     --config=configs/llava15/sft.py --workdir=gs://BUCKET/runs/llava-sft-7b
#
# Phases: (1) create or reuse the TPU VM (or a queued resource with --queued), recreating it
# when it was preempted; (2) pack this checkout and scp it to all workers; (3) on all workers,
# unpack it, make a Python 3.11 venv once and `pip install -e . "jax[tpu]"`; (4) run the
# trainer on all workers at once, teeing each worker's output to
# ~/lmm_align_logs/main-$(hostname).log on that worker. Re-running the same command is safe
# and is how a preempted run resumes: the trainer restores from the workdir's latest
# checkpoint, which is why the workdir must be on gs:// (shared by all hosts, outlives the VM).
# See launch/README.md for the full recipe and the equivalent raw gcloud commands.
set -euo pipefail

readonly PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
# Seconds between state polls while a queued resource waits for capacity.
readonly POLL_SECONDS=${TPU_RUN_POLL_SECONDS:-30}
# Environment variables copied from this shell to the trainer on every worker when set here.
# Multi-host JAX on TPU needs none (jax.distributed.initialize reads the TPU metadata); these
# only tune logging, XLA and libtpu.
readonly PASS_ENV=(TPU_STDERR_LOG_LEVEL TPU_MIN_LOG_LEVEL TPU_VMODULE LIBTPU_INIT_ARGS
  XLA_FLAGS JAX_COMPILATION_CACHE_DIR JAX_TRACEBACK_FILTERING TF_CPP_MIN_LOG_LEVEL)

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --accelerator TYPE [options] -- ARGS...

Creates or reuses the Cloud TPU VM NAME, copies this checkout to all its workers, installs it
and runs 'python -m lmm_align.main ARGS' on --worker=all. ARGS must include a gs:// workdir
(--workdir=gs://BUCKET/PATH); running the same command again resumes from its checkpoint.

Required:
  --name NAME           TPU VM name (the queued resource is NAME-qr)
  --zone ZONE           e.g. us-central2-b (v4), us-east5-a (v5p), us-west4-a (v5litepod)
  --accelerator TYPE    e.g. v4-32, v5p-64, v5litepod-16, v6e-8

Options:
  --project P           GCP project (default: gcloud's configured project)
  --version RUNTIME     TPU runtime; default by family: v4 -> tpu-ubuntu2204-base,
                        v5litepod -> v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5,
                        v6e -> v2-alpha-tpuv6e
  --queued              create through 'gcloud compute tpus queued-resources' and wait
                        for capacity (the usual way to get large slices)
  --spot                spot capacity (cheaper, preemptible)
  --detach              start the trainer in the background on every worker and return;
                        watch ~/lmm_align_logs/main-*.log on the workers
  --delete-after        delete the TPU (or queued resource) when the run ends, even if it
                        failed (not with --detach)
  --dry-run             print the gcloud commands ('+ ' lines) instead of running them
  -h, --help            show this help

Passed through to the trainer when set in this shell:
  ${PASS_ENV[*]:0:4}
  ${PASS_ENV[*]:4}
EOF
}

die_usage() {
  printf '%s: %s\n\n' "$PROG" "$1" >&2
  usage >&2
  exit 2
}

# One word quoted for a POSIX shell: bare when plainly safe, else single-quoted.
shell_quote() {
  local word=$1
  if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# All arguments quoted and joined by spaces: a command line that a shell reads back as $@.
quote_words() {
  local word out=""
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

log_phase() { printf '==> %s\n' "$*"; }

# Prints a gcloud command as '+ ...', then runs it unless this is a dry run.
gcloud_run() {
  printf '+ %s\n' "$(quote_words gcloud "$@")"
  if ((DRY_RUN)); then return 0; fi
  gcloud "$@"
}

# Prints the state of a TPU VM (`--format=value(state)`) or of a queued resource; fails when
# it does not exist. Never called in a dry run.
describe_state() {
  if [[ $1 == vm ]]; then
    gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(state)' 2>/dev/null
  else
    gcloud compute tpus queued-resources describe "$QR_NAME" "${LOCATION[@]}" \
      --format='value(state.state)' 2>/dev/null
  fi
}

default_runtime() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# ---------------------------------------------------------------------------- arguments
NAME="" ZONE="" ACCELERATOR="" PROJECT="" RUNTIME=""
QUEUED=0 SPOT=0 DETACH=0 DELETE_AFTER=0 DRY_RUN=0
SEEN_SEPARATOR=0
while (($# > 0)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --name | --zone | --accelerator | --project | --version)
      (($# >= 2)) || die_usage "$1 needs a value"
      case $1 in
        --name) NAME=$2 ;; --zone) ZONE=$2 ;; --accelerator) ACCELERATOR=$2 ;;
        --project) PROJECT=$2 ;; --version) RUNTIME=$2 ;;
      esac
      shift 2 ;;
    --name=*) NAME=${1#*=}; shift ;;
    --zone=*) ZONE=${1#*=}; shift ;;
    --accelerator=*) ACCELERATOR=${1#*=}; shift ;;
    --project=*) PROJECT=${1#*=}; shift ;;
    --version=*) RUNTIME=${1#*=}; shift ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --detach) DETACH=1; shift ;;
    --delete-after) DELETE_AFTER=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) SEEN_SEPARATOR=1; shift; break ;;
    *) die_usage "unknown option '$1' (trainer arguments go after --)" ;;
  esac
done
MAIN_ARGS=("$@")

[[ -n $NAME ]] || die_usage "--name is required"
[[ -n $ZONE ]] || die_usage "--zone is required"
[[ -n $ACCELERATOR ]] || die_usage "--accelerator is required"
((SEEN_SEPARATOR && ${#MAIN_ARGS[@]} > 0)) ||
  die_usage "no trainer arguments: add -- --config=configs/EXPERIMENT.py --workdir=gs://..."
if [[ -z $RUNTIME ]]; then
  RUNTIME=$(default_runtime "$ACCELERATOR") ||
    die_usage "no default runtime for accelerator '$ACCELERATOR': pass --version"
fi
if ((DETACH && DELETE_AFTER)); then die_usage "--delete-after would kill a --detach run"; fi

# Every host must read and write the same checkpoints, and they must outlive the VM.
workdir="" config=""
for ((i = 0; i < ${#MAIN_ARGS[@]}; i++)); do
  case ${MAIN_ARGS[i]} in
    --workdir=* | -workdir=*) workdir=${MAIN_ARGS[i]#*=} ;;
    --workdir | -workdir) workdir=${MAIN_ARGS[i + 1]:-} ;;
    --config=* | -config=*) config=${MAIN_ARGS[i]#*=} ;;
  esac
done
[[ $workdir == gs://?* ]] ||
  die_usage "the trainer arguments need --workdir=gs://BUCKET/PATH (got '${workdir}')"
if [[ -n $config && ! -f $REPO_ROOT/${config%%:*} ]]; then
  printf '%s: warning: %s is not in this checkout\n' "$PROG" "${config%%:*}" >&2
fi

QR_NAME=$NAME-qr
LOCATION=(--zone "$ZONE")
if [[ -n $PROJECT ]]; then LOCATION+=(--project "$PROJECT"); fi
if ((!DRY_RUN)) && ! command -v gcloud >/dev/null; then
  echo "$PROG: gcloud not found; install the Google Cloud SDK" >&2
  exit 1
fi

# ---------------------------------------------------------------------------- remote commands
# These strings run in the login shell (bash) of each worker: $HOME and $(...) expand there.
# shellcheck disable=SC2016
readonly REMOTE_GUARD='pidfile="$HOME/lmm_align_logs/main.pid"; if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "$(hostname): lmm_align.main is still running (pid $(cat "$pidfile")); stop it first" >&2; exit 1; fi'
# Python 3.11 (setup.py's floor) comes from uv, since the TPU images ship 3.10. jax[tpu] is
# installed beside the package: pip keeps requirements.txt's jax pin and adds the matching libtpu.
# shellcheck disable=SC2016
readonly REMOTE_INSTALL="$REMOTE_GUARD"'; set -e; rm -rf "$HOME/lmm_align"; mkdir -p "$HOME/lmm_align"; tar -xzf "$HOME/lmm_align.tar.gz" -C "$HOME/lmm_align"; cd "$HOME/lmm_align"; if [ ! -x "$HOME/lmm_align_venv/bin/pip" ]; then python3 -m pip install --user --quiet uv; python3 -m uv venv --seed --python 3.11 "$HOME/lmm_align_venv"; fi; "$HOME/lmm_align_venv/bin/pip" install --quiet -e . "jax[tpu]"; echo "$(hostname): installed"'

env_words=()
for var in "${PASS_ENV[@]}"; do
  if [[ -n ${!var:-} ]]; then env_words+=("$var=${!var}"); fi
done
env_prefix=""
if ((${#env_words[@]} > 0)); then env_prefix="env $(quote_words "${env_words[@]}") "; fi
trainer="${env_prefix}python -m lmm_align.main $(quote_words "${MAIN_ARGS[@]}")"
# shellcheck disable=SC2016
run_prelude="$REMOTE_GUARD"'; mkdir -p "$HOME/lmm_align_logs"; cd "$HOME/lmm_align"; . "$HOME/lmm_align_venv/bin/activate"; log="$HOME/lmm_align_logs/main-$(hostname).log"; echo "=== $(date -u +%FT%TZ) lmm_align.main start" >> "$log"'
if ((DETACH)); then
  # shellcheck disable=SC2016
  REMOTE_RUN="$run_prelude; setsid $trainer >> \"\$log\" 2>&1 < /dev/null & echo \$! > \"\$pidfile\"; "'echo "$(hostname): started pid $!, log $log"'
else
  # The pid file lets the guard refuse a second launch while this one holds the TPU.
  REMOTE_RUN="$run_prelude; set -o pipefail; { $trainer & echo \$! > \"\$pidfile\"; wait \$!; status=\$?; rm -f \"\$pidfile\"; exit \$status; } 2>&1 | tee -a \"\$log\""
fi

# ---------------------------------------------------------------------------- 1. the TPU
create_tpu() {
  local spot=()
  if ((SPOT)); then spot=(--spot); fi
  if ((QUEUED)); then
    gcloud_run compute tpus queued-resources create "$QR_NAME" --node-id "$NAME" \
      "${LOCATION[@]}" --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" \
      ${spot[@]+"${spot[@]}"}
  else
    gcloud_run compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME" ${spot[@]+"${spot[@]}"}
  fi
}

delete_tpu() {
  if ((QUEUED)); then
    gcloud_run compute tpus queued-resources delete "$QR_NAME" "${LOCATION[@]}" --force --quiet
  else
    gcloud_run compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
  fi
}

# Waits until the queued resource is ACTIVE (its TPU VM is up); fails if it cannot be.
wait_for_queued_resource() {
  local state
  log_phase "waiting for queued resource $QR_NAME to become ACTIVE (polling every ${POLL_SECONDS}s)"
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_words gcloud compute tpus queued-resources describe "$QR_NAME" \
      "${LOCATION[@]}" '--format=value(state.state)')"
    return 0
  fi
  while true; do
    state=$(describe_state qr) || state=MISSING
    case $state in
      ACTIVE) log_phase "queued resource $QR_NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | MISSING)
        echo "$PROG: queued resource $QR_NAME is $state; see 'gcloud compute tpus queued-resources describe $QR_NAME --zone $ZONE'" >&2
        return 1 ;;
    esac
    echo "    $QR_NAME: $state"
    sleep "$POLL_SECONDS"
  done
}

ensure_tpu() {
  local kind=vm what="TPU VM $NAME" state
  if ((QUEUED)); then kind=qr what="queued resource $QR_NAME"; fi
  log_phase "[1/4] $what ($ACCELERATOR, runtime $RUNTIME, zone $ZONE)"
  if ((DRY_RUN)); then
    if ((QUEUED)); then
      gcloud_run compute tpus queued-resources describe "$QR_NAME" "${LOCATION[@]}" \
        '--format=value(state.state)'
    else
      gcloud_run compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" '--format=value(state)'
    fi
    echo "# dry run: assuming $what does not exist"
    create_tpu
    if ((QUEUED)); then wait_for_queued_resource; fi
    return 0
  fi
  if ! state=$(describe_state "$kind"); then
    log_phase "$what does not exist: creating it"
    create_tpu
    if ((QUEUED)); then wait_for_queued_resource; fi
    return 0
  fi
  case $state in
    READY | ACTIVE) log_phase "$what exists ($state): reusing it" ;;
    CREATING | STARTING | RESTARTING | REPAIRING)
      echo "$PROG: $what is $state; run again once it is READY" >&2
      return 1 ;;
    ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING) wait_for_queued_resource ;;
    PREEMPTED | TERMINATED | SUSPENDED | SUSPENDING | FAILED)
      log_phase "$what is $state: deleting and recreating it (the run resumes from its workdir)"
      delete_tpu
      create_tpu
      if ((QUEUED)); then wait_for_queued_resource; fi
      ;;
    *)
      echo "$PROG: $what is in state '$state'; fix or delete it, then run again" >&2
      return 1 ;;
  esac
}

# ---------------------------------------------------------------------------- 2. the code
# Tracked plus untracked-but-not-ignored files, so uncommitted work is what runs; without git,
# everything except VCS metadata, venvs and caches.
pack_repo() {
  local archive=$1
  if ((DRY_RUN)); then
    echo "# dry run: would pack $REPO_ROOT into $archive"
    return 0
  fi
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' file; do if [[ -e $file ]]; then printf '%s\0' "$file"; fi; done |
      COPYFILE_DISABLE=1 tar --null -T - -czf "$archive")
  else
    (cd "$REPO_ROOT" && COPYFILE_DISABLE=1 tar --exclude=.git --exclude=.venv --exclude=venv \
      --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache -czf "$archive" .)
  fi
  printf '    %s (%s bytes)\n' "$archive" "$(wc -c <"$archive" | tr -d ' ')"
}

# ---------------------------------------------------------------------------- main
tmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/tpu_run.XXXXXX")
tpu_up=0
# --delete-after deletes on any exit once the TPU is up (a failed install or run, Ctrl-C), so an
# unattended launch never leaves a pod billing; the exit status stays the failing command's.
on_exit() {
  local status=$?
  rm -rf "$tmp_dir"
  if ((status != 0)); then log_phase "stopped with exit status $status"; fi
  if ((DELETE_AFTER && tpu_up)); then
    log_phase "deleting the TPU (--delete-after)"
    delete_tpu || true
  fi
  exit "$status"
}
trap on_exit EXIT

ensure_tpu
tpu_up=1

log_phase "[2/4] packing $REPO_ROOT and copying it to all workers"
archive=$tmp_dir/lmm_align.tar.gz
pack_repo "$archive"
gcloud_run compute tpus tpu-vm scp "$archive" "$NAME:lmm_align.tar.gz" "${LOCATION[@]}" --worker=all

log_phase "[3/4] unpacking and installing on all workers"
gcloud_run compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command "$REMOTE_INSTALL"

log_phase "[4/4] running python -m lmm_align.main on all workers"
gcloud_run compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command "$REMOTE_RUN"
