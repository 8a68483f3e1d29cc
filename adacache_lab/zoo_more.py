"""More diffusers transformer (DiT) models for the zoo, built from tiny configs (no weights).

Same conventions as :mod:`adacache_lab.zoo` (``ZooEntry``; seeded ``torch.manual_seed(0)`` float32
eval builds; 2 heads x 16 dim where the model allows; >= 2 blocks per block list; ``inputs(timestep,
batch, seed)`` whose random tensors depend only on ``(batch, seed)`` and whose timestep kwarg is an
injective function of ``timestep``: raw, ``t / 1000`` for [0, 1]-timestep pipelines, ``1 - t / 1000`` for
Z-Image).  Each forward takes a few milliseconds on CPU.  Run ``python -m adacache_lab.zoo_more [names]``
for a smoke test.  Configs follow diffusers' own model tests (tests/models/transformers), re-sized.

``MORE_ZOO`` (46 classes, diffusers 0.42.1):
  * Wan family: chronoedit (ChronoEdit), skyreels_v2 (SkyReelsV2), wan_vace (WanVACE: 4 blocks +
    2 vace_blocks), anyflow (AnyFlow; (B, F, C, H, W) latents, per-frame t and r_timestep), helios
    (Helios; with short/mid/long history latents), wan_animate (WanAnimate; 4 blocks -> 2 face adapters,
    motion encoder + face encoder inputs);
  * Flux family: bria, bria_fibo (per-block text-encoder layers), longcat_image, ovis_image, flux2
    (4-axis ids), flux3 (mode blocks for image / image_cond + text);
  * CogVideoX/CogView family: cogview3plus, consisid (face-ID perceiver branch, is_train_face=True),
    glm_image (prior VQ tokens);
  * Hunyuan family: hunyuanimage (HunyuanImage 2.1), hunyuanvideo15 (HunyuanVideo 1.5, t2v),
    framepack (HunyuanVideo-Framepack, with clean / 2x / 4x history latents), motif_video;
  * video: cosmos (concat_padding_mask=False: True needs torchvision, not installed), easyanimate,
    kandinsky5, kandinsky6 (visual_cond, video-only call), kandinsky6_sr (NABLA flex attention, one 8x8
    token tile), sana_video, ltx2 (joint audio + video streams);
  * image: hidream (MoE feed-forwards, per-block Llama features), prx, zimage (per-sample list inputs
    and outputs: ``output`` stacks them), omnigen (text-only prompt), ernie_image, krea2 (text-fusion
    layerwise + refiner blocks), ideogram4, nucleusmoe_image (expert-choice MoE, 1 dense + 1 MoE block),
    qwenimage21 (block-causal mask over text + vision slots), joyimage_edit, joyimage_edit_plus
    (pre-patchified target + reference), transformer2d (the generic Transformer2DModel as an
    adaLN-Zero patched DiT, class-conditional like dit);
  * audio DiTs: ace_step (ACE-Step, 1D), minimax_music3 (MiniMax Music 3, 1D);
  * pipeline-only inputs (KV caches, camera conditioning, packed layouts), each the call the pipeline makes
    in its denoising loop:
      - anyflow_far (AnyFlow-FAR): an autoregressive step of the last of 3 one-frame chunks, with
        ``chunk_partition``, a per-block KV cache dict (one full-resolution + one FAR-compressed cached chunk,
        full_chunk_limit=2) and ``kv_cache_flag``; its causal self-attention always runs on the flex backend;
      - wan_animate2 (Wan-Animate-2): the generation pass (``kv_cache_mode="cached"``): list-of-tensor
        latents + condition latents, a ``WanAnimate2KVCache`` with the reference tokens' K/V, and the flex
        BlockMask the model builds (and caches on itself) from ``origin_len`` / ``origin_area``;
      - sana_wm (SANA-WM): per-frame (B, 1, F) timesteps, (B, F, 20) camera conditions (c2w + intrinsics)
        and Plucker rays; 2 blocks = one GDN + one softmax camera-attention block (softmax_every_n=2);
      - sana_wm_refiner (SANA-WM LTX-2 stage-2 refiner): a denoising step (``kv_cache_mode="inject"``) of the
        second AR block against a ``SanaWMRefinerKVCache`` (attention sink + history) with precomputed video
        and sink RoPE (built as ``build_rotary_emb_for_absolute_positions`` does);
      - minimax_h3 (MiniMax-H3): one packed text + audio + video sequence with token tags, per-row timestep
        indices, (t, h, w) positions and the three index tensors;
      - bria_fibo2 (Bria FIBO 2): gist-token perceiver over a text-encoder bundle + one injection block.
    The KV caches hold random K/V in place of the capture / prefill passes the pipelines run before the
    denoising steps (the inputs functions have no model); a fresh cache is built on every ``inputs`` call.

Deviations from the defaults: cosmos and helios use head dim 12 (their RoPE splits), krea2/ideogram4
use 4 heads x 8 (GQA / M-RoPE sections, as in diffusers' tests).  Some random builds are patched so that
they behave like a model (seeded, deterministic): Kandinsky 5 and ERNIE-Image zero-initialise their
adaLN modulation (ERNIE also its output layer: it would output zeros and ignore the timestep), so those
get small random values; NucleusMoE allocates its expert weights with ``torch.empty`` (non-deterministic,
can hold NaNs), so they are filled from a seeded generator.  Likewise SANA-WM's GDN short convolutions and
Plucker embedder and Bria FIBO 2's cross-attention gate (zero-initialised) get seeded random values, and
Bria FIBO 2's perceiver query parameter is frozen (``requires_grad=False``: a no_grad view of it keeps
requires_grad without a grad_fn, which FlopCounterMode's module tracker rejects; outputs are unchanged).
Flex attention (kandinsky6_sr, wan_animate2, anyflow_far) runs eagerly on CPU (unfused, with a warning);
wan_animate2's first call compiles its BlockMask (a few seconds, once per process), and FlopCounterMode
cannot count the flex_attention op (benchmarks/check_reach.py's FLOP measurement fails on these three).

Skipped (name contains "Transformer", ends in "Model", not in ``ZOO``):
  * TransformerTemporalModel: a temporal-attention layer of the AnimateDiff / video UNets (no timestep
    conditioning of its own, used inside a UNet), not a standalone diffusion transformer;
  * DreamLiteTransformer2DModel: likewise a continuous-input (GroupNorm, conv in/out) transformer layer
    used inside a UNet;
  (AnyFlowFAR, WanAnimate2, SanaWM, SanaWMLTX2Refiner, MiniMaxH3 and BriaFibo2, skipped in an earlier
  round for their pipeline-only inputs, are now included: see above.)
"""

from __future__ import annotations

import torch

from adacache_lab.zoo import (
    HEAD_DIM,
    HEADS,
    INNER,
    ROPE_AXES,
    TXT_DIM,
    TXT_LEN,
    ZooEntry,
    _finish,
    WAN_TINY,
    _inputs_auraflow,
    _inputs_chroma,
    _inputs_cogview4,
    _inputs_dit,
    _inputs_wan,
    _gen,
    _out_sample,
    _randn,
    _ts,
)


def _build(cls_name: str, **config) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return _finish(getattr(diffusers, cls_name)(**config))


