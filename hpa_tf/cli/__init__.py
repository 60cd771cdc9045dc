"""Command lines of the package: ``hpa_tf.cli.train`` (``hpa-tf-train``, ``train_tpu.py``) and
``hpa_tf.cli.predict`` (``hpa-tf-predict``, ``predict.py``). Each has ``main(argv) -> exit status``;
their flags are derived from the settings tables in ``hpa_tf.config``."""
