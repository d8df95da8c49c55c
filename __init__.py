"""wurstfabrik: batch image generation with Würstchen v2 on Ray.

The one import root of the distribution. Its packages are the repository's top-level folders: `wurstfabrik.pipeline`
(the model, no Ray), `wurstfabrik.store` (outputs, manifest, formats), `wurstfabrik.workers` (the Ray Data stages)
and `wurstfabrik.jobs` (the driver and the CLI); and `wurstfabrik.generate`, the stages as a Ray Data transform
(jobs.generate). Importing this module imports neither torch nor Ray; `generate` imports them when first used.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wurstfabrik")
except PackageNotFoundError:  # a checkout used without installing it
    __version__ = "0+unknown"

__all__ = ["__version__", "generate"]


def __getattr__(name: str):
    if name == "generate":
        from wurstfabrik.jobs.generate import generate

        return generate
    raise AttributeError(f"module 'wurstfabrik' has no attribute {name!r}")