# ---------------------------------------------------------------------------
# Wan family: zoo.py's WAN_TINY config, the same (B, C, F, H, W) latents and text inputs as Wan 2.1
# ---------------------------------------------------------------------------
def _wan_video(g: torch.Generator, batch: int, channels: int = 4, frames: int = 2, hw: int = 8) -> torch.Tensor:
    return _randn(g, batch, channels, frames, hw, hw)


def _build_chronoedit():
    return _build("ChronoEditTransformer3DModel", **WAN_TINY, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _build_skyreels_v2():
    return _build("SkyReelsV2Transformer3DModel", **WAN_TINY, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


_VACE_IN = 12


def _build_wan_vace():
    cfg = dict(WAN_TINY, num_layers=4)
    return _build("WanVACETransformer3DModel", **cfg, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
                  vace_layers=[0, 2], vace_in_channels=_VACE_IN)


def _inputs_wan_vace(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _wan_video(g, batch),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "control_hidden_states": _wan_video(g, batch, channels=_VACE_IN),
        "timestep": _ts(timestep, batch),
    }


def _build_anyflow():
    return _build("AnyFlowTransformer3DModel", **WAN_TINY, rope_max_seq_len=32, gate_value=0.25, deltatime_type="r")


def _inputs_anyflow(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    frames = 2
    t = _ts(timestep, batch)[:, None].expand(batch, frames).contiguous()
    return {
        # AnyFlow takes (B, F, C, H, W) latents and per-frame timesteps.
        "hidden_states": _randn(g, batch, frames, 4, 8, 8),
        "timestep": t,
        "r_timestep": t * 0.5,
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
    }


def _build_helios():
    cfg = dict(WAN_TINY, attention_head_dim=12)
    return _build("HeliosTransformer3DModel", **cfg, qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4),
                  has_multi_term_memory_patch=True, guidance_cross_attn=True, zero_history_timestep=True,
                  is_amplify_history=False)


def _inputs_helios(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    f = 2
    return {
        "hidden_states": _wan_video(g, batch, frames=f),
        "timestep": _ts(timestep, batch),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "indices_hidden_states": torch.ones(batch, f),
        "indices_latents_history_short": torch.ones(batch, f - 1),
        "indices_latents_history_mid": torch.ones(batch, f - 1),
        "indices_latents_history_long": torch.ones(batch, (f - 1) * 4),
        "latents_history_short": _wan_video(g, batch, frames=f - 1),
        "latents_history_mid": _wan_video(g, batch, frames=f - 1),
        "latents_history_long": _wan_video(g, batch, frames=(f - 1) * 4),
    }


def _build_wan_animate():
    cfg = dict(WAN_TINY, in_channels=12, num_layers=4)  # 4 blocks -> 2 face adapters
    return _build(
        "WanAnimateTransformer3DModel", **cfg, latent_channels=4, qk_norm="rms_norm_across_heads", image_dim=TXT_DIM,
        rope_max_seq_len=32, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16,
        motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
        face_encoder_num_heads=2, inject_face_latents_blocks=2,
    )


def _inputs_wan_animate(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    frames = 4  # latent frames = frames + 1 (reference frame first)
    return {
        "hidden_states": _randn(g, batch, 12, frames + 1, 8, 8),
        "timestep": _ts(timestep, batch),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "encoder_hidden_states_image": _randn(g, batch, 4, TXT_DIM),
        "pose_hidden_states": _randn(g, batch, 4, frames, 8, 8),
        "face_pixel_values": _randn(g, batch, 3, 4 * frames - 3, 16, 16),
    }


# ---------------------------------------------------------------------------
# Flux family (packed latents, img_ids / txt_ids)
# ---------------------------------------------------------------------------
def _build_bria():
    return _build("BriaTransformer2DModel", patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TXT_DIM,
                  axes_dims_rope=list(ROPE_AXES))


def _build_longcat_image():
    return _build("LongCatImageTransformer2DModel", patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TXT_DIM,
                  pooled_projection_dim=TXT_DIM, axes_dims_rope=list(ROPE_AXES))


def _build_ovis_image():
    return _build("OvisImageTransformer2DModel", patch_size=1, in_channels=16, out_channels=16, num_layers=2,
                  num_single_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                  joint_attention_dim=TXT_DIM, axes_dims_rope=ROPE_AXES)


def _build_flux2():
    return _build("Flux2Transformer2DModel", patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TXT_DIM,
                  timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)


def _flux2_ids(h: int, w: int, txt_len: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(txt_len))
    return img[None].expand(batch, -1, -1), txt[None].expand(batch, -1, -1)


def _inputs_flux2(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    h = w = 4
    img_ids, txt_ids = _flux2_ids(h, w, TXT_LEN, batch)
    return {
        "hidden_states": _randn(g, batch, h * w, 16),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch, 1e-3),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }


# ---------------------------------------------------------------------------
# CogView3-Plus, ConsisID (CogVideoX-like)
# ---------------------------------------------------------------------------
def _build_cogview3plus():
    return _build("CogView3PlusTransformer2DModel", patch_size=2, in_channels=4, num_layers=2,
                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, out_channels=4, text_embed_dim=TXT_DIM,
                  time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8)


def _build_consisid():
    return _build(
        "ConsisIDTransformer3DModel", num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
        out_channels=4, time_embed_dim=INNER, text_embed_dim=TXT_DIM, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TXT_LEN,
        cross_attn_interval=1, is_kps=False, is_train_face=True, cross_attn_dim_head=8, cross_attn_num_heads=2,
        LFE_id_dim=4, LFE_vit_dim=4, LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=1,
        LFE_num_querie=2, LFE_output_dim=INNER * 2 // 3,  # = the perceiver's kv dim
        LFE_ff_mult=1, LFE_num_scale=1,
    )


def _inputs_consisid(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 3, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch),
        "id_vit_hidden": [_randn(g, batch, 2, 4)],
        "id_cond": _randn(g, batch, 4),
    }


# ---------------------------------------------------------------------------
# Cosmos (video, adaLN-LoRA blocks), EasyAnimate (MMDiT video)
# ---------------------------------------------------------------------------
def _build_cosmos():
    return _build("CosmosTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=HEADS,
                  attention_head_dim=12, num_layers=2, mlp_ratio=2, text_embed_dim=TXT_DIM, adaln_lora_dim=4,
                  max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
                  concat_padding_mask=False,  # True resizes the mask with torchvision (not installed)
                 
                  extra_pos_embed_type="learnable")


def _inputs_cosmos(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),
        "timestep": _ts(timestep, batch),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "attention_mask": torch.ones(batch, TXT_LEN),
        "fps": 30,
    }


def _build_easyanimate():
    return _build("EasyAnimateTransformer3DModel", attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                  in_channels=4, mmdit_layers=2, num_layers=2, out_channels=4, patch_size=2, sample_height=60,
                  sample_width=90, text_embed_dim=TXT_DIM, time_embed_dim=8, time_position_encoding_type="3d_rope",
                  timestep_activation_fn="silu")


# ---------------------------------------------------------------------------
# HiDream-I1 (double + single stream blocks with MoE feed-forwards, per-block Llama features)
# ---------------------------------------------------------------------------
_HIDREAM_T5, _HIDREAM_LLAMA = 8, 4


def _build_hidream():
    return _build("HiDreamImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                  num_single_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                  caption_channels=[_HIDREAM_T5, _HIDREAM_LLAMA], text_emb_dim=TXT_DIM, num_routed_experts=2,
                  num_activated_experts=2, axes_dims_rope=(8, 4, 4), max_resolution=(16, 16),
                  llama_layers=(0, 1, 2, 3), force_inference_output=True)


def _inputs_hidream(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states_t5": _randn(g, batch, TXT_LEN, _HIDREAM_T5),
        # (Llama layers, batch, tokens, dim): one Llama layer's features per block
        "encoder_hidden_states_llama3": _randn(g, 4, batch, TXT_LEN, _HIDREAM_LLAMA),
        "pooled_embeds": _randn(g, batch, TXT_DIM),
        "timesteps": _ts(timestep, batch),
    }


# ---------------------------------------------------------------------------
# Hunyuan family: HunyuanImage 2.1, HunyuanVideo 1.5, HunyuanVideo-Framepack, Motif-Video
# ---------------------------------------------------------------------------
def _build_hunyuanimage():
    return _build("HunyuanImageTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=HEADS,
                  attention_head_dim=HEAD_DIM, num_layers=2, num_single_layers=2, num_refiner_layers=2,
                  mlp_ratio=2.0, patch_size=(1, 1), guidance_embeds=False, text_embed_dim=TXT_DIM,
                  rope_axes_dim=(8, 8))


def _inputs_hunyuanimage(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 4, 4),
        "timestep": _ts(timestep, batch),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN),
    }


