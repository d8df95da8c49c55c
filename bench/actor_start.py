"""What a stage actor pays to load its half before the first batch: CPU seconds of `PriorPipeline.from_pretrained`
and `DecoderPipeline.from_pretrained` in a fresh process that has already imported what every actor imports (Ray
Data, torch), against transformers' `CLIPTextModel.from_pretrained` of the same text encoder in the same setting
(the class our loader replaced), and which heavy modules each one imported.

    python bench/actor_start.py              # tiny random checkpoints, 5 fresh processes each
    python bench/actor_start.py --tries 9 --checkpoints DIR   # DIR/prior and DIR/decoder
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HEAVY = ("torch._dynamo", "transformers.models.clip.modeling_clip")
LOADS = {
    "prior (ours)": "from wurstfabrik.pipeline import PriorPipeline\n"
                    "PriorPipeline.from_pretrained(PRIOR, dtype=torch.float32)",
    "decoder (ours)": "from wurstfabrik.pipeline import DecoderPipeline\n"
                      "DecoderPipeline.from_pretrained(DECODER, dtype=torch.float32)",
    "prior text encoder (transformers)": "from transformers import CLIPTextModel\n"
                                         "CLIPTextModel.from_pretrained(PRIOR + '/text_encoder', dtype=torch.float32)",
}
PROCESS = """
import json, sys, time
import ray.data, torch
PRIOR, DECODER = sys.argv[1], sys.argv[2]
started, cpu = time.monotonic(), time.process_time()
{load}
print(json.dumps({{"cpu_s": time.process_time() - cpu, "wall_s": time.monotonic() - started,
                  "imported": [m for m in {heavy} if m in sys.modules]}}))
"""


def one_load(load: str, prior: Path, decoder: Path) -> dict:
    code = PROCESS.format(load=load, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code, str(prior), str(decoder)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--checkpoints", type=Path, help="a folder holding prior/ and decoder/ (default: tiny)")
    args = parser.parse_args()
    if args.checkpoints:
        prior, decoder = args.checkpoints / "prior", args.checkpoints / "decoder"
    else:
        from wurstfabrik.pipeline.tiny import write_tiny_checkpoints

        prior, decoder = write_tiny_checkpoints(Path(tempfile.mkdtemp(prefix="actor-start-")))
    results = {}
    for name, load in LOADS.items():
        runs = [one_load(load, prior, decoder) for _ in range(args.tries)]
        results[name] = {"cpu_s": statistics.median(r["cpu_s"] for r in runs),
                         "wall_s": statistics.median(r["wall_s"] for r in runs), "imported": runs[0]["imported"]}
    reference = results["prior text encoder (transformers)"]["cpu_s"]
    print(f"median of {args.tries} fresh processes each (after importing ray.data and torch):")
    for name, r in results.items():
        print(f"  {name:36s} {r['cpu_s']:5.2f} s CPU  {r['wall_s']:5.2f} s wall  "
              f"({r['cpu_s'] / reference:.2f}× transformers' text encoder alone)  imported: "
              f"{', '.join(r['imported']) or 'neither'}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
