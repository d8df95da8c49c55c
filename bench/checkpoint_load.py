"""Loading each half from an s3:// checkpoint written by `wurstfabrik mirror`, against loading it from a local folder,
and the checkpoint downloader's MB/s against boto3's own transfer manager, both from `rclone serve s3` on loopback.

    python bench/checkpoint_load.py                  # the tiny random checkpoint, 3 tries of each
    python bench/checkpoint_load.py --full           # the published sizes with random weights (float16, ~5 GB)

Each load runs in a fresh process that has imported torch (as a stage actor has): `PriorPipeline.from_pretrained` or
`DecoderPipeline.from_pretrained` of the local folder (the baseline); of the s3:// prefix with an empty node cache
(cold: fetch, verify, load); and again with the cache that left (warm: verify the cached files' sha256, load). The
downloader is `store.checkpoint_cache.fetch_files` into an empty cache (parallel ranged GETs, sha256 of every file,
rename); the baseline is boto3's `download_file` of the same objects (its transfer manager, 10 threads, no hashing).
Everything is on one machine: rclone serves files from the page cache, so this measures the client's own costs, not
a network.
"""

import sys
from pathlib import Path

# Run as `python bench/checkpoint_load.py`: the repository root replaces this folder on sys.path, so that this
# folder's modules import as `bench.*`.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time

import boto3

LOAD = """
import json, sys, time
import torch
from wurstfabrik.pipeline import DecoderPipeline, PriorPipeline
from wurstfabrik.store.checkpoint_index import read_index
from wurstfabrik.store.storage import open_output
from wurstfabrik.workers.s3_checkpoint import fetch_s3_checkpoint
half, source, cache, dtype = sys.argv[1], sys.argv[2], sys.argv[3], getattr(torch, sys.argv[4])
# An actor gets the files pinned by the driver, which read the index: that read is not the actor's.
pinned = read_index(open_output(source)).files if source.startswith("s3://") else None
started = time.perf_counter()
folder, fetch_s = source, 0.0
if pinned is not None:
    folder = fetch_s3_checkpoint(source, half, dtype != torch.float32, cache=cache, files=pinned)
    fetch_s = time.perf_counter() - started
if half == "prior":
    PriorPipeline.from_pretrained(folder, device="cpu", dtype=dtype, prior_text=folder)
else:
    DecoderPipeline.from_pretrained(folder, device="cpu", dtype=dtype)
print(json.dumps({"total_s": time.perf_counter() - started, "fetch_s": fetch_s}))
"""


