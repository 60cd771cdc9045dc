#!/usr/bin/env bash
# Checks the offline kit for real, as a Kaggle kernel would use it:
#   1. trains a small model on synthetic data (python -m hpa_tf demo --quick);
#   3. builds a kit of it (python -m hpa_tf kit: the project's wheel built from this checkout, the
#      runtime wheels downloaded for the kernel's Python and platform);
#   2. makes a fresh virtualenv standing in for a kernel image: its OWN TensorFlow, Keras and numpy
#      (not this machine's: default TensorFlow 2.18.1, Keras 3.8.0, numpy 2.0.2) and the other
#      packages an image has (scipy, scikit-image, OpenCV, matplotlib, scikit-learn), but not
#      hpa-tf, pycocotools, iterative-stratification or tqdm;
#   4. runs the kit's kernel.py in it with no network at all (a new network namespace, unshare -n)
#      and no pip configuration: it installs from the kit's wheels only, then predicts synthetic
#      16-bit test fields laid out as /kaggle/input/COMPETITION/{test,sample_submission.csv};
#   5. checks the submission (hpa_tf.submission.validate_submission against the sample's IDs and
#      sizes, then the competition metric against the synthetic truth), and that the kernel's
#      install left every package of the image as it was (pip list before and after: only
#      hpa-tf and the kit's runtime packages added).
#
#   scripts/check_kit.sh
#
# Environment (all optional):
#   HPA_TF_KIT_CHECK_DIR  working folder, kept after for inspection (default /tmp/hpa-tf-kit-check);
#                         the kernel virtualenv in it is reused by a later run
#   KERNEL_PACKAGES       the image's packages (default below)
#   PYTHON                an interpreter with hpa-tf's requirements (builds the model and the kit, checks
#                         the result; default python3)
# Exit status 0 only when every check passed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${HPA_TF_KIT_CHECK_DIR:-/tmp/hpa-tf-kit-check}
PYTHON=${PYTHON:-python3}
KERNEL_PACKAGES=${KERNEL_PACKAGES:-tensorflow==2.18.1 keras==3.8.0 numpy==2.0.2 scipy scikit-image opencv-python-headless matplotlib scikit-learn}
COMPETITION=hpa-single-cell-image-classification
VENV=$WORK/kernel-venv
START=$(date +%s)

say() { printf '== %s\n' "$*"; }
die() { printf 'check_kit: error: %s\n' "$*" >&2; exit 1; }
quiet_pip() { grep -v "is ignored: it is neither" || true; }

export PYTHONPATH="$ROOT" TF_CPP_MIN_LOG_LEVEL=3 CUDA_VISIBLE_DEVICES=""
mkdir -p "$WORK"

say "1. a small model: python -m hpa_tf demo --quick --out $WORK/demo"
"$PYTHON" -m hpa_tf demo --quick --out "$WORK/demo" > "$WORK/demo.log" 2>&1 || { tail -n 20 "$WORK/demo.log"; die "demo failed"; }
MODEL=$WORK/demo/train/best.keras
[ -f "$MODEL" ] || die "the demo wrote no $MODEL"

say "2. the kernel image: $VENV with $KERNEL_PACKAGES"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC2086  # a list of requirements
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $KERNEL_PACKAGES 2>&1 | quiet_pip
# a reused virtualenv: remove what an earlier run's kernel installed
(cd / && env -u PYTHONPATH "$VENV/bin/python" -m pip uninstall -q -y hpa-tf pycocotools iterative-stratification tqdm \
    >/dev/null 2>&1) || true
PYVER=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
for mod in hpa_tf pycocotools iterstrat tqdm; do
    if (cd / && env -u PYTHONPATH "$VENV/bin/python" -c "import $mod" 2>/dev/null); then
        die "the kernel virtualenv already has $mod: it would not test the kit"
    fi
done

say "3. the kit: python -m hpa_tf kit --out $WORK/kit --model $MODEL --python-version $PYVER"
"$PYTHON" -m hpa_tf kit --out "$WORK/kit" --model "$MODEL" --python-version "$PYVER" --dataset-id "someone/hpa-tf-kit-check" --force

