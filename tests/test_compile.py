"""The compiled engine on CPU: whole graphs (fullgraph=True), padded batches that compile a bounded number of graphs,
the same results as eager, the static buffers that CUDA graphs replay on, the non-finite guard and the compile cache.

Stage C compiles with inductor. Stage B compiles with the aot_eager backend: graph breaks are dynamo's and guards
are dynamo's, so it proves the same things there, while inductor's C++ build of Stage B's ~35 kernels takes minutes
on two cores."""

import shutil

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from wurstfabrik.pipeline import DecoderPipeline, PriorPipeline
from wurstfabrik.pipeline.compile_cache import CompileCache
from wurstfabrik.pipeline.compiled import (
    CompileOptions,
    Denoiser,
    buckets_up_to,
    compile_options,
    condition_batch,
    pad_rows,
    padded_batch,
    use_channels_last,
)

torch.set_num_threads(1)

PROMPTS = ["a cat", "sausages on a grill", "", "portrait of an astronaut", "a lighthouse at night"]
AOT_EAGER = CompileOptions(backend="aot_eager")


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_padded_batches():
    assert [padded_batch(n) for n in range(1, 18)] == [1, 2, 4, 4, 8, 8, 8, 8] + [16] * 8 + [32]
    assert [padded_batch(n) for n in (32, 33, 48, 49, 100)] == [32, 48, 48, 64, 112]
    assert buckets_up_to(8) == (1, 2, 4, 8)
    assert buckets_up_to(16) == (1, 2, 4, 8, 16)
    assert buckets_up_to(40) == (1, 2, 4, 8, 16, 32, 48)
    with pytest.raises(ValueError, match="^batch"):
        padded_batch(0)


def test_pad_rows_copies_the_first_row_into_contiguous_tensors():
    key_value = torch.randn(3, 5, 8).chunk(2, dim=-1)  # views with the strides of a fused projection's output
    cond = {"block": key_value, "effnet": torch.randn(3, 2, 4, 4)}
    padded = pad_rows(cond, 4)
    assert condition_batch(padded) == 4
    for before, after in ((key_value[0], padded["block"][0]), (cond["effnet"], padded["effnet"])):
        assert after.is_contiguous() and torch.equal(after[:3], before) and torch.equal(after[3], before[0])
    assert pad_rows(key_value[1], 3).is_contiguous()  # unpadded too: a compiled step guards on strides
    with pytest.raises(ValueError, match="^cond"):
        condition_batch({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)})


def test_compile_argument():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == CompileOptions()
    assert compile_options(AOT_EAGER) is AOT_EAGER
    with pytest.raises(ValueError, match="^compile"):
        compile_options("yes")
    assert CompileOptions().compile_kwargs()["options"]["triton.cudagraphs"] is False
    assert "options" not in AOT_EAGER.compile_kwargs()


@pytest.fixture(scope="module")
def prior_pair(tiny_checkpoints):
    """The tiny prior eager and compiled with inductor."""
    eager = PriorPipeline.from_pretrained(tiny_checkpoints[0], device="cpu", dtype=torch.float32)
    compiled = PriorPipeline.from_pretrained(tiny_checkpoints[0], device="cpu", dtype=torch.float32, compile=True)
    assert compiled.denoiser.options == CompileOptions() and not compiled.denoiser.cuda_graphs  # none on CPU
    return eager, compiled


def latent_diff(a: torch.Tensor, b: torch.Tensor, prior: PriorPipeline) -> float:
    return ((a - b) / prior.latent_mean).abs().max().item()  # where the sampler works, before the rescaling


# A whole run: the tiny checkpoint's random Stage C divides by |1 - b| close to 0, so sampling amplifies each step's
# rounding (test_pipeline redraws its weights for that reason); one step is compared at 1e-5.
RUN_TOLERANCE = 1e-3


