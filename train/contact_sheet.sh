#!/usr/bin/env bash
# The README's picture: the demo's 36 images, as `wurstfabrik preview` lays them out, in docs/demo-contact-sheet.png.
# Runs the demo exactly as README command 1 does, in a folder of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wurstfabrik demo --dir "$work" --no-progress
wurstfabrik preview "$work/output" --n 36 --to "$work/preview"
cp "$work/preview/contact-sheet.png" docs/demo-contact-sheet.png
echo "wrote docs/demo-contact-sheet.png"
