"""hpa-tf: Human Protein Atlas single-cell classification with TensorFlow.

Stages (each a module): io → segmentation → crops → records (TFRecords) → data → model /
train → predict → submission → metric. ``python -m hpa_tf demo`` runs them all on synthetic data.
"""

__version__ = "0.1.0"
