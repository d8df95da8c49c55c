"""The per-step denoiser of a stage as the sampling loop calls it: eager, or compiled with torch.compile(fullgraph=True)
on batches padded to a few sizes, and on CUDA replayed as one CUDA graph per padded batch and latent size.

How many graphs a job compiles: a denoiser batch of n rows (2n for a guided stage: conditional and unconditional)
runs at a padded batch (a bucket): the next of 1, 2, 4, 8, 16, then the next multiple of 16; each stage compiles
one graph per (bucket, latent size) it runs, and no more (dynamic=False; the noise ratio r is a tensor, not a Python
float that dynamo would guard on). A batch never compiles a bucket smaller than one already compiled at its latent
size: it pads up into the smallest compiled bucket that holds it (its extra rows cost a fraction of one batch, a
compile costs 40-80 s). The rule: a stage compiles at most one graph per image size (the bucket of the first, i.e.
the largest, batch that a job's full batches make), unless a smaller bucket pays for its own compile: once the rows
that batches of that bucket were padded by add up to CompileOptions.compile_smaller_after runs of the larger graph
(about what a cold compile costs), the next such batch compiles its own bucket. A job's tail batch, or a batch cut by
image size, thus never compiles. Batches that grow (a first batch smaller than later ones) compile each larger bucket
they need: at most len(buckets_up_to(n)) graphs per image size for batches of up to n rows.

CUDA graphs (on CUDA, CompileOptions.cuda_graphs) are captured only for buckets up to cuda_graph_max_batch rows: on
an H200 (docs/benchmarks.md) they made a batch of 1 image 29 % faster (Stage C 2 rows, Stage B 1 row), where the
host's launches take as long as the kernels, and a batch of 8 images 5 % slower (16 and 8 rows), where the GPU is
busy anyway and replaying saves nothing.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FIRST_BUCKETS = (1, 2, 4, 8, 16)
BUCKET_STEP = 16  # past the first buckets, batches pad to a multiple of this
# Graphs of one stage's step that dynamo keeps before it falls back to eager: buckets × image sizes (its default, 8,
# would be reached by a job with two image sizes).
RECOMPILE_LIMIT = 64
GRAPH_WARMUP_RUNS = 2  # runs on a side stream before a CUDA graph capture (lazy initialisations, autotuning)


def padded_batch(n: int) -> int:
    """The batch size a batch of n rows runs at in a compiled step."""
    if n < 1:
        raise ValueError(f"batch: {n} rows; at least 1 is needed")
    for size in FIRST_BUCKETS:
        if n <= size:
            return size
    return math.ceil(n / BUCKET_STEP) * BUCKET_STEP


def buckets_up_to(n: int) -> tuple[int, ...]:
    """The padded sizes that batches of 1 to n rows run at: the graphs a stage compiles per latent size."""
    return tuple(sorted({padded_batch(i) for i in range(1, n + 1)}))


@dataclass(frozen=True)
class CompileOptions:
    """How a pipeline's denoisers are compiled. `compile=True` means CompileOptions()."""

    backend: str = "inductor"  # any torch.compile backend; "eager" traces with dynamo only (fast, for checks)
    cuda_graphs: bool = True  # on CUDA: replay each (padded batch, latent size)'s step as one CUDA graph ...
    cuda_graph_max_batch: int | None = 4  # ... for padded batches of up to this many rows (None: every batch)
    # Padded rows, in runs of the larger graph, after which a smaller bucket compiles its own graph (a cold compile
    # of 77 s against 2.5 s for a batch of 8 at 1024² on an H200); 0: every batch compiles its own bucket.
    compile_smaller_after: float = 32.0
    channels_last: bool = True  # on CUDA: Stage B's and Stage A's weights in channels_last
    # Inductor flags of PyTorch's "Accelerating Generative AI III" recipe, off unless measured faster.
    max_autotune: bool = False
    conv_1x1_as_mm: bool = False
    coordinate_descent_tuning: bool = False
    epilogue_fusion: bool = True
    extra_inductor_options: dict = field(default_factory=dict)

    def compile_kwargs(self) -> dict:
        kwargs = dict(fullgraph=True, dynamic=False, backend=self.backend)
        if self.backend == "inductor":
            kwargs["options"] = {"max_autotune": self.max_autotune, "conv_1x1_as_mm": self.conv_1x1_as_mm,
                                 "coordinate_descent_tuning": self.coordinate_descent_tuning,
                                 "epilogue_fusion": self.epilogue_fusion,
                                 "triton.cudagraphs": False,  # CUDA graphs are ours (GraphedStep), not inductor's
                                 **self.extra_inductor_options}
        return kwargs


