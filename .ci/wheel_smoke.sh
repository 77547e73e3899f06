#!/usr/bin/env bash
# Build the wheel, install it (not editable) into a fresh virtualenv and run one smoke command per subcommand
# from outside the source tree. The venv sees this environment's packages (--system-site-packages: torch and
# the rest are not downloaded again, no CUDA torch) and the wheel is installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="$PWD"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python -c "from setuptools import build_meta; build_meta.build_wheel('$WORK/dist')" >"$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log"; exit 1; }
python -m venv --system-site-packages "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --no-deps --no-index "$WORK"/dist/llmmem-*.whl
cd "$WORK"  # outside the source tree: the installed wheel is what runs
export LLMMEM_HOME="$WORK/home" HF_HUB_OFFLINE=1
PY="$WORK/venv/bin/python" LL="$WORK/venv/bin/llmmem"
"$PY" - "$SRC" <<'PY'
import sys
from pathlib import Path

import llmmem

where = Path(llmmem.__file__).resolve()
assert not where.is_relative_to(Path(sys.argv[1]).resolve()), f"llmmem imported from the source tree: {where}"
print(f"wheel-smoke: llmmem {llmmem.__version__} from {where.parent}")
PY
for cmd in $("$PY" -c "from llmmem.cli import COMMANDS, build_parser; build_parser(); print(' '.join(COMMANDS))"); do
  "$LL" "$cmd" --help >/dev/null
done
"$LL" ls tasks | grep -q capitals
"$LL" ls models | grep -q testbed
"$LL" validate capitals >/dev/null
"$LL" export-lm-eval "$WORK/exported" --tasks capitals >/dev/null
"$LL" testbed build --help >/dev/null
# validation reaches the subpackages (testbed tasks before the preset is built, unlearning, quantization)
set +e
"$LL" eval --model testbed --tasks testbed_recal 2>"$WORK/err"; rc=$?
set -e
[ "$rc" = 2 ] && grep -q testbed_recall "$WORK/err" || { cat "$WORK/err"; exit 1; }
echo "wheel-smoke: ok"