DATA=$WORK/input/$COMPETITION
if [ ! -f "$DATA/sample_submission.csv" ]; then
    say "synthetic competition data (16-bit test fields): $DATA"
    "$PYTHON" -m hpa_tf.synthetic --out "$DATA" --train 0 --test 4 --size 512,640 --bit16-test --seed 11 >/dev/null
fi

freeze() { (cd / && env -u PYTHONPATH "$VENV/bin/python" -m pip list --format=freeze --disable-pip-version-check 2>/dev/null | sort); }
freeze > "$WORK/freeze-before.txt"
say "the image before: $(grep -iE '^(tensorflow|keras|numpy)==' "$WORK/freeze-before.txt" | tr '\n' ' ')"

say "4. kernel.py, offline (unshare -n: no network), from $WORK/kit"
rm -rf "$WORK/working" "$WORK/cache"
mkdir -p "$WORK/working"
NET=(unshare -n)
if ! unshare -n true 2>/dev/null; then
    NET=()
    say "   (unshare -n is not permitted here: the kernel runs with the network; --no-index still keeps pip off it)"
fi
set +e
(cd "$WORK/working" && env -u PYTHONPATH -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL \
    PIP_CONFIG_FILE=/dev/null "${NET[@]}" "$VENV/bin/python" "$WORK/kit/kernel.py" \
    --data-dir "$DATA" --out "$WORK/working/submission.csv" --cache-dir "$WORK/cache") 2>&1 \
    | tee "$WORK/kernel.log" | grep -v "^I0000\|^WARNING: All log\|oneDNN\|cuda"
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || die "kernel.py exited with status $status (log: $WORK/kernel.log)"

freeze > "$WORK/freeze-after.txt"
say "5. checks"
added=$(comm -13 "$WORK/freeze-before.txt" "$WORK/freeze-after.txt" | sed 's/==.*//' | tr '\n' ' ')
removed=$(comm -23 "$WORK/freeze-before.txt" "$WORK/freeze-after.txt" | tr '\n' ' ')
say "   the install added: $added"
[ -z "$removed" ] || die "the install changed or removed packages of the image: $removed"
for want in hpa-tf pycocotools iterative-stratification tqdm; do
    grep -qiE "^${want}==" "$WORK/freeze-after.txt" || die "$want was not installed from the kit"
done
extra=$(comm -13 "$WORK/freeze-before.txt" "$WORK/freeze-after.txt" | sed 's/==.*//' \
    | grep -viE '^(hpa-tf|pycocotools|iterative-stratification|tqdm)$' || true)
[ -z "$extra" ] || die "the install added packages that are not the kit's: $extra"
say "   the image after:  $(grep -iE '^(tensorflow|keras|numpy)==' "$WORK/freeze-after.txt" | tr '\n' ' ')(unchanged)"

"$PYTHON" - "$WORK/working/submission.csv" "$DATA" <<'EOF'
import sys
from hpa_tf.io import read_sample_submission
from hpa_tf.metric import main as metric_main
from hpa_tf.submission import read_submission, validate_submission

out, data = sys.argv[1], sys.argv[2]
expected = {r.image_id: (r.width, r.height) for r in read_sample_submission(f"{data}/sample_submission.csv")}
problems = validate_submission(out, expected_ids=expected)
if problems:
    sys.exit("check_kit: error: invalid submission: " + "; ".join(problems[:5]))
rows = read_submission(out)
cells = sum(len({p.mask for p in r.predictions}) for r in rows)
print(f"== submission valid: {len(rows)} rows, {cells} cells, {sum(len(r.predictions) for r in rows)} detections")
if cells == 0:
    sys.exit("check_kit: error: the submission has no cells")
sys.exit(metric_main(["--submission", out, "--truth", f"{data}/truth.csv", "--masks-dir", f"{data}/masks"]))
EOF
say "check_kit: passed in $(( $(date +%s) - START )) s"
