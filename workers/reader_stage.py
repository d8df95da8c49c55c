"""The reader stage: a Ray Data task that turns one read unit (a slice of a Parquet row group) into image rows."""

from wurstfabrik.store.prompts import ReadUnit, unit_images


def read_unit(item: dict, spec, settings) -> list[dict]:
    return unit_images(spec, ReadUnit(**item), settings)
