#!/usr/bin/env bash
# Runs the hpacellseg backend's tests against the REAL package (CellProfiling/HPA-Cell-Segmentation)
# in a scratch virtualenv with PyTorch: the package's own CellSegmentator and label_cell driven by
# small stand-in models pickled whole (tests/hpacellseg_standins.py; no real weights are needed),
# TensorFlow and PyTorch in one process in both import orders, and the segmentation CLI, the
# builder and predict.py with --segmenter hpacellseg --device cpu end to end on synthetic fields.
# CI skips these tests (no torch there); this script is how they run for real.
#
#   scripts/check_hpacellseg.sh [extra pytest arguments]
#
# Environment (all optional):
#   HPACELLSEG_SRC   the package's source archive
#                    (default: ../shared/vendor/hpacellseg-7b6dbc6.tar.gz beside the checkout)
#   HPACELLSEG_VENV  the virtualenv, made when missing and reused after
#                    (default: ${TMPDIR:-/tmp}/hpa-tf-hpacellseg-venv)
#   PYTHON           an interpreter with hpa-tf's requirements installed (default: python3)
#   TORCH_PACKAGES   PyTorch to install (default: "torch==2.14.1 torchvision==0.29.1")
#
# Why --system-site-packages: the virtualenv sees PYTHON's packages, so TensorFlow, Keras, numpy and
# scikit-image are exactly the ones hpa-tf runs with (nothing reinstalled, as on a Kaggle or Colab
# image where they come with the system); torch, torchvision, triton and hpacellseg go into the
# virtualenv only, never into PYTHON's own site-packages. hpacellseg is installed with --no-deps:
# its requirements would add opencv-python beside opencv-python-headless (two packages providing
# cv2) and re-resolve torch. Exit status 0 only when every test ran and passed (a skip fails).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=${HPACELLSEG_SRC:-$ROOT/../shared/vendor/hpacellseg-7b6dbc6.tar.gz}
VENV=${HPACELLSEG_VENV:-${TMPDIR:-/tmp}/hpa-tf-hpacellseg-venv}
PYTHON=${PYTHON:-python3}
TORCH_PACKAGES=${TORCH_PACKAGES:-torch==2.14.1 torchvision==0.29.1}
START=$(date +%s)

say() { printf '== %s\n' "$*"; }
die() { printf 'check_hpacellseg: error: %s\n' "$*" >&2; exit 2; }

[ -f "$SRC" ] || die "hpacellseg source archive not found: $SRC (set HPACELLSEG_SRC)"
SRC=$(cd "$(dirname "$SRC")" && pwd)/$(basename "$SRC")
"$PYTHON" -c "import tensorflow, keras, numpy, skimage, cv2, pytest" 2>/dev/null \
    || die "$PYTHON lacks hpa-tf's requirements (pip install -r requirements.txt), or set PYTHON"

if [ ! -x "$VENV/bin/python" ]; then
    say "making $VENV (--system-site-packages over $("$PYTHON" -c 'import sys; print(sys.executable)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
say "installing $TORCH_PACKAGES"
# shellcheck disable=SC2086  # TORCH_PACKAGES is a list of requirements
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $TORCH_PACKAGES
say "installing $SRC (--no-deps)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$SRC"

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HPACELLSEG_SRC="$SRC" TF_CPP_MIN_LOG_LEVEL=3
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import sys
names = ["tensorflow", "keras", "numpy", "scikit-image", "torch", "torchvision", "triton", "hpacellseg"]
versions = []
for name in names:
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        versions.append(f"{name} -")
print("== python", sys.version.split()[0] + ";", ", ".join(versions))
EOF

# What the backend avoids, shown (not a check): triton loaded after TensorFlow.
if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('triton') is None)"; then
    status=$( ("$VENV/bin/python" -c "import tensorflow; import triton" >/dev/null 2>&1); echo $? ) 2>/dev/null
    say "for reference, a bare 'import tensorflow; import triton' exits with status $status here"
fi

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
say "pytest: tests/test_hpacellseg_real.py and the hpacellseg tests of tests/test_segmentation.py"
set +e
"$VENV/bin/python" -m pytest -v -rs -p no:cacheprovider \
    tests/test_hpacellseg_real.py tests/test_segmentation.py -k hpacellseg "$@" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
summary=$(tail -n 1 "$LOG")
say "finished in $(( $(date +%s) - START )) s: $summary"
[ "$status" -eq 0 ] || exit "$status"
if grep -q "skipped" <<<"$summary"; then
    echo "check_hpacellseg: a test was skipped: the real package was not exercised in full" >&2
    exit 1
fi