_HV15_TXT2, _HV15_IMG = 8, 12


def _build_hunyuanvideo15():
    return _build("HunyuanVideo15Transformer3DModel", in_channels=4, out_channels=4, num_attention_heads=HEADS,
                  attention_head_dim=HEAD_DIM, num_layers=2, num_refiner_layers=2, mlp_ratio=2.0, patch_size=1,
                  patch_size_t=1, text_embed_dim=TXT_DIM, text_embed_2_dim=_HV15_TXT2, image_embed_dim=_HV15_IMG,
                  rope_axes_dim=ROPE_AXES, target_size=16, task_type="t2v")


def _inputs_hunyuanvideo15(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 2, 4, 4),
        "timestep": _ts(timestep, batch),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "encoder_hidden_states_2": _randn(g, batch, 4, _HV15_TXT2),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN),
        "encoder_attention_mask_2": torch.ones(batch, 4),
        "image_embeds": torch.zeros(batch, 3, _HV15_IMG),  # t2v: the pipeline passes zeros
    }


def _build_framepack():
    return _build("HunyuanVideoFramepackTransformer3DModel", in_channels=4, out_channels=4,
                  num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2, num_single_layers=2,
                  num_refiner_layers=2, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=TXT_DIM,
                  pooled_projection_dim=TXT_DIM, rope_axes_dim=ROPE_AXES, image_condition_type=None,
                  has_image_proj=True, image_proj_dim=TXT_DIM, has_clean_x_embedder=True)


def _inputs_framepack(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    f, hw = 2, 4
    return {
        "hidden_states": _randn(g, batch, 4, f, hw, hw),
        "timestep": _ts(timestep, batch),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "pooled_projections": _randn(g, batch, TXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN),
        "guidance": torch.full((batch,), 6000.0),  # pipeline: guidance_scale * 1000
        "image_embeds": _randn(g, batch, 4, TXT_DIM),
        "indices_latents": torch.arange(f),
        "latents_clean": _randn(g, batch, 4, 1, hw, hw),
        "indices_latents_clean": torch.arange(f, f + 1),
        "latents_history_2x": _randn(g, batch, 4, 2, hw, hw),
        "indices_latents_history_2x": torch.arange(f + 1, f + 3),
        "latents_history_4x": _randn(g, batch, 4, 4, hw, hw),
        "indices_latents_history_4x": torch.arange(f + 3, f + 7),
    }


def _build_motif_video():
    return _build("MotifVideoTransformer3DModel", in_channels=9, out_channels=4, num_attention_heads=HEADS,
                  attention_head_dim=HEAD_DIM, num_layers=2, num_single_layers=2, num_decoder_layers=0,
                  mlp_ratio=2.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", norm_type="layer_norm",
                  text_embed_dim=TXT_DIM, image_embed_dim=None, rope_axes_dim=ROPE_AXES)


def _inputs_motif_video(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        # 4 noisy + 4 condition latent channels + 1 mask channel
        "hidden_states": _randn(g, batch, 9, 2, 4, 4),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch),
    }


