#!/usr/bin/env bash
# Check a GPU machine in one call: build the extension, run the whole test suite, run the end-to-end benchmark,
# all within one deadline (8 minutes by default); one JSON in bench/results/ (and $OUT), a short table last.
# Arguments go to bench/gpu_check.py (--help lists them); PYTHON picks the interpreter (default python3).
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
