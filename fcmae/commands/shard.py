"""`fcmae shard SRC OUT`: write a data folder as WebDataset shards (fcmae/data/shards.py).

    fcmae shard /data/imagenet /data/imagenet-shards                  # shards of about 1 GB
    fcmae shard /data/scans /data/scan-shards --samples-per-shard 1000

`fcmae pretrain --data OUT` then reads them (or the same files copied to object storage).
"""
from typing import Optional

from jsonargparse import ArgumentParser

from fcmae.data.shards import write_shards
from fcmae.errors import SettingError

# The library's settings as this command's arguments and flags.
ARGUMENTS = {"src": "SRC", "out": "OUT", "max_size": "--max-size", "samples_per_shard": "--samples-per-shard"}


def build_parser():
    p = ArgumentParser(prog="fcmae shard", description=(
        "Write a folder that fcmae pretrain reads (DIR/train/<class>/<file>, DIR/<class>/<file> or any tree of "
        "files, read whole; images or .npy) as WebDataset shards OUT/shard-000000.tar, ... with each file's original bytes, its class "
        "index as .cls when there are class folders, and OUT/index.json. Rerunning after an interruption keeps "
        "the shards already written."))
    p.add_argument("src", type=str, help="the data folder")
    p.add_argument("out", type=str, help="the shard folder to write")
    p.add_argument("--max-size", type=str, default="1GB", help="bytes per shard at most (e.g. 1GB, 200MB)")
    p.add_argument("--samples-per-shard", type=Optional[int], default=None,
                   help="files per shard instead of --max-size")
    return p


def run(cfg):
    try:
        index = write_shards(cfg.src, cfg.out, cfg.max_size, cfg.samples_per_shard)
    except SettingError as e:
        raise e.worded(ARGUMENTS) from None
    print(f"wrote {index['samples']} samples in {len(index['shards'])} shards to {cfg.out}")