# ---------------------------------------------------------------------------
# Kandinsky 5 (text blocks + visual blocks; channels-last video latents)
# ---------------------------------------------------------------------------
def _fill_zero_init(model: torch.nn.Module, *keys: str, std: float = 0.02) -> torch.nn.Module:
    """Give zero-initialised parameters whose name contains one of ``keys`` small random values (seeded).

    Kandinsky 5 and ERNIE-Image zero-initialise their adaLN modulation (ERNIE also its output
    projection), which makes a freshly built model ignore the timestep (or output zeros); a trained
    model does not."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in keys) and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _build_kandinsky5():
    return _fill_zero_init(_build("Kandinsky5Transformer3DModel", in_visual_dim=4, in_text_dim=TXT_DIM, in_text_dim2=TXT_DIM,
                  time_dim=INNER, out_visual_dim=4, patch_size=(1, 2, 2), model_dim=INNER, ff_dim=64,
                  num_text_blocks=2, num_visual_blocks=2, axes_dims=ROPE_AXES, visual_cond=False), "modulation")


def _inputs_kandinsky5(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    f, hw = 2, 8
    return {
        "hidden_states": _randn(g, batch, f, hw, hw, 4),  # (B, F, H, W, C)
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "pooled_projections": _randn(g, batch, TXT_DIM),
        "timestep": _ts(timestep, batch),
        "visual_rope_pos": [torch.arange(f), torch.arange(hw // 2), torch.arange(hw // 2)],
        "text_rope_pos": torch.arange(TXT_LEN),
    }


# ---------------------------------------------------------------------------
# Sana-Video (linear-attention video DiT)
# ---------------------------------------------------------------------------
def _build_sana_video():
    return _build("SanaVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=HEADS,
                  attention_head_dim=HEAD_DIM, num_layers=2, num_cross_attention_heads=HEADS,
                  cross_attention_head_dim=HEAD_DIM, cross_attention_dim=INNER, caption_channels=TXT_DIM,
                  mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), norm_elementwise_affine=False,
                  norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


# ---------------------------------------------------------------------------
# LTX-2 (joint audio + video streams)
# ---------------------------------------------------------------------------
_LTX2_F, _LTX2_HW, _LTX2_AF = 2, 4, 5


def _build_ltx2():
    return _build("LTX2VideoTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                  num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, cross_attention_dim=INNER,
                  audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=HEADS,
                  audio_attention_head_dim=8, audio_cross_attention_dim=HEADS * 8, num_layers=2,
                  qk_norm="rms_norm_across_heads", caption_channels=TXT_DIM, rope_double_precision=False)


def _inputs_ltx2(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, _LTX2_F * _LTX2_HW * _LTX2_HW, 4),
        "audio_hidden_states": _randn(g, batch, _LTX2_AF, 4),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "audio_encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN, dtype=torch.bool),
        "num_frames": _LTX2_F,
        "height": _LTX2_HW,
        "width": _LTX2_HW,
        "audio_num_frames": _LTX2_AF,
        "fps": 25.0,
    }


# ---------------------------------------------------------------------------
# PRX (Photon), Z-Image, OmniGen
# ---------------------------------------------------------------------------
def _build_prx():
    return _build("PRXTransformer2DModel", in_channels=4, patch_size=2, context_in_dim=TXT_DIM, hidden_size=INNER,
                  mlp_ratio=2.0, num_heads=HEADS, depth=2, axes_dim=[8, 8], theta=10_000)


def _build_zimage():
    return _build("ZImageTransformer2DModel", all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=INNER,
                  n_layers=2, n_refiner_layers=2, n_heads=HEADS, n_kv_heads=HEADS, qk_norm=True,
                  cap_feat_dim=TXT_DIM, rope_theta=256.0, t_scale=1000.0, axes_dims=[4, 6, 6],
                  axes_lens=[256, 32, 32])


def _inputs_zimage(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        # Z-Image takes per-sample lists: latents (C, F, H, W) and caption features (L, D)
        "x": [_randn(g, 4, 1, 8, 8) for _ in range(batch)],
        "cap_feats": [_randn(g, TXT_LEN, TXT_DIM) for _ in range(batch)],
        # ZImagePipeline passes (1000 - t) / 1000
        "t": 1.0 - _ts(timestep, batch, 1e-3),
    }


def _out_list(o) -> torch.Tensor:
    sample = o.sample if hasattr(o, "sample") else o[0]
    return torch.stack(list(sample)) if isinstance(sample, (list, tuple)) else sample


_OMNI_TXT = 8


def _build_omnigen():
    return _build("OmniGenTransformer2DModel", hidden_size=INNER, num_attention_heads=HEADS,
                  num_key_value_heads=HEADS, intermediate_size=64, num_layers=2, pad_token_id=0, vocab_size=100,
                  in_channels=4, time_step_dim=8,
                  rope_scaling={"long_factor": [1.0] * (HEAD_DIM // 2), "short_factor": [1.0] * (HEAD_DIM // 2)})


def _inputs_omnigen(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    n_img = 16  # 8x8 latent, patch 2
    seq = _OMNI_TXT + 1 + n_img  # text tokens, time token, image tokens
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "timestep": _ts(timestep, batch, 1e-3),  # OmniGenPipeline passes t / 1000
        "input_ids": torch.randint(1, 100, (batch, _OMNI_TXT), generator=g),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": torch.ones(batch, seq, seq),
        "position_ids": torch.arange(seq)[None].repeat(batch, 1),
    }


# ---------------------------------------------------------------------------
# Image DiTs with LLM text features: ERNIE-Image, Krea 2, Ideogram 4, NucleusMoE-Image, Qwen-Image 2.1,
# JoyImage-Edit, GLM-Image, Bria FIBO, Flux 3
# ---------------------------------------------------------------------------
def _build_ernie_image():
    model = _build("ErnieImageTransformer2DModel", hidden_size=INNER, num_attention_heads=HEADS, num_layers=2,
                   ffn_hidden_size=64, in_channels=4, out_channels=4, patch_size=1, text_in_dim=TXT_DIM,
                   rope_theta=256, rope_axes_dim=(8, 4, 4), eps=1e-6, qk_layernorm=True)
    return _fill_zero_init(model, "adaLN_modulation", "final_linear")


def _inputs_ernie_image(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 4, 4),
        "timestep": _ts(timestep, batch),
        "text_bth": _randn(g, batch, TXT_LEN, TXT_DIM),
        "text_lens": torch.full((batch,), TXT_LEN),
    }


_KREA_TXT_LAYERS, _KREA_TXT_LEN, _KREA_GRID = 3, 4, 4


def _build_krea2():
    return _build("Krea2Transformer2DModel", in_channels=16, num_layers=2, attention_head_dim=8,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, timestep_embed_dim=8,
                  text_hidden_dim=TXT_DIM, num_text_layers=_KREA_TXT_LAYERS, text_num_attention_heads=2,
                  text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=2,
                  num_refiner_text_blocks=2, axes_dims_rope=(4, 2, 2), rope_theta=1000.0, norm_eps=1e-5)


def _inputs_krea2(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    n_img = _KREA_GRID * _KREA_GRID
    pos = torch.zeros(_KREA_TXT_LEN + n_img, 3)
    pos[_KREA_TXT_LEN:, 1] = torch.arange(_KREA_GRID).repeat_interleave(_KREA_GRID)
    pos[_KREA_TXT_LEN:, 2] = torch.arange(_KREA_GRID).repeat(_KREA_GRID)
    return {
        "hidden_states": _randn(g, batch, n_img, 16),
        # (B, tokens, text-encoder layers, dim)
        "encoder_hidden_states": _randn(g, batch, _KREA_TXT_LEN, _KREA_TXT_LAYERS, TXT_DIM),
        "timestep": _ts(timestep, batch, 1e-3),
        "position_ids": pos,
        "encoder_attention_mask": torch.ones(batch, _KREA_TXT_LEN, dtype=torch.bool),
    }


_IDEO_TXT, _IDEO_GRID, _IDEO_LLM = 4, 4, 24


def _build_ideogram4():
    return _build("Ideogram4Transformer2DModel", in_channels=16, num_layers=2, attention_head_dim=8,
                  num_attention_heads=4, intermediate_size=32, adaln_dim=16, llm_features_dim=_IDEO_LLM,
                  rope_theta=10_000, mrope_section=(2, 1, 1), norm_eps=1e-5)


def _inputs_ideogram4(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET,
        LLM_TOKEN_INDICATOR,
        OUTPUT_IMAGE_INDICATOR,
    )

    g = _gen(seed)
    n_img = _IDEO_GRID * _IDEO_GRID
    seq = _IDEO_TXT + n_img
    hidden = torch.zeros(batch, seq, 16)
    hidden[:, _IDEO_TXT:] = _randn(g, batch, n_img, 16)
    text = torch.zeros(batch, seq, _IDEO_LLM)
    text[:, :_IDEO_TXT] = _randn(g, batch, _IDEO_TXT, _IDEO_LLM)
    pos = torch.zeros(batch, seq, 3, dtype=torch.long)
    pos[:, :_IDEO_TXT] = torch.arange(_IDEO_TXT)[:, None]
    pos[:, _IDEO_TXT:, 0] = IMAGE_POSITION_OFFSET
    pos[:, _IDEO_TXT:, 1] = torch.arange(_IDEO_GRID).repeat_interleave(_IDEO_GRID) + IMAGE_POSITION_OFFSET
    pos[:, _IDEO_TXT:, 2] = torch.arange(_IDEO_GRID).repeat(_IDEO_GRID) + IMAGE_POSITION_OFFSET
    indicator = torch.full((batch, seq), OUTPUT_IMAGE_INDICATOR, dtype=torch.long)
    indicator[:, :_IDEO_TXT] = LLM_TOKEN_INDICATOR
    return {
        "hidden_states": hidden,
        "encoder_hidden_states": text,
        "timestep": _ts(timestep, batch, 1e-3),
        "position_ids": pos,
        "segment_ids": torch.ones(batch, seq, dtype=torch.long),
        "indicator": indicator,
    }


def _build_nucleusmoe():
    model = _build("NucleusMoEImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4,
                   num_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TXT_DIM,
                   axes_dims_rope=(8, 4, 4), moe_enabled=True, dense_moe_strategy="leave_first_block_dense",
                   num_experts=4, moe_intermediate_dim=16,
                   capacity_factors=[1.0, 1.0])  # expert choice: each expert takes ceil(tokens / 4) tokens
    # SwiGLUExperts allocates its expert weights with torch.empty (a checkpoint fills them): give them
    # seeded values, or the build is not deterministic (and uninitialised memory can hold NaNs).
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")) and ".experts." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _inputs_qwenlike(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    h = w = 4
    return {
        "hidden_states": _randn(g, batch, h * w, 16),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "encoder_hidden_states_mask": torch.ones(batch, TXT_LEN, dtype=torch.long),
        "timestep": _ts(timestep, batch, 1e-3),
        "img_shapes": [(1, h, w)] * batch,
    }


def _build_qwenimage21():
    return _build("QwenImage21Transformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, context_in_dim=TXT_DIM, mlp_ratio=2,
                  axes_dims_rope=ROPE_AXES)


def _inputs_qwenimage21(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    h = w = 4
    img_mask = torch.zeros(batch, TXT_LEN + h * w // 4, dtype=torch.bool)  # one vision slot per 2x2 latents
    img_mask[:, TXT_LEN:] = True
    return {
        "hidden_states": _randn(g, batch, h * w, 4),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "encoder_hidden_states_mask": torch.ones(batch, TXT_LEN, dtype=torch.long),
        "timestep": _ts(timestep, batch, 1e-3),
        "img_shapes": [[(1, h, w)]] * batch,
        "img_mask": img_mask,
    }


def _build_joyimage_edit():
    return _build("JoyImageEditTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=INNER,
                  num_attention_heads=HEADS, text_dim=TXT_DIM, num_layers=2, rope_dim_list=list(ROPE_AXES), theta=256)


def _inputs_joyimage_edit(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 1, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "timestep": _ts(timestep, batch),
    }


def _build_glm_image():
    return _build("GlmImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, text_embed_dim=TXT_DIM, time_embed_dim=16,
                  condition_dim=8, prior_vq_quantizer_codebook_size=64)


def _inputs_glm_image(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "prior_token_id": torch.randint(0, 64, (batch, 16), generator=g),  # one prior token per latent patch
        "prior_token_drop": torch.zeros(batch, dtype=torch.bool),
        "timestep": _ts(timestep, batch),
        "target_size": torch.tensor([[64.0, 64.0]]).repeat(batch, 1),
        "crop_coords": torch.tensor([[0.0, 0.0]]).repeat(batch, 1),
    }


_FIBO_TXT_ENC = 8


def _build_bria_fibo():
    return _build("BriaFiboTransformer2DModel", patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TXT_DIM,
                  text_encoder_dim=_FIBO_TXT_ENC, pooled_projection_dim=None, axes_dims_rope=list(ROPE_AXES))


def _inputs_bria_fibo(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    out = _inputs_chroma(timestep, batch, seed)
    g = _gen(seed + 1)
    # one text-encoder layer's features per block (2 double + 2 single)
    out["text_encoder_layers"] = [_randn(g, batch, TXT_LEN, _FIBO_TXT_ENC) for _ in range(4)]
    return out


def _build_flux3():
    return _build("Flux3Transformer2DModel", in_channels=16, cond_in_channels=16, num_layers=2, num_single_layers=2,
                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TXT_DIM,
                  timestep_channels=32, axes_dims_rope=(4, 4, 4, 4))


def _inputs_flux3(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    out = _inputs_flux2(timestep, batch, seed)
    out["img_ids"], out["txt_ids"] = out["img_ids"][0], out["txt_ids"][0]  # (seq, 4), shared by the batch
    return out


def _build_joyimage_edit_plus():
    return _build("JoyImageEditPlusTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=INNER,
                  num_attention_heads=HEADS, text_dim=TXT_DIM, num_layers=2, rope_dim_list=list(ROPE_AXES),
                  theta=256)


def _inputs_joyimage_edit_plus(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    # pre-patchified latents (B, patches, C, pt, ph, pw): a 4x4-patch target + a 4x4-patch reference image
    shapes = [(1, 4, 4), (1, 4, 4)]
    n = sum(t * h * w for t, h, w in shapes)
    return {
        "hidden_states": _randn(g, batch, n, 4, 1, 2, 2),
        "timestep": _ts(timestep, batch),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "encoder_hidden_states_mask": torch.ones(batch, TXT_LEN, dtype=torch.long),
        "shape_list": [shapes] * batch,
    }


# ---------------------------------------------------------------------------
# Kandinsky 6 (video + optional audio streams); generic Transformer2DModel (patched adaLN-Zero DiT)
# ---------------------------------------------------------------------------
def _build_kandinsky6():
    return _build("Kandinsky6Transformer3DModel", in_visual_dim=4, out_visual_dim=4, in_text_dim=TXT_DIM,
                  in_text_dim2=TXT_DIM, time_dim=16, patch_size=(1, 2, 2), model_dim=INNER, ff_dim=64,
                  num_text_blocks=2, num_visual_blocks=2, axes_dims=ROPE_AXES, visual_cond=True, in_audio_dim=4,
                  out_audio_dim=4)


def _inputs_kandinsky6(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        # (B, F, H, W, 2C + 1): noisy latents, condition latents and a mask channel, channels last
        "hidden_states": _randn(g, batch, 2, 4, 4, 2 * 4 + 1),
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "pooled_projections": _randn(g, batch, TXT_DIM),
        "timestep": _ts(timestep, batch),
    }


def _build_transformer2d():
    return _build("Transformer2DModel", num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                  out_channels=8, num_layers=2, sample_size=8, patch_size=2, norm_type="ada_norm_zero",
                  num_embeds_ada_norm=1000, norm_num_groups=4)


def _build_kandinsky6_sr():
    return _build("Kandinsky6SRTransformer3DModel", in_visual_dim=4, out_visual_dim=4, time_dim=16,
                  patch_size=(1, 1, 1), model_dim=INNER, ff_dim=64, num_visual_blocks=2, axes_dims=ROPE_AXES,
                  scale_factor=(1.0, 2.0, 2.0), nabla_threshold=0.8, nabla_window=(3, 3, 3))


def _inputs_kandinsky6_sr(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    # NABLA (flex) attention groups 8x8 token tiles: the smallest grid is one 8x8 tile per frame
    # channels last: low-res latents, upsampled condition latents and a mask channel (2C + 1)
    return {"hidden_states": _randn(g, batch, 1, 8, 8, 2 * 4 + 1), "timestep": _ts(timestep, batch)}


# ---------------------------------------------------------------------------
# Audio DiTs: ACE-Step 1.5, MiniMax Music 3
# ---------------------------------------------------------------------------
_ACE_AC = 8


def _build_ace_step():
    return _build("AceStepTransformer1DModel", hidden_size=INNER, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=1, head_dim=HEAD_DIM, in_channels=3 * _ACE_AC,
                  audio_acoustic_hidden_dim=_ACE_AC, patch_size=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                  sliding_window=16)


def _inputs_ace_step(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    t = _ts(timestep, batch, 1e-3)
    return {
        "hidden_states": _randn(g, batch, 16, _ACE_AC),
        "timestep": t,
        "timestep_r": t,  # timestep_r == timestep: plain (non mean-flow) sampling
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, INNER),
        "context_latents": _randn(g, batch, 16, 2 * _ACE_AC),
    }


def _build_minimax_music3():
    return _build("MiniMaxMusic3Transformer1DModel", in_channels=8, condition_dim=TXT_DIM, num_layers=2,
                  num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, ff_inner_dim=64, rotary_dim=4,
                  fourier_embedding_dim=8)


def _inputs_minimax_music3(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 8, 24),
        "encoder_hidden_states": _randn(g, batch, 24, TXT_DIM),
        "timestep": _ts(timestep, batch, 1e-3),
    }


# ---------------------------------------------------------------------------
# Pipeline-only inputs: Bria FIBO 2 (gist-token perceiver), MiniMax-H3 (one packed text + audio + video
# sequence)
# ---------------------------------------------------------------------------
_FIBO2_TXT = 6


def _build_bria_fibo2():
    model = _build("BriaFibo2Transformer2DModel", in_channels=4, patch_size=2, dim=INNER, n_layers=2,
                   n_refiner_layers=2, n_heads=HEADS, cap_feat_dim=TXT_DIM, injection_layer_ids=(1,),
                   perceiver_num_layers=2, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
                   gist_min_text_len=4, gist_max_text_len=16, axes_dims=ROPE_AXES, axes_lens=(16, 16, 16))
    # the injection block's cross-attention gate starts at zero (tanh(0) = 0: text ignored); a trained one is not
    _fill_zero_init(model, "cross_attn_gate", std=0.5)
    # The perceiver slices its query parameter (``latent_queries[:n].expand(...)``); under no_grad such a view
    # still has requires_grad=True but no grad_fn, which FlopCounterMode's module tracker rejects. Freezing it
    # changes no output.
    model.perceiver.latent_queries.requires_grad_(False)
    return model


def _inputs_bria_fibo2(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "timestep": _ts(timestep, batch, 1e-3),  # noise level in [0, 1]
        # text-encoder bundles: one for the perceiver (gist tokens), one per injection block
        "encoder_hidden_states": _randn(g, batch, 2, _FIBO2_TXT, TXT_DIM),
    }


_H3_TXT, _H3_AUDIO, _H3_VIDEO, _H3_AUDIO_C = 4, 6, 16, 6


def _build_minimax_h3():
    return _build("MiniMaxH3Transformer3DModel", num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                  hidden_size=24, num_layers=2, num_refiner_layers=2, ffn_dim=32, in_channels=4,
                  audio_in_channels=_H3_AUDIO_C, patch_size=(1, 2, 2), text_dim=TXT_DIM, freq_dim=8,
                  time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2)


def _inputs_minimax_h3(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    # the packed layout the pipeline builds (t2va): text rows, audio rows, target video rows (a 1 x 4 x 4
    # grid of 2x2 patches); one shared layout for every batch item
    seq = _H3_TXT + _H3_AUDIO + _H3_VIDEO
    text = torch.arange(_H3_TXT)
    audio = torch.arange(_H3_TXT, _H3_TXT + _H3_AUDIO)
    video = torch.arange(_H3_TXT + _H3_AUDIO, seq)
    tags = torch.zeros(seq, dtype=torch.long)  # 0 video, 1 text, 2 audio
    tags[text], tags[audio] = 1, 2
    pos = torch.zeros(seq, 3)
    pos[:, 0] = torch.arange(seq, dtype=torch.float32)
    pos[video, 1] = torch.arange(4.0).repeat_interleave(4)
    pos[video, 2] = torch.arange(4.0).repeat(4)
    return {
        "hidden_states": _randn(g, batch, _H3_VIDEO, 4 * 2 * 2),  # patchified video rows
        "audio_hidden_states": _randn(g, batch, _H3_AUDIO, _H3_AUDIO_C),
        "encoder_hidden_states": _randn(g, batch, _H3_TXT, TXT_DIM),
        # the distinct timesteps of the sequence in [0, 1] (video and audio schedules at the same step:
        # one value) and each row's index into them
        "timestep": _ts(timestep, 1, 1e-3),
        "timestep_indices": torch.zeros(seq, dtype=torch.long),
        "token_tags": tags,
        "position_ids": pos,
        "video_indices": video,
        "audio_indices": audio,
        "text_indices": text,
    }


# ---------------------------------------------------------------------------
# Wan-Animate-2: generation pass (kv_cache_mode="cached") against a reference KV cache
# ---------------------------------------------------------------------------
_WA2_LAYERS, _WA2_REF_F, _WA2_HW = 2, 2, 4  # reference latent frames, latent height = width


def _build_wan_animate2():
    return _build("WanAnimate2Transformer3DModel", patch_size=(1, 2, 2), text_len=TXT_LEN, in_dim=4 + 8, dim=INNER,
                  ffn_dim=64, freq_dim=32, text_dim=TXT_DIM, out_dim=4, num_heads=HEADS, num_layers=_WA2_LAYERS,
                  cross_attn_norm=True, use_img_emb=True)  # the CLIP projection is hard-wired to 1280 features


def _inputs_wan_animate2(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    g = _gen(seed)
    frames = _WA2_REF_F + 1  # the generation stream has one extra latent frame (the reference image's slot)
    grid = _WA2_HW // 2
    ref_len = _WA2_REF_F * grid * grid
    # The pipeline fills the cache with a reference pass (kv_cache_mode="extract") over the driving-video
    # latents, once per segment; here random pre-RoPE reference keys / values, (B, tokens, heads, head_dim),
    # stand in for it (a fresh cache per call: the generation pass only reads it).
    cache = WanAnimate2KVCache(_WA2_LAYERS)
    for layer in cache.layer_caches:
        layer.store(_randn(g, batch, ref_len, HEADS, HEAD_DIM), _randn(g, batch, ref_len, HEADS, HEAD_DIM))
    return {
        "hidden_states": [_randn(g, 4, frames, _WA2_HW, _WA2_HW) for _ in range(batch)],
        "timestep": _ts(timestep, batch),
        "encoder_hidden_states": [_randn(g, TXT_LEN, TXT_DIM) for _ in range(batch)],
        # condition latents + a 4-channel i2v mask
        "condition_latents": [_randn(g, 8, frames, _WA2_HW, _WA2_HW) for _ in range(batch)],
        "encoder_hidden_states_image": _randn(g, batch, 4, 1280),
        "kv_cache": cache,
        "kv_cache_mode": "cached",
        "seq_len": frames * grid * grid,
        "reference_grid_sizes": torch.tensor([[_WA2_REF_F, grid, grid]] * batch),
        # the full video the in-context block mask is built over: 5 frames of 32 x 32 pixels (one segment)
        "origin_len": 4 * _WA2_REF_F - 3,
        "origin_area": [8 * _WA2_HW, 8 * _WA2_HW],
    }


# ---------------------------------------------------------------------------
# SANA-WM (camera-controlled world model: GDN linear + softmax UCPE camera attention)
# ---------------------------------------------------------------------------
_SWM_F, _SWM_HW, _SWM_PLUCKER = 4, 4, 8


def _build_sana_wm():
    # 2 blocks with softmax_every_n=2: block 0 runs the GDN camera attention, block 1 the softmax one
    model = _build("SanaWMTransformer3DModel", in_channels=4, num_layers=2, hidden_size=INNER,
                   num_attention_heads=HEADS, patch_size=(1, 1, 1), softmax_every_n=2, linear_head_dim=HEAD_DIM,
                   t_kernel_size=3, conv_kernel_size=4, caption_channels=TXT_DIM, mlp_ratio=2.0,
                   chunk_plucker_channels=_SWM_PLUCKER, chunk_plucker_post_attn_blocks=2)
    # zero-initialised (a checkpoint fills them): the GDN short convolutions (a zero key kills the whole GDN
    # branch) and the Plucker embedder (camera rays would add nothing)
    _fill_zero_init(model, "conv_k", std=0.5)
    return _fill_zero_init(model, "plucker_embedder")


def _sana_wm_camera(batch: int, frames: int, hw: int) -> torch.Tensor:
    # (B, F, 20): a flat 4x4 camera-to-world matrix (forward translation), then pinhole [fx, fy, cx, cy]
    c2w = torch.eye(4).repeat(batch, frames, 1, 1)
    c2w[..., 2, 3] = torch.arange(frames, dtype=torch.float32) * 0.1
    intrinsics = torch.tensor([float(hw), float(hw), hw / 2, hw / 2]).expand(batch, frames, 4)
    return torch.cat([c2w.flatten(start_dim=-2), intrinsics], dim=-1)


def _inputs_sana_wm(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    f, hw = _SWM_F, _SWM_HW
    return {
        "hidden_states": _randn(g, batch, 4, f, hw, hw),
        # per-frame timesteps (B, 1, F), LTX style (the model truncates them to integers)
        "timestep": _ts(timestep, batch)[:, None, None].expand(batch, 1, f).contiguous(),
        "encoder_hidden_states": _randn(g, batch, 1, TXT_LEN, TXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN, dtype=torch.long),
        "camera_conditions": _sana_wm_camera(batch, f, hw),
        "chunk_plucker": _randn(g, batch, _SWM_PLUCKER, f, hw, hw),
    }


# ---------------------------------------------------------------------------
# SANA-WM stage-2 refiner (LTX-2 blocks, chunk-causal AR denoising against a sink + history KV cache)
# ---------------------------------------------------------------------------
_SWMR_HW, _SWMR_SINK, _SWMR_HIST, _SWMR_BLOCK, _SWMR_FPS = 4, 1, 2, 2, 24.0  # frames: sink, history, active


def _build_sana_wm_refiner():
    return _build("SanaWMLTX2RefinerTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                  num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, cross_attention_dim=INNER,
                  audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=HEADS,
                  audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2,
                  qk_norm="rms_norm_across_heads", caption_channels=TXT_DIM, rope_double_precision=False)


def _sana_wm_refiner_rope(batch: int, frames: list[int], hw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) video RoPE of absolute latent frames ``frames`` on an ``hw x hw`` grid, for the build
    above (LTX-2 defaults: pixel-space patch bounds, causal offset 1, time in seconds at ``_SWMR_FPS``)."""
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2AudioVideoRotaryPosEmbed

    scale = (8, 32, 32)
    rope = SanaWMLTX2AudioVideoRotaryPosEmbed(dim=INNER, base_num_frames=20, base_height=2048, base_width=2048,
                                              scale_factors=scale, causal_offset=1, modality="video",
                                              double_precision=False, num_attention_heads=HEADS)
    grid = torch.stack(torch.meshgrid(torch.tensor(frames, dtype=torch.float32), torch.arange(float(hw)),
                                      torch.arange(float(hw)), indexing="ij"))  # (3, F, H, W) patch starts
    bounds = torch.stack([grid, grid + 1.0], dim=-1).flatten(1, 3)  # (3, tokens, 2): [start, end) per axis
    pixel = bounds * torch.tensor(scale, dtype=torch.float32).view(3, 1, 1)
    pixel[0] = (pixel[0] + 1 - scale[0]).clamp(min=0) / _SWMR_FPS
    return rope(pixel[None].repeat(batch, 1, 1, 1), device=torch.device("cpu"))


