"""Loading throughput: an ImageFolder of JPEG files against the same images as WebDataset shards.

Both sides decode and transform the same images the same way (the eval pipeline at 224:
resize the shorter side, centre crop, uint8 tensor; ``--loader fast`` by default) through a ``DataLoader`` with 1 and 2
workers and batches of 32. The folder is the demo dataset at ImageNet-like sizes (300-500 px,
JPEG quality 90), or ``--data``; its shards are written with ``imgrec shards``' defaults
(longer side at most 512 px, quality 90), so the images keep their size and nearly their bytes.

Each loader runs one untimed warm-up epoch (worker start, page cache), then ``--runs`` timed
epochs, interleaved across the four cases; the table shows median images/s and the ratio.
The files are in the page cache by then, so this measures the cost of reading many files
against reading a few tars on local storage; on network storage or a cold disk, where each
file costs a round trip, the gap is larger.

    python benchmarks/shards_vs_folder.py [--images 400] [--runs 3] [--data FOLDER]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from imgrec.config import DataConfig
from imgrec.data.folder import ImageFolderDataset
from imgrec.data.shard_writer import parse_size, write_shards
from imgrec.data.shards import ShardDataset
from imgrec.data.synth import SynthSpec, write_synth_dataset
from imgrec.data.transforms import eval_transform
from imgrec.inference.choice import cpu_name
from imgrec.utils import available_cpus


def epoch_images_per_s(loader: DataLoader) -> float:
    images = 0
    started = time.perf_counter()
    for inputs, _ in loader:
        images += inputs.shape[0]
    return images / (time.perf_counter() - started)


def make_loader(dataset, workers: int, batch_size: int) -> DataLoader:
    # Persistent workers: the timed epochs measure loading, not process start-up.
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=True, prefetch_factor=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="an ImageFolder to use instead of the generated one")
    parser.add_argument("--images", type=int, default=400, help="images in the generated folder")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loader", choices=["fast", "standard"], default="fast", help="the eval pipeline both sides use")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", default="4MB", help="small enough for several shards per worker")
    args = parser.parse_args()
    console = Console()
    torch.set_num_threads(1)  # the main process only collates; the workers do the work

    with tempfile.TemporaryDirectory(prefix="imgrec-shards-bench-") as tmp:
        folder = args.data
        if folder is None:
            classes = 10
            spec = SynthSpec(
                classes=classes, train_per_class=max(1, args.images // classes), val_per_class=1, min_side=300, max_side=500
            )
            started = time.perf_counter()
            folder = write_synth_dataset(Path(tmp, "data"), spec) / "train"
            console.print(
                f"wrote {spec.classes * spec.train_per_class} images of 300-500 px in {time.perf_counter() - started:.1f} s"
            )
        started = time.perf_counter()
        info = write_shards(folder, Path(tmp, "shards"), shard_size=parse_size(args.shard_size))
        console.print(
            f"wrote {info.samples} images to {len(info.shards)} shard(s), {info.bytes / 1e6:.1f} MB, "
            f"in {time.perf_counter() - started:.1f} s on {available_cpus()} core(s)"
        )

        transform = eval_transform(DataConfig(img_size=224), args.loader)
        datasets = {"folder": ImageFolderDataset(folder, transform), "shards": ShardDataset(info.out, transform)}
        cases = {(kind, w): make_loader(datasets[kind], w, args.batch_size) for w in args.workers for kind in datasets}
        for loader in cases.values():
            epoch_images_per_s(loader)
        rates: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
        for _ in range(args.runs):
            for case, loader in cases.items():
                rates[case].append(epoch_images_per_s(loader))

    console.print(
        f"{platform.node()}, {cpu_name()}, {available_cpus()} core(s), torch {torch.__version__}, "
        f"{datetime.date.today()}: {info.samples} images, {args.loader} eval pipeline at 224, batch {args.batch_size}, median of {args.runs} runs"
    )
    table = Table()
    for name in ("workers", "folder img/s", "shards img/s", "shards / folder"):
        table.add_column(name, justify="right")
    for w in args.workers:
        folder_rate, shard_rate = (statistics.median(rates[(kind, w)]) for kind in ("folder", "shards"))
        table.add_row(str(w), f"{folder_rate:.0f}", f"{shard_rate:.0f}", f"{shard_rate / folder_rate:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
