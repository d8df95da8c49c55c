"""How many images one CPU core encodes and stores per second, per image format and output format, at 1024², so
that a cluster can be given enough encoder and writer CPUs per GPU.

    python bench/writer.py [--size 1024] [--images 24]

The images are smooth gradients with noise, closer to a generated image's compressibility than pure noise (which
PNG cannot compress) or a flat colour (which it compresses to nothing). Everything runs in one process on one
core: the encoder stage (encode + sha256) and then the writer stage of each output format to a local folder.
"""


import argparse
import hashlib
import itertools
import os
import platform
import tempfile
import time

import numpy as np

from wurstfabrik.store.encoding import encode_image
from wurstfabrik.store.formats import Sample, open_format
from wurstfabrik.store.storage import open_output


def images(n: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        base = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), np.sin(4 * (x + y) + 0.5 * i)], axis=-1)
        pixels = (base * 0.5 + 0.5) * 220 + rng.normal(0, 8, (size, size, 3))
        out.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=24)
    args = parser.parse_args()
    pixels = images(args.images, args.size)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.images} images "
          f"of {args.size}², one core")
    print(f"{'format':8s} {'encode img/s/core':>18s} {'MB/image':>9s}   writer img/s/core: files  webdataset  parquet")
    for image_format in ("png", "jpeg", "webp"):
        start = time.perf_counter()
        encoded = [encode_image(p, image_format, 90) for p in pixels]
        digests = [hashlib.sha256(d).hexdigest() for d in encoded]
        encode_rate = len(pixels) / (time.perf_counter() - start)
        rates = []
        for output_format in ("files", "webdataset", "parquet"):
            with tempfile.TemporaryDirectory() as folder:
                output = open_output(folder)
                samples = [Sample({"prompt_id": f"p{i}", "image_index": 0, "prompt": "a sausage stand", "seed": i,
                                   "width": args.size, "height": args.size, "sha256": digests[i],
                                   "bytes": len(data)}, data, {"seed": i}) for i, data in enumerate(encoded)]
                claim = itertools.count().__next__
                start = time.perf_counter()
                open_format(output_format, image_format, len(samples)).write(output, samples, claim)
                rates.append(len(samples) / (time.perf_counter() - start))
        size_mb = sum(map(len, encoded)) / len(encoded) / 2**20
        print(f"{image_format:8s} {encode_rate:18.1f} {size_mb:9.2f}   {rates[0]:24.0f} {rates[1]:11.0f} "
              f"{rates[2]:8.0f}")


if __name__ == "__main__":
    main()
