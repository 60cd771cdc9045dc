"""Pick the ``tf.distribute`` strategy (TPU, GPUs or CPU) and the matching mixed-precision policy.

Typical use in a training script::

    strategy = get_strategy(args.device, tpu=args.tpu)          # "auto" | "tpu" | "gpu" | "cpu"
    policy = set_mixed_precision(strategy, args.mixed_precision)  # before building the model
    batch = global_batch_size(args.batch_per_replica, strategy)
    with strategy.scope():
        model = hpa_tf.model.build_model(...)

On Kaggle's and Colab's TPU VMs the TPU is ``tpu="local"`` (the default when no TPU name is
given). TPU initialisation must happen before any other TensorFlow work in the process.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("auto", "tpu", "gpu", "cpu")
#: Environment variables that name or announce a TPU (Cloud TPU / Colab / TPU VM images).
TPU_ENV_VARS: tuple[str, ...] = ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE")
#: Device files of TPU chips on a TPU VM (v2-v4: /dev/accel*, v5e and later: /dev/vfio/<n>).
TPU_DEVICE_GLOBS: tuple[str, ...] = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
#: Errors TensorFlow raises when no TPU is reachable (OpError covers NotFound, Unavailable, ...).
_TPU_ERRORS = (ValueError, RuntimeError, OSError, tf.errors.OpError)


class AcceleratorNotFoundError(RuntimeError):
    """A TPU or GPU strategy was asked for and the accelerator is not there."""


def tpu_hint() -> str | None:
    """Why a TPU is plausibly present (an env var or a TPU device file), or ``None``.

    ``get_strategy("auto")`` only tries to connect to a TPU when this says so.
    """
    for var in TPU_ENV_VARS:
        if os.environ.get(var):
            return f"${var}={os.environ[var]}"
    for pattern in TPU_DEVICE_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return f"device files {found[:2]}"
    return None


def _tpu_address(tpu: str | None) -> str:
    if tpu:
        return tpu
    if os.environ.get("TPU_NAME"):
        return os.environ["TPU_NAME"]
    if os.environ.get("COLAB_TPU_ADDR"):  # legacy Colab TPU node
        return "grpc://" + os.environ["COLAB_TPU_ADDR"]
    return "local"  # TPU VM (Kaggle, Colab, Cloud TPU VM)


def connect_tpu(tpu: str | None = None) -> tf.distribute.TPUStrategy:
    """Connect to and initialise a TPU system; ``tpu`` is a name, ``grpc://`` address or ``"local"``.

    Raises
    ------
    AcceleratorNotFoundError
        No TPU at that address (the TensorFlow error is in the message, not chained).
    """
    address = _tpu_address(tpu)
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except _TPU_ERRORS as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise AcceleratorNotFoundError(
            f"no TPU at tpu={address!r}: {type(err).__name__}: {first_line[:300]}. "
            "On a TPU VM use tpu='local' (--tpu local); otherwise choose kind='gpu', 'cpu' or 'auto' (--strategy)."
        ) from None
    strategy = tf.distribute.TPUStrategy(resolver)
    logger.info("TPU strategy at %r: %d replicas", address, strategy.num_replicas_in_sync)
    return strategy


def enable_memory_growth() -> int:
    """Let TensorFlow grow GPU memory on demand (so PyTorch can share the GPU); returns the GPU count.

    Safe on CPU-only machines (returns 0). Must run before the GPUs are initialised; if they
    already are, a warning is logged and the setting is left as it was.
    """
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError) as err:
            logger.warning("cannot enable memory growth on %s: %s", gpu.name, err)
    return len(gpus)


def get_strategy(kind: str = "auto", tpu: str | None = None,
                 devices: Sequence[str] | None = None) -> tf.distribute.Strategy:
    """The distribution strategy for ``kind``.

    Parameters
    ----------
    kind
        ``"tpu"``: :func:`connect_tpu` (raises when absent). ``"gpu"``: ``MirroredStrategy`` over
        all GPUs (or ``devices``), memory growth on; raises without GPUs. ``"cpu"``: the default
        strategy (1 replica), or ``MirroredStrategy`` over the given logical CPU ``devices``
        (e.g. ``["/cpu:0", "/cpu:1"]``, for tests). ``"auto"``: TPU when :func:`tpu_hint` (or
        ``tpu``) suggests one and it connects, else GPUs when present, else CPU.
    tpu
        TPU name or address; ``None`` means ``$TPU_NAME`` or ``"local"``.
    devices
        Device names for the mirrored GPU/CPU strategies.

    Raises
    ------
    ValueError
        Unknown ``kind``.
    AcceleratorNotFoundError
        ``"tpu"``/``"gpu"`` asked for and not present.
    """
    kind = str(kind).lower()
    if kind not in KINDS:
        raise ValueError(f"unknown strategy kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "tpu":
        return connect_tpu(tpu)
    if kind == "auto":
        hint = f"tpu={tpu!r}" if tpu else tpu_hint()
        if hint:
            try:
                return connect_tpu(tpu)
            except AcceleratorNotFoundError as err:
                logger.warning("TPU suggested by %s but not usable (%s); trying GPU/CPU", hint, err)
        kind = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    if kind == "gpu":
        n_gpus = enable_memory_growth()
        if n_gpus == 0:
            raise AcceleratorNotFoundError("kind='gpu' but TensorFlow sees no GPU; use kind='cpu' or 'auto'")
        gpu_devices = list(devices) if devices else [d.name for d in tf.config.list_logical_devices("GPU")]
        strategy = mirrored_strategy(gpu_devices)
        logger.info("MirroredStrategy over %d GPU(s): %s", strategy.num_replicas_in_sync, gpu_devices)
        return strategy
    if devices:
        strategy = mirrored_strategy(devices)
        logger.info("MirroredStrategy over CPU devices %s", list(devices))
        return strategy
    logger.info("default strategy on CPU (1 replica)")
    return tf.distribute.get_strategy()


_MIRRORED: dict[tuple[str, ...], tf.distribute.MirroredStrategy] = {}


def mirrored_strategy(devices: Sequence[str]) -> tf.distribute.MirroredStrategy:
    """One ``MirroredStrategy`` per device set per process.

    Two MirroredStrategy objects over the same devices in one process hand out the same collective
    instance keys, and their all-reduces then collide ("Shape mismatch in the collective
    instance"); reusing the first one avoids that when a process trains more than once.
    """
    key = tuple(devices)
    if key not in _MIRRORED:
        _MIRRORED[key] = tf.distribute.MirroredStrategy(devices=list(key))
    return _MIRRORED[key]


def global_batch_size(per_replica: int, strategy: tf.distribute.Strategy) -> int:
    """Batch size to give ``tf.data`` (``per_replica`` x replicas); Keras splits it over replicas."""
    if per_replica < 1:
        raise ValueError(f"per-replica batch size must be >= 1, got {per_replica}")
    return int(per_replica) * int(strategy.num_replicas_in_sync)


def strategy_kind(strategy: tf.distribute.Strategy) -> str:
    """``"tpu"``, ``"gpu"`` or ``"cpu"``: where ``strategy`` runs its replicas."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    devices = describe(strategy)["devices"]
    if devices:
        return "gpu" if any("GPU" in d.upper() for d in devices) else "cpu"
    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"


def describe(strategy: tf.distribute.Strategy) -> dict[str, Any]:
    """``{"strategy": class name, "replicas": n, "devices": [...]}`` for logs and model.json."""
    try:
        devices = [str(d) for d in strategy.extended.worker_devices]
    except (RuntimeError, AttributeError, NotImplementedError):  # default strategy has none
        devices = []
    return {"strategy": type(strategy).__name__, "replicas": int(strategy.num_replicas_in_sync), "devices": devices}


#: ``--jit-compile`` choices.
JIT_CHOICES: tuple[str, ...] = ("auto", "on", "off")


def jit_compile_for(strategy: tf.distribute.Strategy, requested: str = "auto") -> bool | str:
    """Keras' ``compile(jit_compile=...)`` for ``requested`` (``"auto"``, ``"on"``, ``"off"``) under ``strategy``.

    * TPU: ``False`` whatever is asked: ``TPUStrategy`` compiles every replica's step with XLA
      itself, and Keras' own XLA wrapper around it is known to break TPU runs (keras-hub#443).
    * Several replicas of a ``MirroredStrategy``: ``False``; ``"on"`` raises, since Keras 3 would
      compile the step of all devices as one XLA cluster, which XLA refuses ("Trying to access
      resource ... located in device CPU:1 from device CPU:0", keras#19005).
    * One replica: ``True`` for ``"on"``, ``False`` for ``"off"``, and ``"auto"`` lets Keras decide
      (XLA on a GPU, not on a CPU).

    Raises
    ------
    ValueError
        An unknown value, or ``"on"`` with several mirrored replicas.
    """
    requested = str(requested).lower()
    if requested not in JIT_CHOICES:
        raise ValueError(f"jit_compile {requested!r} not understood; valid: {', '.join(JIT_CHOICES)}")
    kind = strategy_kind(strategy)
    if kind == "tpu":
        if requested == "on":
            logger.info("jit_compile on: TPUStrategy compiles with XLA itself; Keras' jit_compile stays off")
        return False
    replicas = int(strategy.num_replicas_in_sync)
    if replicas > 1:
        if requested == "on":
            raise ValueError(
                f"--jit-compile on does not work with MirroredStrategy over {replicas} devices (Keras 3 compiles "
                "the step of all devices as one XLA program, which XLA refuses); use --jit-compile auto or off"
            )
        return False
    return {"auto": "auto", "on": True, "off": False}[requested]


def check_steps_per_execution(strategy: tf.distribute.Strategy, steps: int) -> int:
    """``steps`` (>= 1) if Keras can run that many steps per call under ``strategy``.

    Raises
    ------
    ValueError
        ``steps`` < 1, or ``steps`` > 1 with a ``MirroredStrategy`` over several devices: Keras 3's
        multi-step loop fails there with "You must feed a value for placeholder tensor" (keras#19246;
        reproduced with a plain ``Dense`` model on two logical CPUs, Keras 3.15 / TF 2.21).
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"--steps-per-execution must be >= 1, got {steps}")
    replicas = int(strategy.num_replicas_in_sync)
    if steps > 1 and replicas > 1 and strategy_kind(strategy) != "tpu":
        raise ValueError(
            f"--steps-per-execution {steps} does not work with MirroredStrategy over {replicas} devices in Keras 3 "
            "(keras#19246); use --steps-per-execution 1 there (values > 1 are for TPUs and single devices)"
        )
    return steps


_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def set_mixed_precision(strategy_or_kind: tf.distribute.Strategy | str, requested: bool | str = "auto") -> str:
    """Set Keras' global dtype policy and return its name. Call before building the model.

    ``requested``: ``True``/``"auto"`` = bfloat16 on TPU, float16 on GPU, float32 on CPU (slow
    and no gain there); ``False``/``"float32"`` = float32; ``"mixed_float16"``/``"mixed_bfloat16"``
    = that policy anywhere. ``strategy_or_kind`` is a strategy or ``"tpu"``/``"gpu"``/``"cpu"``.
    """
    kind = strategy_or_kind if isinstance(strategy_or_kind, str) else strategy_kind(strategy_or_kind)
    kind = kind.lower()
    if kind not in ("tpu", "gpu", "cpu"):
        raise ValueError(f"unknown device kind {kind!r}; valid: tpu, gpu, cpu")
    if requested is True or requested == "auto":
        policy = {"tpu": "mixed_bfloat16", "gpu": "mixed_float16", "cpu": "float32"}[kind]
    elif requested is False or requested in ("float32", "none", "off", ""):
        policy = "float32"
    elif requested in _POLICIES:
        policy = requested
    else:
        raise ValueError(f"mixed precision {requested!r} not understood; use True/False, 'auto' or one of {_POLICIES}")
    keras.mixed_precision.set_global_policy(policy)
    logger.info("dtype policy %s on %s (requested %r)", policy, kind, requested)
    return policy
