#!/usr/bin/env bash
# Runs the test suite (or a pytest selection) against the OLDEST and the NEWEST TensorFlow / Keras /
# numpy that pyproject.toml claims, each in its own virtualenv, so the claimed range is a tested one.
#
#   scripts/test_versions.sh [pytest arguments]          e.g. tests/test_model.py tests/test_train.py
#
# Environment (all optional):
#   HPA_TF_VERSIONS_DIR  where the virtualenvs live, made when missing and reused after
#                        (default: /tmp/hpa-tf-versions; one folder per set: oldest/, newest/)
#   HPA_TF_VERSION_SETS  which sets to run, in order (default: "oldest newest")
#   HPA_TF_OLDEST_PINS   the oldest set's TensorFlow, Keras and numpy pins (default below)
#   PYTHON               the interpreter the virtualenvs are made from (default: python3)
#
# The sets:
#   oldest  the floor of pyproject.toml: TensorFlow 2.16.2 (the last 2.16.x), Keras 3.3.3 and numpy
#           1.26.4 (TensorFlow 2.16 requires numpy < 2); hpa-tf's other requirements resolved by pip
#           next to those pins (HPA_TF_OLDEST_PINS replaces the three pins). Keras 3.0.5 fails the
#           MirroredStrategy training test (a learning-rate schedule under tf.distribute: Keras
#           issue 19504), hence keras>=3.3 in pyproject.toml
#   newest  requirements.txt, exactly (what CI installs)
#
# The virtualenvs are made WITHOUT --system-site-packages: nothing of the interpreter's own
# packages leaks in. The checkout is put on PYTHONPATH (not installed), so the tests run the
# working tree. Prints each set's versions and pytest's closing line; exit status 0 only when every
# set passed (a set whose install fails counts as failed).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${HPA_TF_VERSIONS_DIR:-/tmp/hpa-tf-versions}
SETS=${HPA_TF_VERSION_SETS:-oldest newest}
PYTHON=${PYTHON:-python3}
PIP_FLAGS=(--quiet --disable-pip-version-check)

# shellcheck disable=SC2206  # a list of requirements
OLDEST=(
    ${HPA_TF_OLDEST_PINS:-tensorflow==2.16.2 keras==3.3.3 numpy==1.26.4}
    scipy opencv-python-headless scikit-image pycocotools tqdm "urllib3>=2,<3" matplotlib
    iterative-stratification scikit-learn pytest
)

say() { printf '== %s\n' "$*"; }

install_set() {  # $1 = set name, $2 = venv
    case "$1" in
        oldest) "$2/bin/python" -m pip install "${PIP_FLAGS[@]}" "${OLDEST[@]}" ;;
        newest) "$2/bin/python" -m pip install "${PIP_FLAGS[@]}" -r "$ROOT/requirements.txt" ;;
        *) printf 'test_versions: error: unknown set %s (oldest, newest)\n' "$1" >&2; return 2 ;;
    esac
}

versions() {  # $1 = venv
    "$1/bin/python" - <<'EOF'
import importlib.metadata as md
import sys
names = ["tensorflow", "keras", "numpy", "scipy", "scikit-image", "opencv-python-headless", "pycocotools",
         "scikit-learn", "ml-dtypes"]
out = []
for name in names:
    try:
        out.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        out.append(f"{name} -")
print("python", sys.version.split()[0] + ";", ", ".join(out))
EOF
}

short_versions() {  # $1 = venv: "TF x / Keras y / numpy z"
    "$1/bin/python" -c 'import importlib.metadata as m; print(" / ".join(f"{n} {m.version(n)}" for n in ("tensorflow", "keras", "numpy")))' 2>/dev/null || echo "versions unknown"
}

declare -A RESULT
status=0
for set in $SETS; do
    venv=$DIR/$set
    start=$(date +%s)
    if [ ! -x "$venv/bin/python" ]; then
        say "$set: making $venv"
        mkdir -p "$DIR" && "$PYTHON" -m venv "$venv" || { RESULT[$set]="venv failed"; status=1; continue; }
    fi
    say "$set: installing"
    if ! install_set "$set" "$venv"; then
        RESULT[$set]="install failed"; status=1; continue
    fi
    say "$set: $(versions "$venv")"
    log=$(mktemp)
    say "$set: pytest ${*:-(whole suite)}"
    (cd "$ROOT" && PYTHONPATH="$ROOT" TF_CPP_MIN_LOG_LEVEL=3 "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@") \
        2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    RESULT[$set]="$(tail -n 1 "$log") [$(( $(date +%s) - start )) s; $(short_versions "$venv")]"
    rm -f "$log"
    [ "$rc" -eq 0 ] || status=1
done

say "summary"
for set in $SETS; do
    printf '  %-7s %s\n' "$set" "${RESULT[$set]:-not run}"
done
exit $status
