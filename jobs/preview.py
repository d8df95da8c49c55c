"""`wurstfabrik preview`: a look at a sample of an output before training on it. Writes `preview/contact-sheet.png`
(a grid of thumbnails, each with its prompt and seed) and `preview/index.html` (thumbnails, prompts, seeds and
sizes, each linked to the full image, copied beside the page so the links resolve on disk and on S3 alike)."""

from __future__ import annotations

import html
import io
import math
import random
import textwrap

from PIL import Image, ImageDraw, ImageFont

from wurstfabrik.store.encoding import extension
from wurstfabrik.store.formats import open_format
from wurstfabrik.store.ids import sample_key
from wurstfabrik.store.manifest import read_job_params, read_manifest
from wurstfabrik.store.storage import open_output

PREVIEW_PREFIX = "preview/"
THUMB = 256
CAPTION_LINES = 3
CAPTION_CHARS = 40
LINE_HEIGHT = 12
BACKGROUND = (255, 255, 255)
ROW_COLUMNS = ["job_id", "prompt_id", "image_index", "prompt", "seed", "width", "height", "uri", "member", "offset",
               "bytes", "sha256", "status", "finished_at"]


class NothingToPreview(Exception):
    """The output holds no finished image to show."""


def write_preview(output_uri: str, n: int = 64, to: str | None = None, seed: int = 0) -> tuple[str, str, int]:
    """Writes the contact sheet and the page under `to` (default: the output's preview/ folder); returns their
    URIs and the number of images shown."""
    output = open_output(output_uri)
    recorded = read_job_params(output)
    if recorded is None:
        raise NothingToPreview(f"{output_uri} holds no wurstfabrik job (no job.json)")
    spec = recorded.get("spec", {})
    fmt = open_format(spec.get("output_format", "files"), spec.get("format", "png"), spec.get("shard_size", 256))
    ok = read_manifest(output, ROW_COLUMNS, recorded.get("job_id"), "ok")
    if ok.num_rows == 0:
        raise NothingToPreview(f"{output_uri} holds no finished image yet")
    picked = sorted(random.Random(seed).sample(range(ok.num_rows), min(n, ok.num_rows)))
    # An image recorded twice (a retried write) is shown once.
    rows = list({(r["prompt_id"], r["image_index"]): r for r in ok.take(picked).to_pylist()}.values())
    target = open_output(to) if to else output
    prefix = "" if to else PREVIEW_PREFIX
    ext = extension(spec.get("format", "png"))
    images = []
    for number, row in enumerate(rows):
        data = fmt.read_image(output, row)
        name = f"{number:03d}-{sample_key(row['prompt_id'], row['image_index'])}"
        target.put(f"{prefix}images/{name}.{ext}", data)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        thumb = image.copy()
        thumb.thumbnail((THUMB, THUMB))
        buffer = io.BytesIO()
        thumb.save(buffer, format="JPEG", quality=85)
        target.put(f"{prefix}thumbs/{name}.jpg", buffer.getvalue(), "image/jpeg")
        images.append((row, thumb, f"images/{name}.{ext}", f"thumbs/{name}.jpg"))
    sheet = io.BytesIO()
    contact_sheet([(thumb, row) for row, thumb, _, _ in images]).save(sheet, format="PNG")
    sheet_uri = target.put(f"{prefix}contact-sheet.png", sheet.getvalue(), "image/png")
    page_uri = target.put(f"{prefix}index.html", _page(output_uri, images).encode(), "text/html")
    return sheet_uri, page_uri, len(images)


def grid(n: int) -> tuple[int, int]:
    """Columns and rows of the contact sheet for n cells."""
    columns = max(1, math.ceil(math.sqrt(n)))
    return columns, max(1, math.ceil(n / columns))


def contact_sheet(cells: list[tuple[Image.Image, dict]]) -> Image.Image:
    """Thumbnails on a grid, each cell a THUMB square with the prompt and seed written under it."""
    columns, rows = grid(len(cells))
    cell_height = THUMB + CAPTION_LINES * LINE_HEIGHT + 4
    sheet = Image.new("RGB", (columns * THUMB, rows * cell_height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (thumb, row) in enumerate(cells):
        x, y = (i % columns) * THUMB, (i // columns) * cell_height
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        caption = textwrap.wrap(row["prompt"], CAPTION_CHARS)[: CAPTION_LINES - 1] + [f"seed {row['seed']}"]
        for line_number, line in enumerate(caption):
            draw.text((x + 4, y + THUMB + 2 + line_number * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    return sheet


def _page(output_uri: str, images: list) -> str:
    items = []
    for row, _, full, thumb in images:
        items.append(
            f'<figure><a href="{html.escape(full)}"><img src="{html.escape(thumb)}" loading="lazy" '
            f'alt="{html.escape(row["prompt"])}"></a><figcaption>{html.escape(row["prompt"])}<br>'
            f'<small>seed {row["seed"]} · {row["width"]}×{row["height"]} · {html.escape(row["prompt_id"])} '
            f'#{row["image_index"]}</small></figcaption></figure>')
    return ("<!doctype html><meta charset=utf-8><title>wurstfabrik preview</title>"
            "<style>body{font-family:sans-serif;display:flex;flex-wrap:wrap;gap:8px}figure{width:260px;margin:0}"
            "img{width:256px;height:256px;object-fit:contain;background:#eee}</style>"
            f"<h1 style='width:100%'>{html.escape(output_uri)}: {len(images)} images</h1>" + "".join(items))
