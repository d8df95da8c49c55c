"""The reader stage: a Ray Data task that turns one read unit (a slice of a Parquet row group) into image rows."""

from wurstfabrik.store.prompts import ReadUnit, unit_images

from .metrics import MetricLabels, count_store_requests


def read_unit(item: dict, spec, settings, labels: MetricLabels | None = None) -> list[dict]:
    if labels is not None:
        count_store_requests(labels)
    return unit_images(spec, ReadUnit(**item), settings)
