"""A zoo of diffusers transformer (DiT) models built from configs, with matching inputs.

Used by the tests, ``adacache-fx inspect`` and the benchmarks; no weights are downloaded.

Every entry builds a randomly initialised, float32, eval-mode model on CPU
(seeded with ``torch.manual_seed(0)``) and can produce a matching dict of
keyword arguments for ``model(**kwargs)``.  Configs are deliberately tiny
(2 heads x 16 dim, >= 2 blocks per block list, a handful of tokens) so that a
forward pass runs in milliseconds on CPU.

``inputs(timestep=500.0, batch=1, seed=0)``:
  * all random tensors come from a ``torch.Generator`` seeded with ``seed``, so
    latents / text embeddings depend only on ``(batch, seed)`` and never on
    ``timestep``;
  * the ``timestep`` kwarg of the model is a deterministic, injective function
    of the ``timestep`` argument (the raw value, ``t / 1000`` for models whose
    pipelines feed [0, 1] timesteps, or ``1 - t / 1000`` for Lumina2).

Skipped entries: none -- all required and all optional entries
(sana, auraflow, allegro, cogview4, hunyuandit, lumina2, qwenimage, chroma)
build and run with diffusers 0.42.1.  Deviations from the 2 x 16 default:
  * allegro uses 2 heads x 24 dim (its 3D RoPE needs head_dim divisible into
    three even parts);
  * hunyuandit uses 4 blocks so that its long-skip (U-Net style) connections
    are actually exercised (with 2 blocks no skip is used).
Block lists (``block_lists(model)``): hunyuanvideo also has the 2-block
``context_embedder.token_refiner.refiner_blocks``; lumina2 has
``noise_refiner``/``context_refiner``/``layers``; latte has spatial
``transformer_blocks`` + ``temporal_transformer_blocks``.

Run ``python -m adacache_lab.zoo`` for a smoke test printing output shapes, forward
times and the block ``nn.ModuleList`` s of every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import functools

import torch

# ---------------------------------------------------------------------------
# Common tiny sizes
# ---------------------------------------------------------------------------
HEADS = 2
HEAD_DIM = 16
INNER = HEADS * HEAD_DIM  # 32
TXT_LEN = 8
TXT_DIM = 16  # raw text-encoder feature size fed to the models
ROPE_AXES = (4, 6, 6)  # sums to HEAD_DIM


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[..., dict]
    video: bool
    output: Callable[[object], torch.Tensor]


def _out_sample(o) -> torch.Tensor:
    return o.sample if hasattr(o, "sample") else o[0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _ts(timestep: float, batch: int, scale: float = 1.0) -> torch.Tensor:
    return torch.full((batch,), float(timestep) * scale, dtype=torch.float32)


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    # Freshly constructed diffusers models are already float32 on CPU; calling
    # ``.to(dtype=...)`` would only emit a "_keep_in_fp32_modules" warning.
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    return model.eval()


def _flux_ids(h: int, w: int, txt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.reshape(h * w, 3)
    txt_ids = torch.zeros(txt_len, 3)
    return img_ids, txt_ids


# ---------------------------------------------------------------------------
# DiT (class-conditional)
# ---------------------------------------------------------------------------
def _build_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        norm_num_groups=4,
    )
    return _finish(m)


def _inputs_dit(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "timestep": _ts(timestep, batch),
        "class_labels": torch.randint(0, 1000, (batch,), generator=g),
    }


# ---------------------------------------------------------------------------
# PixArt-alpha / sigma
# ---------------------------------------------------------------------------
def _build_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=INNER,
        sample_size=8,
        patch_size=2,
        caption_channels=TXT_DIM,
        use_additional_conditions=False,
        interpolation_scale=1,
    )
    return _finish(m)


def _inputs_pixart(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN),
        "timestep": _ts(timestep, batch),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


# ---------------------------------------------------------------------------
# Latte (video, spatial + temporal block lists)
# ---------------------------------------------------------------------------
_LATTE_FRAMES = 3


def _build_latte():
    return _finish(latte(num_layers=2, heads=HEADS, head_dim=HEAD_DIM, frames=_LATTE_FRAMES,
                         sample_size=8, text_len=TXT_LEN, text_dim=TXT_DIM)[0])


def _inputs_latte(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    return _latte_inputs(timestep, batch, seed, frames=_LATTE_FRAMES, sample_size=8, text_len=TXT_LEN, text_dim=TXT_DIM)


# ---------------------------------------------------------------------------
# CogVideoX (video; input layout is (B, F, C, H, W))
# ---------------------------------------------------------------------------
def _build_cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=4,
        time_embed_dim=INNER,
        text_embed_dim=TXT_DIM,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,  # -> (9 - 1) // 4 + 1 = 3 latent frames
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TXT_LEN,
    )
    return _finish(m)


def _inputs_cogvideox(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 3, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch),
    }


# ---------------------------------------------------------------------------
# Wan 2.1 (video)
# ---------------------------------------------------------------------------
#: The tiny Wan config; the Wan family in zoo_more.py varies it.
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                out_channels=4, text_dim=TXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True)


def _build_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(**WAN_TINY, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return _finish(m)


def _inputs_wan(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch),
    }


# ---------------------------------------------------------------------------
# Flux (double-stream + single-stream blocks; packed latents)
# ---------------------------------------------------------------------------
def _build_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TXT_DIM,
        pooled_projection_dim=TXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=ROPE_AXES,
    )
    return _finish(m)


def _inputs_flux(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    h = w = 4  # packed 2x2 patches of an 8x8x4 latent
    img_ids, txt_ids = _flux_ids(h, w, TXT_LEN)
    return {
        "hidden_states": _randn(g, batch, h * w, 16),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "pooled_projections": _randn(g, batch, TXT_DIM),
        "timestep": _ts(timestep, batch, 1e-3),  # pipeline passes t / 1000
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }


# ---------------------------------------------------------------------------
# HunyuanVideo (token refiner + double-stream + single-stream blocks)
# ---------------------------------------------------------------------------
def _build_hunyuanvideo():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    m = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=2,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=False,
        text_embed_dim=TXT_DIM,
        pooled_projection_dim=TXT_DIM,
        rope_axes_dim=ROPE_AXES,
    )
    return _finish(m)


def _inputs_hunyuanvideo(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 3, 8, 8),
        "timestep": _ts(timestep, batch),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN),
        "pooled_projections": _randn(g, batch, TXT_DIM),
    }


# ---------------------------------------------------------------------------
# LTX-Video (packed video tokens, explicit num_frames/height/width)
# ---------------------------------------------------------------------------
_LTX_F, _LTX_H, _LTX_W = 2, 4, 4


def _build_ltxvideo():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    m = LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        cross_attention_dim=INNER,
        num_layers=2,
        caption_channels=TXT_DIM,
    )
    return _finish(m)


def _inputs_ltxvideo(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, _LTX_F * _LTX_H * _LTX_W, 4),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN),
        "num_frames": _LTX_F,
        "height": _LTX_H,
        "width": _LTX_W,
        "rope_interpolation_scale": (1.0, 1.0, 1.0),
    }


# ---------------------------------------------------------------------------
# Mochi (video)
# ---------------------------------------------------------------------------
def _build_mochi():
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    m = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        pooled_projection_dim=TXT_DIM,
        in_channels=4,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=TXT_DIM,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=TXT_LEN,
    )
    return _finish(m)


def _inputs_mochi(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN, dtype=torch.bool),
    }


# ---------------------------------------------------------------------------
# SD3 (MMDiT)
# ---------------------------------------------------------------------------
def _build_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TXT_DIM,
        caption_projection_dim=INNER,
        pooled_projection_dim=TXT_DIM,
        out_channels=4,
        pos_embed_max_size=16,
    )
    return _finish(m)


def _inputs_sd3(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "pooled_projections": _randn(g, batch, TXT_DIM),
        "timestep": _ts(timestep, batch),
    }


# ---------------------------------------------------------------------------
# Sana (linear attention DiT)
# ---------------------------------------------------------------------------
def _build_sana():
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    m = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        num_cross_attention_heads=HEADS,
        cross_attention_head_dim=HEAD_DIM,
        cross_attention_dim=INNER,
        caption_channels=TXT_DIM,
        sample_size=8,
        patch_size=2,
    )
    return _finish(m)


def _inputs_sana(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN),
        "timestep": _ts(timestep, batch),
    }


# ---------------------------------------------------------------------------
# AuraFlow (MMDiT joint blocks + single blocks)
# ---------------------------------------------------------------------------
def _build_auraflow():
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(0)
    m = AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=2,
        num_single_dit_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TXT_DIM,
        caption_projection_dim=INNER,
        out_channels=4,
        pos_embed_max_size=64,
    )
    return _finish(m)


def _inputs_auraflow(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch, 1e-3),  # pipeline passes t / 1000
    }


# ---------------------------------------------------------------------------
# Allegro (video, with the pipeline's 3D rotary embeddings)
# ---------------------------------------------------------------------------
_ALLEGRO_F = 2
# Allegro's 3D RoPE splits the head dim into three even parts -> head dim 24 (2 x 24 = 48 hidden).
_ALLEGRO_HEAD_DIM = 24


def _build_allegro():
    from diffusers import AllegroTransformer3DModel

    torch.manual_seed(0)
    m = AllegroTransformer3DModel(
        patch_size=2,
        patch_size_t=1,
        num_attention_heads=HEADS,
        attention_head_dim=_ALLEGRO_HEAD_DIM,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=HEADS * _ALLEGRO_HEAD_DIM,
        sample_height=8,
        sample_width=8,
        sample_frames=_ALLEGRO_F,
        caption_channels=TXT_DIM,
    )
    return _finish(m)


def _allegro_rope(num_frames: int, grid_h: int, grid_w: int):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    # Mirrors AllegroPipeline._prepare_rotary_positional_embeddings (default config scales).
    freqs_t, freqs_h, freqs_w, gt, gh, gw = get_3d_rotary_pos_embed_allegro(
        embed_dim=_ALLEGRO_HEAD_DIM,
        crops_coords=((0, 0), (grid_h, grid_w)),
        grid_size=(grid_h, grid_w),
        temporal_size=num_frames,
        interpolation_scale=(2.2, 2.0, 2.0),
        device=torch.device("cpu"),
    )
    pos = torch.cartesian_prod(gt.long(), gh.long(), gw.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    gt, gh, gw = pos
    return (freqs_t, freqs_h, freqs_w), (gt, gh, gw)


def _inputs_allegro(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, _ALLEGRO_F, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN),
        "image_rotary_emb": _allegro_rope(_ALLEGRO_F, 4, 4),
    }


# ---------------------------------------------------------------------------
# CogView4
# ---------------------------------------------------------------------------
def _build_cogview4():
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(0)
    m = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        text_embed_dim=TXT_DIM,
        time_embed_dim=8,
        condition_dim=4,
        pos_embed_max_size=8,
        sample_size=8,
        rope_axes_dim=(16, 16),
    )
    return _finish(m)


def _inputs_cogview4(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch),
        "original_size": torch.tensor([[64.0, 64.0]]).repeat(batch, 1),
        "target_size": torch.tensor([[64.0, 64.0]]).repeat(batch, 1),
        "crop_coords": torch.tensor([[0.0, 0.0]]).repeat(batch, 1),
    }


# ---------------------------------------------------------------------------
# Hunyuan-DiT (U-shaped skip connections between blocks)
# ---------------------------------------------------------------------------
_HDIT_TXT, _HDIT_TXT_T5 = 4, 4


def _build_hunyuandit():
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(0)
    m = HunyuanDiT2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        patch_size=2,
        activation_fn="gelu-approximate",
        sample_size=8,
        hidden_size=INNER,
        num_layers=4,  # >= 4 so that the long-skip (U-Net style) path is exercised
        mlp_ratio=4.0,
        learn_sigma=True,
        cross_attention_dim=TXT_DIM,
        cross_attention_dim_t5=TXT_DIM,
        pooled_projection_dim=TXT_DIM,
        text_len=_HDIT_TXT,
        text_len_t5=_HDIT_TXT_T5,
    )
    return _finish(m)


def _inputs_hunyuandit(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    g = _gen(seed)
    grid = 4  # 8x8 latent, patch 2
    rope = get_2d_rotary_pos_embed(HEAD_DIM, ((0, 0), (grid, grid)), (grid, grid), output_type="pt")
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "timestep": _ts(timestep, batch),
        "encoder_hidden_states": _randn(g, batch, _HDIT_TXT, TXT_DIM),
        "text_embedding_mask": torch.ones(batch, _HDIT_TXT, dtype=torch.long),
        "encoder_hidden_states_t5": _randn(g, batch, _HDIT_TXT_T5, TXT_DIM),
        "text_embedding_mask_t5": torch.ones(batch, _HDIT_TXT_T5, dtype=torch.long),
        "image_meta_size": torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]]).repeat(batch, 1),
        "style": torch.zeros(batch, dtype=torch.long),
        "image_rotary_emb": rope,
    }


# ---------------------------------------------------------------------------
# Lumina2 (noise refiner + context refiner + main layers)
# ---------------------------------------------------------------------------
def _build_lumina2():
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    m = Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=INNER,
        num_layers=2,
        num_refiner_layers=2,
        num_attention_heads=HEADS,
        num_kv_heads=HEADS,
        multiple_of=16,
        axes_dim_rope=ROPE_AXES,
        axes_lens=(64, 64, 64),
        cap_feat_dim=TXT_DIM,
    )
    return _finish(m)


def _inputs_lumina2(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        # Lumina2Pipeline passes 1 - t / num_train_timesteps
        "timestep": 1.0 - _ts(timestep, batch, 1e-3),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN, dtype=torch.bool),
    }


# ---------------------------------------------------------------------------
# Qwen-Image (packed latents, img_shapes)
# ---------------------------------------------------------------------------
def _build_qwenimage():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=ROPE_AXES,
    )
    return _finish(m)


def _inputs_qwenimage(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    h = w = 4  # packed 2x2 patches of an 8x8x4 latent
    return {
        "hidden_states": _randn(g, batch, h * w, 16),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "encoder_hidden_states_mask": torch.ones(batch, TXT_LEN, dtype=torch.long),
        "timestep": _ts(timestep, batch, 1e-3),  # pipeline passes t / 1000
        "img_shapes": [[(1, h, w)]] * batch,
    }


# ---------------------------------------------------------------------------
# Chroma (Flux-like with a distilled guidance/modulation approximator)
# ---------------------------------------------------------------------------
def _build_chroma():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    m = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TXT_DIM,
        axes_dims_rope=ROPE_AXES,
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    return _finish(m)


def _inputs_chroma(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    h = w = 4
    img_ids, txt_ids = _flux_ids(h, w, TXT_LEN)
    return {
        "hidden_states": _randn(g, batch, h * w, 16),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch, 1e-3),  # pipeline passes t / 1000
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
def _entry(name: str, build, inputs, video: bool) -> ZooEntry:
    return ZooEntry(name=name, build=build, inputs=inputs, video=video, output=_out_sample)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        # required
        _entry("dit", _build_dit, _inputs_dit, False),
        _entry("pixart", _build_pixart, _inputs_pixart, False),
        _entry("latte", _build_latte, _inputs_latte, True),
        _entry("cogvideox", _build_cogvideox, _inputs_cogvideox, True),
        _entry("wan", _build_wan, _inputs_wan, True),
        _entry("flux", _build_flux, _inputs_flux, False),
        _entry("hunyuanvideo", _build_hunyuanvideo, _inputs_hunyuanvideo, True),
        _entry("ltxvideo", _build_ltxvideo, _inputs_ltxvideo, True),
        _entry("mochi", _build_mochi, _inputs_mochi, True),
        _entry("sd3", _build_sd3, _inputs_sd3, False),
        # extras
        _entry("sana", _build_sana, _inputs_sana, False),
        _entry("auraflow", _build_auraflow, _inputs_auraflow, False),
        _entry("allegro", _build_allegro, _inputs_allegro, True),
        _entry("cogview4", _build_cogview4, _inputs_cogview4, False),
        _entry("hunyuandit", _build_hunyuandit, _inputs_hunyuandit, False),
        _entry("lumina2", _build_lumina2, _inputs_lumina2, False),
        _entry("qwenimage", _build_qwenimage, _inputs_qwenimage, False),
        _entry("chroma", _build_chroma, _inputs_chroma, False),
    ]
}


#: Sizes of :func:`latte` used by the benchmarks: a small one for quick runs, the CPU mid size (the
#: defaults), and Latte-1's own size (28 + 28 blocks, hidden 1152, 16 frames of 64x64 latents,
#: 16384 tokens, T5-sized captions) for a GPU.
LATTE_SIZES: dict[str, dict] = {
    "small": dict(num_layers=2, heads=4, head_dim=32, frames=4, sample_size=16),
    "mid": {},
    "full": dict(num_layers=28, heads=16, head_dim=72, frames=16, sample_size=64, text_dim=4096),
}


def latte(
    num_layers: int = 8,
    heads: int = 6,
    head_dim: int = 64,
    frames: int = 16,
    sample_size: int = 32,
    patch_size: int = 2,
    text_len: int = 16,
    text_dim: int = 64,
) -> tuple[torch.nn.Module, Callable[..., dict]]:
    """A Latte video DiT of any size (random weights) and its input builder.

    The defaults are the mid-size benchmark config: 8 spatial + 8 temporal blocks, hidden 384,
    16 frames of 16x16 patches = 4096 tokens.
    """
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(0)
    model = LatteTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        cross_attention_dim=heads * head_dim,
        sample_size=sample_size,
        patch_size=patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=text_dim,
        video_length=frames,
    ).eval()

    return model, functools.partial(
        _latte_inputs, frames=frames, sample_size=sample_size, text_len=text_len, text_dim=text_dim
    )


def _latte_inputs(
    timestep: float = 500.0, batch: int = 1, seed: int = 0, *,
    frames: int, sample_size: int, text_len: int, text_dim: int,
) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, frames, sample_size, sample_size),
        "encoder_hidden_states": _randn(g, batch, text_len, text_dim),
        # LattePipeline passes no encoder_attention_mask (it is not repeated per frame).
        "timestep": _ts(timestep, batch),
        "enable_temporal_attentions": True,
    }


def block_lists(model: torch.nn.Module) -> list[tuple[str, int]]:
    """(qualified name, length) of every nn.ModuleList whose items are transformer blocks."""
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        cls = type(mod[0]).__name__
        if "Block" in cls or "Layer" in cls and "Norm" not in cls:
            out.append((name, len(mod)))
    return out


if __name__ == "__main__":
    import time

    for name, entry in ZOO.items():
        model = entry.build()
        n_params = sum(p.numel() for p in model.parameters())
        lines = []
        for batch in (1, 2):
            kwargs = entry.inputs(timestep=500.0, batch=batch)
            with torch.no_grad():
                entry.output(model(**kwargs))  # warm-up
                t0 = time.perf_counter()
                out = entry.output(model(**kwargs))
                dt = (time.perf_counter() - t0) * 1e3
            assert torch.isfinite(out).all(), name
            lines.append(f"b={batch} out={tuple(out.shape)} {dt:.1f} ms")
        blocks = ", ".join(f"{n}[{k}]" for n, k in block_lists(model))
        print(f"{name:13s} params={n_params:7d}  " + "  ".join(lines) + f"  blocks: {blocks}")
