"""Class-incremental data: benchmark registry, sources, task streams, input pipeline.

from trm_jax import data
cfg = data.default_config()            # 5-task Fashion-MNIST from IDX files
stream = data.load_stream(cfg)
x, y = stream.split("train", 0)        # uint8 [N, 28, 28, 1], int32 new ids of task 0
pre = data.pipeline.make_preprocess(224, 3, "clip")
for batch in data.pipeline.batches(x, y, 128, shuffle=True, seed=0, epoch=0):
    images = pre(batch["image"], key, train=True)   # inside the jitted step
"""

from trm_jax.data import pipeline
from trm_jax.data.local import RawData
from trm_jax.data.tasks import (
    BENCHMARKS,
    SOURCES,
    SPLITS,
    Benchmark,
    TaskStream,
    UnknownNameError,
    carve,
    class_order,
    default_config,
    get_benchmark,
    load_stream,
    task_partition,
)

__all__ = [
    "BENCHMARKS",
    "SOURCES",
    "SPLITS",
    "Benchmark",
    "RawData",
    "TaskStream",
    "UnknownNameError",
    "carve",
    "class_order",
    "default_config",
    "get_benchmark",
    "load_stream",
    "pipeline",
    "task_partition",
]
