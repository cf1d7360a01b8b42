#!/bin/sh
# Nightly COCO 2017 run (manifests/coco.yaml) for cron on a machine that can reach the cluster
# (the head node, or any node of it). Each run resumes the same output, so a night that was
# preempted or cut short is finished by the next; prompts appended to the source become new
# shards. Exits non-zero only when a person is needed (see jobs/run_manifest.py).
#
#   crontab -e:   0 1 * * *  /path/to/catbatch/jobs/nightly_coco.sh -- --address auto
#
# Cron starts it with PATH=/usr/bin:/bin and little else, so the Python is looked for, in
# order: $CATBATCH_PYTHON, the repository's .venv, the Ray image's ~/anaconda3 (the
# rayproject/ray images and infra/Dockerfile), then python3 on PATH. catbatch is then the one
# beside that Python, on PATH, or that Python's module; if none is found this exits 127 and
# says so (cron mails it). In the Ray image, which runs no cron daemon, run it from the host's
# cron with `docker exec` (infra/launcher/aws.yaml) or use infra/k8s/cronjob.yaml on Kubernetes.
#
# Environment: CATBATCH_MANIFEST (default manifests/coco.yaml), CATBATCH_LOG_DIR (default
# ~/.local/state/catbatch; the log is <dir>/<manifest name>.log), CATBATCH_PYTHON,
# CATBATCH_BIN (the catbatch command). Extra arguments are passed to jobs/run_manifest.py,
# e.g. `-- --address auto --actors 8`.
set -eu
cd "$(dirname "$0")/.."
PY=${CATBATCH_PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in .venv/bin/python "${HOME:-/nonexistent}/anaconda3/bin/python"; do
    if [ -x "$candidate" ]; then PY=$candidate; break; fi
  done
fi
if [ -z "$PY" ]; then
  PY=$(command -v python3 || true)
fi
if [ -z "$PY" ]; then
  echo "nightly_coco.sh: no Python found (CATBATCH_PYTHON, .venv, ~/anaconda3, python3 on PATH=$PATH)" >&2
  exit 127
fi
exec "$PY" jobs/run_manifest.py "${CATBATCH_MANIFEST:-manifests/coco.yaml}" --report "$@"