def test_stage_c_compiles_to_one_inductor_graph_equal_to_eager(prior_pair):
    eager, compiled = prior_pair
    before = graphs()
    # Three guided images are a denoiser batch of 6, padded to 8; fullgraph=True fails on any graph break.
    result = compiled(PROMPTS[:3], [1, 2, 3], height=128, width=128, steps=4)
    assert graphs() == before + 1
    expected = eager(PROMPTS[:3], [1, 2, 3], height=128, width=128, steps=4)
    assert latent_diff(result.latents, expected.latents, eager) <= RUN_TOLERANCE

    # One step on the same graph, against the same model run eagerly: inductor's own rounding only.
    with torch.no_grad():
        cond = compiled.prior.condition(compiled.text.encode(PROMPTS[:3] * 2).hidden_states)
        x, r = torch.randn(6, 16, 3, 3), torch.rand(6)
        step = compiled.denoiser.bind(cond)(x, r)
        assert torch.allclose(step, compiled.prior.denoise(x, r, cond), rtol=1e-5, atol=1e-5)
    assert graphs() == before + 1


def test_another_batch_in_the_bucket_does_not_recompile(prior_pair):
    eager, compiled = prior_pair
    compiled(PROMPTS[:3], [1, 2, 3], height=128, width=128, steps=2)  # compiled already, by the test above if run
    before = graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        result = compiled(PROMPTS[1:5], [4, 5, 6, 7], height=128, width=128, steps=2)  # 8 rows: the same graph
    assert graphs() == before
    expected = eager(PROMPTS[1:5], [4, 5, 6, 7], height=128, width=128, steps=2)
    assert latent_diff(result.latents, expected.latents, eager) <= RUN_TOLERANCE


@pytest.fixture(scope="module")
def decoder_pair(tiny_checkpoints):
    eager = DecoderPipeline.from_pretrained(tiny_checkpoints[1], device="cpu", dtype=torch.float32)
    compiled = DecoderPipeline.from_pretrained(tiny_checkpoints[1], device="cpu", dtype=torch.float32,
                                               compile=AOT_EAGER)
    return eager, compiled


def stage_c_latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 16, 3, 3, generator=torch.Generator().manual_seed(seed))


def level_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_stage_b_compiles_one_graph_per_bucket(decoder_pair):
    eager, compiled = decoder_pair
    before = graphs()
    for n in (1, 2, 3, 4, 3):  # padded to 1, 2, 4, 4, 4
        images = compiled.decode(stage_c_latents(n, n), PROMPTS[:n], list(range(n)), steps=3)
        assert level_diff(images, eager.decode(stage_c_latents(n, n), PROMPTS[:n], list(range(n)), steps=3)) <= 1
    assert graphs() == before + len(buckets_up_to(4)) == before + 3
    with torch._dynamo.config.patch(error_on_recompile=True):  # guided: 2 × 2 rows, the bucket of 4 again
        compiled.decode(stage_c_latents(2), PROMPTS[:2], [1, 2], steps=3, guidance_scale=2.0)


def test_graphed_steps_load_each_runs_condition(decoder_pair):
    """What a CUDA graph replays on: static buffers, filled with the condition once per run and the sample at
    each step. On the CPU a 'replay' reruns the step on those buffers, so a stale condition would show here."""
    eager, _ = decoder_pair
    graphed = DecoderPipeline(eager.decoder, eager.vqgan, eager.text, eager.latent_dim_scale).compile(AOT_EAGER)
    graphed.denoiser.cuda_graphs = True
    # The same static buffers each time (3 and 4 rows pad to 4); the runs of 3 leave the padded row as it was.
    for n, seed in ((4, 3), (3, 1), (3, 2)):
        prompts = [f"run {seed} prompt {i}" for i in range(n)]
        images = graphed.decode(stage_c_latents(n, seed), prompts, [seed] * n, steps=3)
        assert level_diff(images, eager.decode(stage_c_latents(n, seed), prompts, [seed] * n, steps=3)) <= 1
    assert list(graphed.denoiser.graphs) == [(4, 4, 32, 32)]


