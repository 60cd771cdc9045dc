"""``python predict.py --help``: the offline predictor's command line (``hpa_tf.cli.predict``; installed as ``hpa-tf-predict``)."""

from hpa_tf.cli.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