def compile_options(value) -> CompileOptions | None:
    """The options of a `compile` argument: True, False/None, or a CompileOptions."""
    if value is None or value is False:
        return None
    if value is True:
        return CompileOptions()
    if isinstance(value, CompileOptions):
        return value
    raise ValueError(f"compile: expected True, False or a CompileOptions, got {value!r}")


def use_channels_last(module: torch.nn.Module, options: CompileOptions | None) -> None:
    """Puts a convolutional stage's weights in channels_last where options ask for it, on CUDA only."""
    device = next(module.parameters()).device
    if options is not None and options.channels_last and device.type == "cuda":
        module.to(memory_format=torch.channels_last)


def _map(value, fn):
    """fn applied to every tensor of a condition: a tensor, a tuple or list of them, or a dict of those."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    return value


def _tensors(value) -> list[torch.Tensor]:
    found = []
    _map(value, found.append)
    return found


def pad_rows(value, batch: int):
    """Every tensor of `value` padded along dim 0 to `batch` rows with copies of its first row (real values, so
    that padded rows stay finite); rows are independent in every stage, so padding never changes the others.
    Always contiguous: a compiled step guards on strides, and an unpadded view would compile a second graph."""
    def pad(t: torch.Tensor) -> torch.Tensor:
        extra = batch - t.shape[0]
        return t.contiguous() if extra == 0 else torch.cat([t, t[:1].expand(extra, *t.shape[1:])])
    return _map(value, pad)


def _fill(destination, source) -> None:
    """Copies source's rows into the first rows of destination's tensors and its first row into the rest."""
    for dst, src in zip(_tensors(destination), _tensors(source), strict=True):
        n = src.shape[0]
        dst[:n].copy_(src)
        if n < dst.shape[0]:
            dst[n:].copy_(src[:1].expand(dst.shape[0] - n, *src.shape[1:]))


def _fill_rows(destination: torch.Tensor, source: torch.Tensor) -> None:
    """Copies source into destination's first rows and leaves the padded rows as they are: they hold real values from
    an earlier step (finite), and rows are independent, so no real row can tell."""
    destination[: source.shape[0]].copy_(source)


def condition_batch(cond) -> int:
    sizes = {t.shape[0] for t in _tensors(cond)}
    if len(sizes) != 1:
        raise ValueError(f"cond: its tensors have different batch sizes {sorted(sizes)}")
    return sizes.pop()


class GraphedStep:
    """One step function at one padded batch and latent shape, run on static buffers: on CUDA it is captured once
    as a CUDA graph and each call replays it. The condition is copied into the buffers once per sampling run
    (load_condition), the sample's and the ratios' real rows once per step. On other devices a call reruns the step on
    the same buffers, which is what a replay does: it keeps this bookkeeping testable without a GPU."""

    def __init__(self, step: Callable, x: torch.Tensor, r: torch.Tensor, cond, pool=None):
        self.step = step
        self.x = x.clone()
        self.r = r.clone()
        self.cond = _map(cond, torch.clone)
        self.graph = None
        self.out = None
        if self.x.device.type == "cuda":
            self._capture(pool)

    def _capture(self, pool) -> None:
        device = self.x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_RUNS):  # never compile or autotune during a capture
                self.step(self.x, self.r, self.cond)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = self.step(self.x, self.r, self.cond)

    def load_condition(self, cond) -> None:
        _fill(self.cond, cond)

    def __call__(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The step's output for the first len(x) rows. It lives in a static buffer that the next call overwrites."""
        _fill_rows(self.x, x)
        _fill_rows(self.r, r)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.out = self.step(self.x, self.r, self.cond)
        return self.out[: x.shape[0]]


