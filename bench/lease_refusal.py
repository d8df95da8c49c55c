"""How fast a run on a held output is refused: wall and CPU seconds of `wurstfabrik run` exiting 3, while this
process holds the output's lease (a local folder).

    python bench/lease_refusal.py              # 5 tries
    python bench/lease_refusal.py --tries 20

The spec names checkpoints and prompts that do not exist: a refused run must not look at them.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def refused_run(spec: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one `wurstfabrik run` of `spec`; it must exit 3."""
    started = time.monotonic()
    driver = subprocess.Popen([sys.executable, "-m", "wurstfabrik.jobs.cli", "run", str(spec), "--no-progress"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(driver.pid, 0)
    driver.returncode = os.waitstatus_to_exitcode(status)
    if driver.returncode != 3:
        raise SystemExit(f"expected exit 3, got {driver.returncode}")
    return time.monotonic() - started, usage.ru_utime + usage.ru_stime


def main() -> None:
    from wurstfabrik.store.lease import Holder, Lease
    from wurstfabrik.store.storage import open_output

    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--tries", type=int, default=5)
    tries = args.parse_args().tries
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder, "out")
        output = open_output(str(out))
        output.check_writable()
        Lease(output, Holder.for_this_process("bench-holder", None)).acquire()
        spec = Path(folder, "job.yaml")
        spec.write_text(json.dumps({"prompts": f"{folder}/none.parquet", "output": str(out),
                                    "prior": f"{folder}/no-prior", "decoder": f"{folder}/no-decoder"}))
        runs = [refused_run(spec) for _ in range(tries)]
    walls, cpus = [w for w, _ in runs], [c for _, c in runs]
    print(json.dumps({"tries": tries, "wall_s_median": round(statistics.median(walls), 2),
                      "wall_s_max": round(max(walls), 2), "cpu_s_median": round(statistics.median(cpus), 2),
                      "cpu_s_max": round(max(cpus), 2), "cpus": os.cpu_count(),
                      "load_average_1m": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
