"""The reference video DiT: diffusers' ``LatteTransformer3DModel`` at a small config, in pixel space,
conditioned on our caption tokens through a small learned caption encoder.

Caching quality can only be judged on a trained model; this one is small enough to train on a CPU
(``adacache_fx.reference.train``) and to ship as safetensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .data import MAX_TOKENS, PAD_ID, VOCAB


@dataclass(frozen=True)
class ReferenceConfig:
    frames: int = 8
    size: int = 32
    channels: int = 3
    patch_size: int = 4  # 8x8 patches per 32x32 frame: 512 tokens per clip, CPU-trainable
    num_layers: int = 4  # spatial + as many temporal blocks
    heads: int = 4
    head_dim: int = 32
    text_dim: int = 64
    max_tokens: int = MAX_TOKENS
    train_timesteps: int = 1000

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


class CaptionEncoder(nn.Module):
    """Token embeddings + positions + one transformer encoder layer: caption -> (B, L, text_dim)."""

    def __init__(self, vocab_size: int, dim: int, max_tokens: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        self.positions = nn.Parameter(torch.zeros(max_tokens, dim))
        self.layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, batch_first=True)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(tokens) + self.positions[: tokens.shape[1]]
        return self.layer(x, src_key_padding_mask=~mask.bool())


def build(config: ReferenceConfig = ReferenceConfig()) -> tuple[nn.Module, CaptionEncoder]:
    """The (untrained) transformer and caption encoder for ``config``."""
    from diffusers import LatteTransformer3DModel

    transformer = LatteTransformer3DModel(
        num_attention_heads=config.heads,
        attention_head_dim=config.head_dim,
        in_channels=config.channels,
        out_channels=config.channels,
        num_layers=config.num_layers,
        cross_attention_dim=config.hidden,
        sample_size=config.size,
        patch_size=config.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=config.train_timesteps,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=config.text_dim,
        video_length=config.frames,
    )
    encoder = CaptionEncoder(len(VOCAB), config.text_dim, config.max_tokens)
    return transformer, encoder


def save(path: str | Path, transformer: nn.Module, encoder: CaptionEncoder, config: ReferenceConfig) -> None:
    """One safetensors file holding both modules (``transformer.*``, ``encoder.*``) and the config."""
    from safetensors.torch import save_file

    tensors = {f"transformer.{k}": v.contiguous() for k, v in transformer.state_dict().items()}
    tensors.update({f"encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()})
    save_file(tensors, str(path), metadata={"config": json.dumps(asdict(config)), "format": "adacache_fx-reference-1"})


def load(path: str | Path) -> tuple[nn.Module, CaptionEncoder, ReferenceConfig]:
    """Load a model saved by :func:`save`, offline, in eval mode."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != "adacache_fx-reference-1":
            raise ValueError(f"{path} is not an adacache_fx reference model (format {metadata.get('format')!r})")
        config = ReferenceConfig(**json.loads(metadata["config"]))
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    transformer, encoder = build(config)
    transformer.load_state_dict({k[len("transformer."):]: v for k, v in tensors.items() if k.startswith("transformer.")})
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")})
    return transformer.eval(), encoder.eval(), config


def empty_caption(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional caption (classifier-free guidance): all padding, first position attended
    (an all-masked sequence would make attention undefined)."""
    empty_mask = torch.zeros_like(mask)
    empty_mask[:, 0] = 1
    return torch.full_like(tokens, PAD_ID), empty_mask


@torch.no_grad()
def generate(
    transformer: nn.Module,
    encoder: CaptionEncoder,
    config: ReferenceConfig,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM sampling with batched classifier-free guidance; returns videos (B, C, T, H, W) in [-1, 1]."""
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    scheduler = DDIMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True)
    scheduler.set_timesteps(num_steps)
    batch = tokens.shape[0]
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config.channels, config.frames, config.size, config.size, generator=generator)
    empty, empty_mask = empty_caption(tokens, mask)
    text = encoder(torch.cat([tokens, empty]), torch.cat([mask, empty_mask]))
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        out = transformer(
            hidden_states=torch.cat([latents, latents]),
            encoder_hidden_states=text,
            timestep=t.expand(2 * batch),
            enable_temporal_attentions=True,
            return_dict=False,
        )[0]
        cond, uncond = out.chunk(2)
        latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
    return latents.clamp(-1, 1)