def start_rclone(root: Path, work: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """`rclone serve s3` over `root` on loopback, and the environment that points boto3 at it."""
    binary = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    key, secret = "bench-access-key", "bench-secret-key-0123456789"
    log = work / "rclone.log"
    # No ETag: rclone computes the MD5 of the whole object for every GET's ETag, ranged or not (5.8 s per 16 MB
    # range of a 1 GB file here), which would measure rclone's hashing rather than a client.
    process = subprocess.Popen([binary, "serve", "s3", "--addr", "127.0.0.1:0", "--auth-key", f"{key},{secret}",
                                "--config", "", "--etag-hash", "", "--cache-dir", str(work / "rclone-cache"),
                                str(root)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not (found := re.search(r"Starting s3 server on \[(http://[^\]/]+)/?\]", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"rclone serve s3 did not start:\n{log.read_text()}")
        time.sleep(0.05)
    env = {"AWS_ENDPOINT_URL": found.group(1), "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_EC2_METADATA_DISABLED": "true"}
    return process, env


def one_load(half: str, source: str, cache: Path, dtype: str) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD, half, source, str(cache), dtype], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if done.returncode:
        raise SystemExit(f"loading {half} from {source} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def weights_of(files: dict) -> dict:
    return {key: entry for key, entry in files.items() if key.endswith(".safetensors")}


def download_rates(remotes: list, tries: int, work: Path) -> dict:
    """MB/s of fetch_files into an empty cache against boto3's download_file of the same objects, alternating."""
    from wurstfabrik.store.checkpoint_cache import fetch_files
    from wurstfabrik.store.checkpoint_index import read_index

    sets = [(remote, weights_of(read_index(remote).files)) for remote in remotes]
    total = sum(entry.size for _, files in sets for entry in files.values())
    client = boto3.session.Session().client("s3")
    ours, theirs = [], []
    for attempt in range(tries):
        cache = work / f"rate-cache-{attempt}"
        started = time.perf_counter()
        for remote, files in sets:
            fetch_files(remote, files, cache)
        ours.append(total / 1e6 / (time.perf_counter() - started))
        shutil.rmtree(cache)
        target = work / f"rate-boto3-{attempt}"
        target.mkdir()
        started = time.perf_counter()
        for remote, files in sets:
            for key in files:
                client.download_file(remote.bucket, f"{remote.prefix}/{key}", str(target / key.replace("/", "-")))
        theirs.append(total / 1e6 / (time.perf_counter() - started))
        shutil.rmtree(target)
    return {"bytes": total, "fetch_files_mb_s": statistics.median(ours), "boto3_download_file_mb_s":
            statistics.median(theirs), "tries": tries}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the published sizes with random weights")
    parser.add_argument("--dtype", default=None, help="float32 or float16 (default: float32 tiny, float16 --full)")
    parser.add_argument("--tries", type=int, default=None, help="tries of each load (default: 3 tiny, 2 --full)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder, kept (default: a temporary one); --full reuses the checkpoints in it")
    args = parser.parse_args()
    dtype = args.dtype or ("float16" if args.full else "float32")
    tries = args.tries or (2 if args.full else 3)
    work = args.work or Path(tempfile.mkdtemp(prefix="checkpoint-load-"))
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from wurstfabrik.jobs.mirror import mirror
    from wurstfabrik.pipeline.tiny import write_tiny_checkpoints
    from wurstfabrik.store.storage import open_output

    prior, decoder = write_tiny_checkpoints(work / "tiny")
    if args.full and (work / "full" / "decoder" / "vqgan").is_dir():
        prior, decoder = work / "full" / "prior", work / "full" / "decoder"  # written by an earlier run
    elif args.full:
        from bench.pipeline import write_full_checkpoints

        print("writing the published sizes with random weights ...", file=sys.stderr)
        shutil.rmtree(work / "full", ignore_errors=True)
        prior, decoder = write_full_checkpoints(prior, decoder, work / "full", torch.device("cpu"),
                                                getattr(torch, dtype))
    shutil.rmtree(work / "s3", ignore_errors=True)
    (work / "s3" / "bench").mkdir(parents=True)
    server, env = start_rclone(work / "s3", work)
    os.environ.update(env)
    try:
        results = {"machine": f"{platform.node()}: {platform.processor() or platform.machine()}, "
                              f"{os.cpu_count()} CPUs, torch {torch.__version__}",
                   "date": datetime.date.today().isoformat(), "checkpoint": "full (random)" if args.full else "tiny",
                   "dtype": dtype, "halves": {}}
        uris = {"prior": "s3://bench/prior", "decoder": "s3://bench/decoder"}
        for half, folder in (("prior", prior), ("decoder", decoder)):
            started = time.perf_counter()
            mirror(str(folder), uris[half])
            seconds = time.perf_counter() - started
            size = folder_bytes(folder)
            results["halves"][half] = {"bytes": size, "mirror_s": seconds, "mirror_mb_s": size / 1e6 / seconds}
        results["download"] = download_rates([open_output(uri) for uri in uris.values()], tries, work)
        for half, folder in (("prior", prior), ("decoder", decoder)):
            runs = {"local": [], "s3 cold": [], "s3 warm": []}
            for attempt in range(tries):
                cache = work / f"cache-{half}-{attempt}"
                runs["local"].append(one_load(half, str(folder), cache, dtype))
                runs["s3 cold"].append(one_load(half, uris[half], cache, dtype))
                runs["s3 warm"].append(one_load(half, uris[half], cache, dtype))
                shutil.rmtree(cache)
            local = statistics.median(r["total_s"] for r in runs["local"])
            for mode, timings in runs.items():
                total = statistics.median(r["total_s"] for r in timings)
                results["halves"][half][mode] = {"total_s": total, "fetch_s": statistics.median(
                    r["fetch_s"] for r in timings), "vs_local": total / local}
    finally:
        server.terminate()
        server.wait()
    print(json.dumps(results, indent=1))
    print(f"\n{results['machine']}, {results['date']}, {results['checkpoint']} checkpoint, {dtype}, median of "
          f"{tries}")
    print("| half | size | local folder | s3 cold (fetch) | s3 warm (verify) |\n|---|---|---|---|---|")
    for half, r in results["halves"].items():
        print(f"| {half} | {r['bytes'] / 1e6:.1f} MB | {r['local']['total_s']:.2f} s (1.00×) | "
              f"{r['s3 cold']['total_s']:.2f} s ({r['s3 cold']['vs_local']:.2f}×; fetch {r['s3 cold']['fetch_s']:.2f}"
              f" s) | {r['s3 warm']['total_s']:.2f} s ({r['s3 warm']['vs_local']:.2f}×; verify "
              f"{r['s3 warm']['fetch_s']:.2f} s) |")
    d = results["download"]
    print(f"\ndownloader: {d['fetch_files_mb_s']:.0f} MB/s (fetch_files, sha256 included) against "
          f"{d['boto3_download_file_mb_s']:.0f} MB/s (boto3 download_file) for {d['bytes'] / 1e6:.1f} MB of weights")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