def _inputs_sana_wm_refiner(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache

    g = _gen(seed)
    per_frame = _SWMR_HW * _SWMR_HW
    n_active = _SWMR_BLOCK * per_frame
    block_start = _SWMR_SINK + _SWMR_HIST
    # One denoising step of the second AR block: the pipeline captures the sink's pre-RoPE K/V from the
    # stage-1 latents (kv_cache_mode="capture_pre_rope") and the refined first block's post-RoPE K/V
    # ("inject_and_capture_post_rope"); random K/V (B, tokens, inner) stand in for those capture passes. The
    # sink RoPE slides to sit right before the history (offset block_start - history - sink = 0).
    cache = SanaWMRefinerKVCache(2)
    for layer in cache.layer_caches:
        layer.store_sink(_randn(g, batch, _SWMR_SINK * per_frame, INNER), _randn(g, batch, _SWMR_SINK * per_frame, INNER))
        layer.store_history(_randn(g, batch, _SWMR_HIST * per_frame, INNER),
                            _randn(g, batch, _SWMR_HIST * per_frame, INNER))
    sink_offset = block_start - _SWMR_HIST - _SWMR_SINK
    cache.sink_pe = _sana_wm_refiner_rope(batch, list(range(sink_offset, sink_offset + _SWMR_SINK)), _SWMR_HW)
    return {
        "hidden_states": _randn(g, batch, n_active, 4),  # the active block's packed latents
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        # per-token timestep, already scaled: sigma * timestep_scale_multiplier (1000) = t
        "timestep": _ts(timestep, batch)[:, None].expand(batch, n_active).contiguous(),
        "video_rotary_emb": _sana_wm_refiner_rope(batch, list(range(block_start, block_start + _SWMR_BLOCK)),
                                                  _SWMR_HW),
        "encoder_attention_mask": torch.ones(batch, TXT_LEN),
        "kv_cache": cache,
        "kv_cache_mode": "inject",
    }


# ---------------------------------------------------------------------------
# AnyFlow-FAR (autoregressive chunked AnyFlow: full-resolution recent chunks + FAR-compressed older chunks)
# ---------------------------------------------------------------------------
_FAR_PARTITION, _FAR_FULL_LIMIT, _FAR_HW = (1, 1, 1), 2, 8


def _build_anyflow_far():
    return _build("AnyFlowFARTransformer3DModel", patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4),
                  full_chunk_limit=_FAR_FULL_LIMIT, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                  in_channels=4, out_channels=4, text_dim=TXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2,
                  cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25, deltatime_type="r",
                  chunk_partition=_FAR_PARTITION)