class Denoiser:
    """A stage's denoise(x, r, cond) for the sampling loop. bind(cond) once per sampling run gives the loop's
    step(x, r) → noise prediction.

    Eager (options None): the model's denoise as it is, on the batch as it is. Compiled: torch.compile(fullgraph=True,
    dynamic=False) of denoise on the batch padded to its bucket (see the module's rule), the padded rows sliced off;
    on CUDA with options.cuda_graphs, each (bucket, latent shape) up to options.cuda_graph_max_batch rows is captured
    once as a CUDA graph (GraphedStep) and replayed. `cuda_graphs` and `cuda_graph_max_batch` can be switched on an
    existing Denoiser without compiling again."""

    def __init__(self, model: torch.nn.Module, options: CompileOptions | None = None):
        self.model = model
        self.options = options
        self.compiled = None
        self.graphs: dict[tuple, GraphedStep] = {}
        self.cuda_graphs = options is not None and options.cuda_graphs and self.device.type == "cuda"
        self.cuda_graph_max_batch = options.cuda_graph_max_batch if options is not None else None
        self.buckets: dict[tuple, set[int]] = {}  # latent shape → the buckets compiled at it
        self._saved: dict[tuple, float] = {}  # (latent shape, bucket) → rows its own graph would have saved, in runs
        self._pool = None
        if options is not None:
            config = torch._dynamo.config
            limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
            setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
            self.compiled = torch.compile(model.denoise, **options.compile_kwargs())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def bucket(self, n: int, shape: tuple) -> int:
        """The padded batch that n rows at a latent shape run at: their own bucket, or the smallest larger one already
        compiled at that shape until their own has paid for its compile (the module's rule)."""
        own = padded_batch(n)
        compiled = self.buckets.setdefault(tuple(shape), set())
        larger = [b for b in compiled if b > own]
        if own not in compiled and larger:
            host = min(larger)
            saved = self._saved[tuple(shape), own] = self._saved.get((tuple(shape), own), 0.0) + (host - own) / host
            if saved < self.options.compile_smaller_after:
                return host
        compiled.add(own)
        return own

    def captures(self, batch: int) -> bool:
        """Whether steps at this padded batch run as a CUDA graph."""
        return self.cuda_graphs and (self.cuda_graph_max_batch is None or batch <= self.cuda_graph_max_batch)

    def bind(self, cond) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        dtype = self.dtype
        if self.compiled is None:
            return lambda x, r: self.model.denoise(x.to(dtype), r, cond)
        n = condition_batch(cond)
        chosen: list[Callable] = []

        def step(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            if not chosen:  # the first step of the run picks its bucket: that needs the latent shape
                batch = self.bucket(n, x.shape[1:])
                chosen.append(self._graph(cond, x, r, batch) if self.captures(batch) else
                              self._padded(cond, n, batch))
            return chosen[0](x, r)
        return step

    def _padded(self, cond, n: int, batch: int) -> Callable:
        padded, dtype = pad_rows(cond, batch), self.dtype
        return lambda x, r: self.compiled(pad_rows(x, batch).to(dtype), pad_rows(r, batch), padded)[:n]

    def _step(self, x: torch.Tensor, r: torch.Tensor, cond) -> torch.Tensor:
        return self.compiled(x.to(self.dtype), r, cond).float()

    def _graph(self, cond, x: torch.Tensor, r: torch.Tensor, batch: int) -> GraphedStep:
        """The run's graph, found or captured, with the run's condition loaded (once per run)."""
        key = (batch, *x.shape[1:])
        graph = self.graphs.get(key)
        if graph is None:
            if self._pool is None and self.device.type == "cuda":
                self._pool = torch.cuda.graph_pool_handle()  # one memory pool for all of a stage's graphs
            graph = self.graphs[key] = GraphedStep(self._step, pad_rows(x, batch), pad_rows(r, batch),
                                                   pad_rows(cond, batch), self._pool)
        graph.load_condition(cond)
        return graph
