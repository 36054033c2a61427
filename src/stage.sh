#!/bin/sh
# What dvc.yaml runs for each stage: `cleanmessy <stage>` from the active environment, else from
# the project's .venv (made by `make setup`): `.venv/bin/dvc repro` without an activated venv
# does not put .venv/bin on PATH.
if command -v cleanmessy >/dev/null 2>&1; then
  exec cleanmessy "$@"
elif [ -x .venv/bin/cleanmessy ]; then
  exec .venv/bin/cleanmessy "$@"
fi
echo "cleanmessy is not installed here: run \`make setup\`, then \`source .venv/bin/activate\` (or prefix the command with \`uv run\`)" >&2
exit 127
