"""Tiny random-weight checkpoints in the published layout, for offline demos and tests.

Their images are noise: the weights are random. They exist so that everything downstream of loading
(the real loading code included) runs without the published multi-GB checkpoints.

    python -m wurstfabrik.pipeline.tiny OUT_DIR                     # writes OUT_DIR/prior and OUT_DIR/decoder
    python -m wurstfabrik.pipeline.tiny OUT_DIR --model-only-prior  # and OUT_DIR/prior-model, a model-only prior
                                                                    # whose text encoder is OUT_DIR/prior's
"""

import argparse
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from .decoder import DecoderConfig, StageB
from .prior import PriorConfig, StageC
from .vqgan import StageA, VQGANConfig

PRIOR_TEXT_WIDTH = 32
DECODER_TEXT_WIDTH = 24
TINY_PRIOR = PriorConfig(c_in=16, c=64, c_cond=PRIOR_TEXT_WIDTH, c_r=64, depth=2, nhead=4)
TINY_DECODER = DecoderConfig(c_cond=32, c_hidden=(16, 32, 32, 32), nhead=(-1, 2, 2, 2), blocks=(1, 1, 1, 1),
                             clip_embd=DECODER_TEXT_WIDTH)
TINY_VQGAN = VQGANConfig(levels=2, bottleneck_blocks=1, embed_dim=16, num_vq_embeddings=32)
CLASS_NAMES = {StageC: "WuerstchenPrior", StageB: "WuerstchenDiffNeXt", StageA: "PaellaVQModel"}
SCHEDULER_CONFIG = {"_class_name": "DDPMWuerstchenScheduler", "scaler": 1.0, "s": 0.008}
CORPUS = ("a photo of a cat sitting on the red sofa next to a dog in the garden at night, an oil painting of "
          "mountains and a lake under the blue sky with clouds, portrait of an astronaut riding a horse in space, "
          "sausages on a grill, the city street in the rain with neon lights, high quality, detailed, 4k")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's map of every byte to a printable character, the alphabet of byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def learn_bpe(corpus: str, merges: int) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style byte-level BPE vocabulary learned greedily from a small corpus."""
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    words = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in corpus.lower().replace(",", " ").split())
    merged = []
    for _ in range(merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merged.append(" ".join(best))
        vocab.append(best[0] + best[1])
        new_words = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merged


def write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """The files of a published CLIP tokenizer folder: vocab.json, merges.txt and the configs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def write_text_encoder(folder: Path, vocab: dict[str, int], width: int, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=width * 2,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"], projection_dim=width)
    CLIPTextModel(config).eval().save_pretrained(str(folder), safe_serialization=True)


def tame(module: torch.nn.Module, head: torch.nn.Module) -> torch.nn.Module:
    """Shrinks the output head's weights, as training leaves them: with default init the predicted noise
    of a random Stage C or B is huge, and sampling amplifies rounding into visible differences."""
    with torch.no_grad():
        head.weight.mul_(0.02)
        head.bias.zero_()
    return module


def write_component(folder: Path, module: torch.nn.Module, **extra_config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": CLASS_NAMES[type(module)], **asdict(module.config), **extra_config}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))


def write_index(folder: Path, class_name: str, components: dict[str, tuple[str, str]], **settings) -> None:
    index = {"_class_name": class_name, "_diffusers_version": "0.42.1", **settings}
    index.update({name: list(classes) for name, classes in components.items()})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def write_tiny_checkpoints(out_dir, seed: int = 0) -> tuple[Path, Path]:
    """Writes `prior/` and `decoder/` checkpoint folders under out_dir and returns their paths."""
    out = Path(out_dir)
    vocab, merges = learn_bpe(CORPUS, merges=200)
    prior_dir, decoder_dir = out / "prior", out / "decoder"
    for folder, width, text_seed in ((prior_dir, PRIOR_TEXT_WIDTH, seed + 1), (decoder_dir, DECODER_TEXT_WIDTH,
                                                                               seed + 2)):
        write_tokenizer(folder / "tokenizer", vocab, merges)
        write_text_encoder(folder / "text_encoder", vocab, width, text_seed)
        (folder / "scheduler").mkdir(exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))

    torch.manual_seed(seed)
    prior = StageC(TINY_PRIOR)
    write_component(prior_dir / "prior", tame(prior, prior.out[1]))
    write_index(prior_dir, "WuerstchenPriorPipeline", {"prior": ("wuerstchen", "WuerstchenPrior"),
                            "text_encoder": ("transformers", "CLIPTextModel"),
                            "tokenizer": ("transformers", "CLIPTokenizer"),
                            "scheduler": ("diffusers", "DDPMWuerstchenScheduler")},
                latent_mean=42.0, latent_std=1.0, resolution_multiple=42.67)
    decoder = StageB(TINY_DECODER)
    write_component(decoder_dir / "decoder", tame(decoder, decoder.clf[1]))
    write_component(decoder_dir / "vqgan", StageA(TINY_VQGAN))
    write_index(decoder_dir, "WuerstchenDecoderPipeline", {"decoder": ("wuerstchen", "WuerstchenDiffNeXt"),
                              "vqgan": ("wuerstchen", "PaellaVQModel"),
                              "text_encoder": ("transformers", "CLIPTextModel"),
                              "tokenizer": ("transformers", "CLIPTokenizer"),
                              "scheduler": ("diffusers", "DDPMWuerstchenScheduler")},
                latent_dim_scale=10.67)
    return prior_dir, decoder_dir


def write_model_only_prior(folder, seed: int = 100) -> Path:
    """A model-only prior, laid out as the hub's warp-ai/wuerstchen-prior-model-* repositories are: config.json
    (with their training-only `dropout`) and one safetensors file, no model_index.json, no text encoder. Its
    condition width is the tiny prior pipeline's text encoder's, the companion it takes its text encoder from."""
    folder = Path(folder)
    torch.manual_seed(seed)
    prior = StageC(TINY_PRIOR)
    write_component(folder, tame(prior, prior.out[1]), dropout=0.1, _diffusers_version="0.19.0.dev0")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wurstfabrik.pipeline.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write prior/ and decoder/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-only-prior", action="store_true", help="also write prior-model/, a model-only prior")
    args = parser.parse_args(argv)
    prior, decoder = write_tiny_checkpoints(args.out_dir, args.seed)
    print(f"wrote tiny random-weight checkpoints (their images are noise):\n  prior:   {prior}\n  decoder: {decoder}")
    if args.model_only_prior:
        model = write_model_only_prior(Path(args.out_dir) / "prior-model", args.seed + 100)
        print(f"  model-only prior: {model} (its text encoder: prior_text={prior})")


if __name__ == "__main__":
    main()