def latents_of(n: int, side: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 16, *side, generator=torch.Generator().manual_seed(seed))


# Latent sizes no other test compiles at: dynamo shares its graphs between the denoisers of one model.
TALL, WIDE, LARGE = (6, 3), (3, 6), (6, 6)


def test_a_tail_batch_pads_into_the_compiled_graph_instead_of_compiling(decoder_pair):
    """After a batch of 4 compiled the bucket of 4 at a latent size, tail batches of 1 to 3 images run padded in
    that graph (their images as eager's) and compile nothing; another latent size compiles its own."""
    eager, _ = decoder_pair
    tail = DecoderPipeline(eager.decoder, eager.vqgan, eager.text, eager.latent_dim_scale).compile(AOT_EAGER)
    before = graphs()
    tail.decode(latents_of(4, TALL), PROMPTS[:4], [0, 1, 2, 3], steps=2)
    assert graphs() == before + 1 and tail.denoiser.buckets == {(4, 64, 32): {4}}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (1, 2, 3):
            images = tail.decode(latents_of(n, TALL, n), PROMPTS[:n], list(range(n)), steps=2)
            assert level_diff(images, eager.decode(latents_of(n, TALL, n), PROMPTS[:n], list(range(n)), steps=2)) <= 1
    assert graphs() == before + 1 and tail.denoiser.buckets == {(4, 64, 32): {4}}
    tail.decode(latents_of(1, WIDE), PROMPTS[:1], [5], steps=2)
    assert graphs() == before + 2 and tail.denoiser.buckets[(4, 32, 64)] == {1}


def test_a_smaller_bucket_compiles_once_it_pays_for_itself(decoder_pair):
    """Batches of 1 padded into the graph of 4 each save 3/4 of a run of it with their own; with
    compile_smaller_after=2 the third such batch (0.75, 1.5, then 2.25 runs) compiles the bucket of 1, and later
    batches of 1 run there. With 0, every batch compiles its own bucket (the benchmarks' setting)."""
    eager, _ = decoder_pair
    options = CompileOptions(backend="aot_eager", compile_smaller_after=2)
    paying = DecoderPipeline(eager.decoder, eager.vqgan, eager.text, eager.latent_dim_scale).compile(options)
    before = graphs()
    paying.decode(latents_of(4, LARGE), PROMPTS[:4], [0, 1, 2, 3], steps=2)
    counts = []
    for seed in range(4):
        paying.decode(latents_of(1, LARGE, seed), PROMPTS[:1], [seed], steps=2)
        counts.append(graphs() - before)
    assert counts == [1, 1, 2, 2] and paying.denoiser.buckets == {(4, 64, 64): {1, 4}}
    assert paying.denoiser.bucket(2, (4, 64, 64)) == 4  # the bucket of 2 has saved too little yet

    own = Denoiser(eager.decoder, CompileOptions(backend="aot_eager", compile_smaller_after=0))
    assert [own.bucket(n, (4, 32, 32)) for n in (8, 3, 1, 5)] == [8, 4, 1, 8]
    assert own.buckets == {(4, 32, 32): {1, 4, 8}}


def test_cuda_graphs_only_up_to_their_batch_limit(decoder_pair):
    """The graph policy decides per bucket: CompileOptions.cuda_graph_max_batch (4 by default, from the H200's
    measurements) and None for every bucket. On the CPU cuda_graphs is forced on to exercise the bookkeeping."""
    eager, _ = decoder_pair
    assert CompileOptions().cuda_graph_max_batch == 4
    graphed = DecoderPipeline(eager.decoder, eager.vqgan, eager.text, eager.latent_dim_scale).compile(
        CompileOptions(backend="aot_eager", cuda_graph_max_batch=2, compile_smaller_after=0))
    graphed.denoiser.cuda_graphs = True
    assert [graphed.denoiser.captures(b) for b in (1, 2, 4, 8)] == [True, True, False, False]
    for n in (1, 2, 3):  # buckets 1, 2 and 4: the last one runs compiled without static buffers
        images = graphed.decode(stage_c_latents(n, n), PROMPTS[:n], list(range(n)), steps=2)
        assert level_diff(images, eager.decode(stage_c_latents(n, n), PROMPTS[:n], list(range(n)), steps=2)) <= 1
    assert sorted(graphed.denoiser.graphs) == [(1, 4, 32, 32), (2, 4, 32, 32)]
    graphed.denoiser.cuda_graph_max_batch = None
    assert graphed.denoiser.captures(64)


