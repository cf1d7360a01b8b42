#!/bin/sh
# Nightly COCO 2017 run (manifests/coco.yaml) for cron on a machine that can reach the cluster
# (the head node, or any node of it). Each run resumes the same output, so a night that was
# preempted or cut short is finished by the next; prompts appended to the source become new
# shards. Exits non-zero only when a person is needed (see jobs/run_manifest.py).
#
#   crontab -e:   0 1 * * *  /home/ray/catbatch/jobs/nightly_coco.sh
#
# Environment: CATBATCH_MANIFEST (default manifests/coco.yaml), CATBATCH_LOG_DIR (default
# ~/.local/state/catbatch; the log is <dir>/<manifest name>.log), CATBATCH_PYTHON (default the
# repository's .venv, else python3), CATBATCH_BIN (the catbatch command). Extra arguments are
# passed to jobs/run_manifest.py, e.g. `-- --address auto --actors 8`.
set -eu
cd "$(dirname "$0")/.."
PY=${CATBATCH_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" jobs/run_manifest.py "${CATBATCH_MANIFEST:-manifests/coco.yaml}" --report "$@"
