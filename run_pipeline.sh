#!/usr/bin/env bash
# Thin shell over the `fashionbert` CLI: set up .venv once, then run a flow. Logic lives in Python.
#   ./run_pipeline.sh demo   synthetic catalog -> features (-> model -> tables as later stages land)
#   ./run_pipeline.sh test   the test suite (what CI runs)
#   ./run_pipeline.sh nightly --catalog SRC --workdir DIR [--model DIR | --train] [...]   scheduled incremental run
#   ./run_pipeline.sh backfill --catalog SRC --workdir DIR [--model DIR | --train] [...]  the same, featurized from scratch
# (`./run_pipeline.sh nightly --help` lists every option; they all pass through to `fashionbert nightly`.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

ensure_venv() {
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # Reinstall only when setup.py changed: a second run starts in seconds.
  local want stamp="$VENV/.fashionbert-setup-sha256"
  want="$(sha256sum setup.py | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "run_pipeline: installing into $VENV (first run takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # setup.py pins torch==2.14.1 and torchvision==0.29.1 together, in this one pip call.
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    echo "$want" > "$stamp"
  fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    ensure_venv
    exec "$VENV/bin/python" -m fashionbert.commands.demo "$@"
    ;;
  test)
    ensure_venv
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  nightly|backfill)
    ensure_venv
    exec "$VENV/bin/fashionbert" "$cmd" "$@"
    ;;
  *)
    echo "usage: ./run_pipeline.sh demo|test|nightly|backfill [options]  (nightly --help for its options)" >&2
    exit 2
    ;;
esac