def test_stage_b_level_features_are_computed_before_the_steps(decoder_pair):
    model = decoder_pair[0].decoder
    with torch.no_grad():
        lazy = model.condition(stage_c_latents(2), torch.randn(2, 77, 24))
        early = model.condition(lazy["effnet"], torch.randn(2, 77, 24), latent_size=(32, 32))
        model.denoise(torch.randn(2, 4, 32, 32), torch.rand(2), lazy)  # fills its features at the first step
    features = sorted(k for k in lazy if isinstance(k, tuple))
    assert features and features == sorted(k for k in early if isinstance(k, tuple))
    assert all(torch.equal(lazy[k], early[k]) for k in features)


def test_channels_last_only_on_cuda(decoder_pair):
    eager, _ = decoder_pair
    use_channels_last(eager.decoder, CompileOptions())
    assert all(p.is_contiguous() for p in eager.decoder.parameters())


def test_float16_overflow_fails_clearly(tiny_checkpoints):
    """Half precision that overflows (as Stable Cascade's Stage C does in float16) raises, naming stage and dtype,
    instead of returning NaN latents or black images."""
    prior = PriorPipeline.from_pretrained(tiny_checkpoints[0], device="cpu", dtype=torch.float16)
    decoder = DecoderPipeline.from_pretrained(tiny_checkpoints[1], device="cpu", dtype=torch.float16)
    latents = prior(["a cat"], [1], height=128, width=128, steps=2).latents
    assert decoder.decode(latents, ["a cat"], [1], steps=2).shape == (1, 128, 128, 3)
    with torch.no_grad():
        prior.prior.projection.weight.mul_(1e6)  # activations past float16's 65504
        decoder.decoder.embedding[1].weight.mul_(1e6)
    with pytest.raises(FloatingPointError, match=r"^Stage C in float16 produced non-finite values"):
        prior(["a cat"], [1], height=128, width=128, steps=2)
    with pytest.raises(FloatingPointError, match=r"^Stage B in float16 produced non-finite values"):
        decoder.decode(latents, ["a cat"], [1], steps=2)


def test_compile_cache_restores_compiled_graphs_on_a_fresh_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "default"))  # restored after the test

    def compile_and_run():
        torch.compiler.reset()
        counters.clear()
        f = torch.compile(cache_probe, fullgraph=True)
        assert torch.allclose(f(torch.arange(8.0)), cache_probe(torch.arange(8.0)))
        return dict(counters["inductor"])

    first = CompileCache(tmp_path / "first")
    assert first.restore() is False
    assert compile_and_run().get("fxgraph_cache_miss") == 1
    saved = first.save()
    assert saved == first.artifacts and saved.stat().st_size > 0

    elsewhere = CompileCache(tmp_path / "elsewhere")  # another machine: its inductor folder empty, the file copied
    elsewhere.folder.mkdir()
    shutil.copy(saved, elsewhere.artifacts)
    assert elsewhere.restore() is True
    assert compile_and_run().get("fxgraph_cache_hit") == 1
    assert CompileCache(tmp_path / "empty").restore() is False  # and without the file, a miss: the hit was the file's
    assert compile_and_run().get("fxgraph_cache_miss") == 1
    torch.compiler.reset()


def cache_probe(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2 + 1