def _inputs_anyflow_far(timestep: float = 500.0, batch: int = 1, seed: int = 0) -> dict:
    g = _gen(seed)
    partition = list(_FAR_PARTITION)
    chunk = partition[-1]
    full_tpf = (_FAR_HW // 2) ** 2  # tokens per frame: (1, 2, 2) patches ...
    comp_tpf = (_FAR_HW // 4) ** 2  # ... and FAR-compressed (1, 4, 4) patches
    # A denoising step of the last chunk (autoregressive inference path): the earlier chunks are in the KV
    # cache -- the newest one (full_chunk_limit - 1 of them) at full resolution, the older one compressed. The
    # pipeline fills the cache with one cache-prefill pass (kv_cache_flag["is_cache_step"]) per finished chunk;
    # random pre-RoPE keys / values stand in for those passes. The cache is allocated as the pipeline does:
    # (2 = K/V, B, heads, tokens, head_dim) per block.
    n_full = _FAR_FULL_LIMIT * max(partition) * full_tpf
    n_comp = (len(partition) - _FAR_FULL_LIMIT + 1) * max(partition) * comp_tpf
    kv_cache = {
        i: {"full_cache": _randn(g, 2, batch, HEADS, n_full, HEAD_DIM),
            "compressed_cache": _randn(g, 2, batch, HEADS, n_comp, HEAD_DIM)}
        for i in range(2)
    }
    t = _ts(timestep, batch)[:, None].expand(batch, chunk).contiguous()  # per-frame timesteps of the chunk
    return {
        "hidden_states": _randn(g, batch, chunk, 4, _FAR_HW, _FAR_HW),  # (B, F, C, H, W): the current chunk
        "timestep": t,
        "r_timestep": t * 0.5,
        "encoder_hidden_states": _randn(g, batch, TXT_LEN, TXT_DIM),
        "chunk_partition": partition,  # the chunks so far, the current one last
        "kv_cache": kv_cache,
        # fresh per call (the model writes its token counts into it; the pipeline passes a deep copy)
        "kv_cache_flag": {"num_cached_chunks": len(partition) - 1, "is_cache_step": False},
    }


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
def _entry(name: str, build, inputs, video: bool, output=_out_sample) -> ZooEntry:
    return ZooEntry(name=name, build=build, inputs=inputs, video=video, output=output)


MORE_ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        _entry("chronoedit", _build_chronoedit, _inputs_wan, True),
        _entry("skyreels_v2", _build_skyreels_v2, _inputs_wan, True),
        _entry("wan_vace", _build_wan_vace, _inputs_wan_vace, True),
        _entry("anyflow", _build_anyflow, _inputs_anyflow, True),
        _entry("helios", _build_helios, _inputs_helios, True),
        _entry("wan_animate", _build_wan_animate, _inputs_wan_animate, True),
        _entry("bria", _build_bria, _inputs_chroma, False),
        _entry("longcat_image", _build_longcat_image, _inputs_chroma, False),
        _entry("ovis_image", _build_ovis_image, _inputs_chroma, False),
        _entry("flux2", _build_flux2, _inputs_flux2, False),
        _entry("cogview3plus", _build_cogview3plus, _inputs_cogview4, False),
        _entry("consisid", _build_consisid, _inputs_consisid, True),
        _entry("cosmos", _build_cosmos, _inputs_cosmos, True),
        _entry("easyanimate", _build_easyanimate, _inputs_wan, True),
        _entry("hidream", _build_hidream, _inputs_hidream, False),
        _entry("hunyuanimage", _build_hunyuanimage, _inputs_hunyuanimage, False),
        _entry("hunyuanvideo15", _build_hunyuanvideo15, _inputs_hunyuanvideo15, True),
        _entry("framepack", _build_framepack, _inputs_framepack, True),
        _entry("motif_video", _build_motif_video, _inputs_motif_video, True),
        _entry("kandinsky5", _build_kandinsky5, _inputs_kandinsky5, True),
        _entry("sana_video", _build_sana_video, _inputs_wan, True),
        _entry("ltx2", _build_ltx2, _inputs_ltx2, True),
        _entry("prx", _build_prx, _inputs_auraflow, False),
        _entry("zimage", _build_zimage, _inputs_zimage, False, _out_list),
        _entry("omnigen", _build_omnigen, _inputs_omnigen, False),
        _entry("ernie_image", _build_ernie_image, _inputs_ernie_image, False),
        _entry("krea2", _build_krea2, _inputs_krea2, False),
        _entry("ideogram4", _build_ideogram4, _inputs_ideogram4, False),
        _entry("nucleusmoe_image", _build_nucleusmoe, _inputs_qwenlike, False),
        _entry("qwenimage21", _build_qwenimage21, _inputs_qwenimage21, False),
        _entry("joyimage_edit", _build_joyimage_edit, _inputs_joyimage_edit, False),
        _entry("glm_image", _build_glm_image, _inputs_glm_image, False),
        _entry("bria_fibo", _build_bria_fibo, _inputs_bria_fibo, False),
        _entry("flux3", _build_flux3, _inputs_flux3, False),
        _entry("joyimage_edit_plus", _build_joyimage_edit_plus, _inputs_joyimage_edit_plus, False),
        _entry("kandinsky6", _build_kandinsky6, _inputs_kandinsky6, True),
        _entry("kandinsky6_sr", _build_kandinsky6_sr, _inputs_kandinsky6_sr, True),
        _entry("transformer2d", _build_transformer2d, _inputs_dit, False),
        _entry("ace_step", _build_ace_step, _inputs_ace_step, False),
        _entry("minimax_music3", _build_minimax_music3, _inputs_minimax_music3, False),
        _entry("bria_fibo2", _build_bria_fibo2, _inputs_bria_fibo2, False),
        _entry("minimax_h3", _build_minimax_h3, _inputs_minimax_h3, True),
        _entry("wan_animate2", _build_wan_animate2, _inputs_wan_animate2, True, _out_list),
        _entry("sana_wm", _build_sana_wm, _inputs_sana_wm, True),
        _entry("sana_wm_refiner", _build_sana_wm_refiner, _inputs_sana_wm_refiner, True),
        _entry("anyflow_far", _build_anyflow_far, _inputs_anyflow_far, True),
    ]
}


if __name__ == "__main__":
    import sys
    import time

    from adacache_lab.zoo import block_lists

    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(MORE_ZOO)
    for name in names:
        entry = MORE_ZOO[name]
        try:
            model = entry.build()
            n_params = sum(p.numel() for p in model.parameters())
            lines = []
            for batch in (1, 2):
                kwargs = entry.inputs(timestep=500.0, batch=batch)
                with torch.no_grad():
                    entry.output(model(**kwargs))
                    t0 = time.perf_counter()
                    out = entry.output(model(**kwargs))
                    dt = (time.perf_counter() - t0) * 1e3
                assert torch.isfinite(out).all(), name
                lines.append(f"b={batch} out={tuple(out.shape)} {dt:.1f} ms")
            with torch.no_grad():
                o1 = entry.output(model(**entry.inputs(timestep=999.0)))
                o2 = entry.output(model(**entry.inputs(timestep=900.0)))
            dep = "t-dep" if not torch.equal(o1, o2) else "T-INDEP!"
            blocks = ", ".join(f"{n}[{k}]" for n, k in block_lists(model))
            print(f"{name:16s} params={n_params:7d}  " + "  ".join(lines) + f" {dep} blocks: {blocks}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"{name:16s} FAILED {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
