"""``python train_tpu.py --help``: the training command line (``hpa_tf.cli.train``; installed as ``hpa-tf-train``)."""

from hpa_tf.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
