"""A folder against a server: one ``gramstyle batch --parallel N`` against N separate
``gramstyle stylize --server`` calls (a shell loop), on the same in-process server.

    python bench/batch_vs_stylize.py --files 20 --size 256 --iterations 50 --parallel 2

The server runs VGG19 with random weights on the CPU with ``--workers`` workers; the files
are distinct crops of the shared content images (so that no content target is shared), one
style image. The target cache is cleared before each of the two ways, and both run the
``gramstyle`` console script as a user would (a new process per separate call). Prints the
wall time of each and their ratio, with the CPU and its load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model, load1

from gramstyle.engine import StyleTransfer
from gramstyle.images import load_image, resize_long_side
from gramstyle.server.config import ServeConfig
from gramstyle.server.serve import GramstyleServer

#: The shared images: $GRAMSTYLE_SHARED, else ../shared beside the checkout, else /work/shared.
SHARED = next(Path(p) / "images" for p in (os.environ.get("GRAMSTYLE_SHARED"),
                                           Path(__file__).resolve().parents[2] / "shared",
                                           "/work/shared")
              if p and (Path(p) / "images").is_dir())


def make_files(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` distinct content images, long side ``size``: shifted crops of the shared
    content images."""
    sources = sorted((SHARED / "content").iterdir())
    paths = []
    for i in range(count):
        image = resize_long_side(load_image(sources[i % len(sources)]), size + 16)
        shift = i // len(sources)
        image = image.crop((shift, shift, shift + image.width - 16, shift + image.height - 16))
        paths.append(folder / f"c{i:02d}.png")
        image.save(paths[-1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--style", default=str(SHARED / "style" / "starry_night.jpg"))
    args = parser.parse_args()
    exe = str(Path(sys.executable).with_name("gramstyle"))
    engine = StyleTransfer(arch="vgg19", weights="random", device="cpu")
    config = ServeConfig(host="127.0.0.1", port=0, workers=args.workers,
                         queue_size=max(args.parallel, 1))
    common = ["--style", args.style, "--size", str(args.size), "--iterations",
              str(args.iterations), "--tolerance", "0", "-q"]
    with tempfile.TemporaryDirectory() as tmp, GramstyleServer([engine], config) as server:
        folder = Path(tmp)
        (folder / "in").mkdir()
        (folder / "one").mkdir()
        files = make_files(folder / "in", args.files, args.size)
        target = ["--server", f"127.0.0.1:{server.port}"]
        print(f"{args.files} files at {args.size} px, {args.iterations} iterations, server "
              f"with {args.workers} workers; {cpu_model()}, load {load1():.1f}")

        engine.target_cache.clear()
        started = time.perf_counter()
        for path in files:
            subprocess.run([exe, "stylize", "--content", str(path), "-o",
                            str(folder / "one" / path.name), *common, *target], check=True)
        separate = time.perf_counter() - started
        print(f"{args.files} separate stylize calls: {separate:.1f} s")

        engine.target_cache.clear()
        started = time.perf_counter()
        subprocess.run([exe, "batch", str(folder / "in"), "-o", str(folder / "batch"),
                        "--parallel", str(args.parallel), *common, *target], check=True)
        batch = time.perf_counter() - started
        print(f"batch --parallel {args.parallel}: {batch:.1f} s ({separate / batch:.2f}x "
              f"faster); load {load1():.1f}")


if __name__ == "__main__":
    main()
