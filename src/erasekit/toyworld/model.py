"""The ShapesCanvas text-to-image model: a small ``diffusers.FluxPipeline`` with the world's tokenizers.

Every component is a stock class (``FluxTransformer2DModel``, ``AutoencoderKL``, ``CLIPTextModel``,
``T5EncoderModel``, ``CLIPTokenizer``, ``T5Tokenizer``, ``FlowMatchEulerDiscreteScheduler``), so the
saved folder loads with ``FluxPipeline.from_pretrained(path)`` and nothing from erasekit.

The tokenizers cover the world's words only (:func:`erasekit.toyworld.prompts.vocabulary`): a CLIP
byte-level BPE whose merges the ``tokenizers`` BPE trainer learns from those words (each word ends up
one token; any other text still tokenizes, byte by byte), and a T5 Unigram vocabulary built by hand
with one piece per word (the Unigram *trainer* gives unusable pieces on so few words).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ..tiny._common import build_components
from ..tiny.tokenizers import CLIP_BOS_TOKEN, CLIP_EOS_TOKEN, clip_tokenizer_from_vocab, t5_tokenizer_from_pieces
from .prompts import vocabulary


@dataclass(frozen=True)
class WorldSpec:
    """Sizes of the ShapesCanvas pipeline (defaults: the shipped model)."""

    resolution: int = 32
    width: int = 128
    head_dim: int = 32
    double_blocks: int = 3
    single_blocks: int = 6
    mlp_ratio: float = 4.0
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 16
    shift: float = 1.0

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["vae_channels"] = list(self.vae_channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldSpec:
        data = dict(data)
        data["vae_channels"] = tuple(data["vae_channels"])
        return cls(**data)


# ----------------------------------------------------------------------------- tokenizers
def _byte_symbols() -> list[str]:
    """The 256 printable symbols of byte-level BPE, in GPT-2/CLIP order."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols = [chr(b) for b in printable]
    extra = sorted(alphabet - set(symbols))
    return symbols + extra


def world_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout vocabulary (bytes, bytes + ``</w>``, merges, specials) over the world's words."""
    words = vocabulary()
    backend = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, end_of_word_suffix="</w>", show_progress=False)
    backend.train_from_iterator(words, trainer=trainer)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(backend.to_str())["model"]["merges"]
    ]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [CLIP_BOS_TOKEN, CLIP_EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def world_t5_pieces() -> list[tuple[str, float]]:
    """Unigram pieces: T5's specials, characters as low-scored fall-backs, one piece per world word."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -10.0)]
    for code in range(33, 127):
        pieces += [(chr(code), -12.0), ("\u2581" + chr(code), -12.0)]
    pieces += [("\u2581" + word, -1.0) for word in vocabulary() if len(word) > 1]
    return pieces


def build_world_tokenizers(max_length: int) -> tuple[Any, Any]:
    """``(CLIPTokenizer, T5Tokenizer)`` of the world, both with ``model_max_length = max_length``."""
    vocab, merges = world_clip_vocab()
    return clip_tokenizer_from_vocab(vocab, merges, max_length), t5_tokenizer_from_pieces(world_t5_pieces(), max_length)


# ----------------------------------------------------------------------------- pipeline
def build_world_pipeline(spec: WorldSpec | None = None, seed: int = 0) -> FluxPipeline:
    """An untrained ShapesCanvas ``FluxPipeline`` (float32, CPU, eval mode) of the given sizes."""
    spec = spec or WorldSpec()
    clip_tokenizer, t5_tokenizer = build_world_tokenizers(spec.max_length)

    def transformer() -> FluxTransformer2DModel:
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=spec.latent_channels * 4,
            num_layers=spec.double_blocks,
            num_single_layers=spec.single_blocks,
            attention_head_dim=spec.head_dim,
            num_attention_heads=spec.heads,
            joint_attention_dim=spec.text_width,
            pooled_projection_dim=spec.text_width,
            guidance_embeds=False,
            axes_dims_rope=_rope_axes(spec.head_dim),
        )

    def vae() -> AutoencoderKL:
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
            block_out_channels=spec.vae_channels,
            layers_per_block=1,
            latent_channels=spec.latent_channels,
            norm_num_groups=8,
            sample_size=spec.resolution,
            scaling_factor=1.0,
            shift_factor=0.0,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        )

    def clip() -> CLIPTextModel:
        return CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=spec.text_width,
                intermediate_size=spec.text_width * 2,
                num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_heads,
                max_position_embeddings=spec.max_length,
                projection_dim=spec.text_width,
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
        )

    def t5() -> T5EncoderModel:
        return T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=spec.text_width,
                d_kv=spec.text_width // spec.text_heads,
                d_ff=spec.text_width * 2,
                num_layers=spec.text_layers,
                num_heads=spec.text_heads,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=spec.max_length,
                dropout_rate=0.0,
                feed_forward_proj="gated-gelu",
                is_encoder_decoder=False,
                use_cache=False,
                pad_token_id=0,
                eos_token_id=1,
            )
        )

    made = build_components(
        {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5}, seed, torch.float32
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.shift, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=scheduler,
        vae=made["vae"],
        text_encoder=made["text_encoder"],
        tokenizer=clip_tokenizer,
        text_encoder_2=made["text_encoder_2"],
        tokenizer_2=t5_tokenizer,
        transformer=made["transformer"],
    )


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's three rotary axes (text position, image row, image column): even sizes summing to ``head_dim``.

    FLUX.1 uses (16, 56, 56) for 128; the same proportions give (8, 12, 12) for 32.
    """
    image = (head_dim * 7 // 16) // 2 * 2
    return (head_dim - 2 * image, image, image)
