"""The reference video DiT: diffusers' ``LatteTransformer3DModel`` at a small config, in pixel space
(8x8-pixel patches; optionally on the latents of our own per-frame autoencoder, :mod:`.autoencoder`),
conditioned on our caption tokens through a small learned caption encoder.

Caching quality can only be judged on a trained model; this one is small enough to train on a CPU
(``adacache_lab.reference.train``) and ships as one safetensors file (``weights.safetensors``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .autoencoder import FrameAutoencoder
from .data import MAX_TOKENS, PAD_ID, VOCAB


@dataclass(frozen=True)
class ReferenceConfig:
    frames: int = 8
    size: int = 32  # pixel frames are size x size RGB
    channels: int = 3
    #: 0 (the bundled model): no autoencoder, the DiT denoises pixels and ``patch_size`` counts pixels.
    #: Otherwise the channels of our per-frame autoencoder's latents (size / 4 square per frame), which
    #: the DiT then denoises; on 2 CPU cores that trained worse than pixels (benchmarks/experiments).
    latent_channels: int = 0
    autoencoder_width: int = 32
    #: 8x8 pixels (or latent pixels): 16 tokens per frame, 128 per clip, which keeps the demo's
    #: sampling on 2 CPU cores within its time.
    patch_size: int = 8
    num_layers: int = 4  # spatial + as many temporal blocks
    heads: int = 4
    head_dim: int = 32
    text_dim: int = 64
    max_tokens: int = MAX_TOKENS
    train_timesteps: int = 1000
    #: What the network predicts (diffusers' ``prediction_type``): the clean clip ("sample") trained
    #: better in pixel space than epsilon or v on 2 CPU cores (benchmarks/experiments/README.md).
    prediction_type: str = "sample"
    #: Share of the diffusion noise common to all frames (the rest is drawn per frame), in training and
    #: sampling alike (PYoCo's "mixed" noise prior, Ge et al. 2023). With independent noise per frame, a
    #: model this small decides per frame where the object goes and draws it flickering in several places.
    frame_noise_correlation: float = 0.5
    #: Train on clips whose main shape starts at a zone's centre at its speed class's middle speed
    #: (``data.sample_spec(grid=True)``), so a caption determines its main shape's clip.
    grid_layout: bool = True

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def latent_size(self) -> int:
        """Side of what the DiT denoises per frame."""
        return self.size // FrameAutoencoder.downsample if self.latent_channels else self.size

    @property
    def dit_channels(self) -> int:
        """Channels of what the DiT denoises."""
        return self.latent_channels or self.channels


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


@dataclass
class ReferenceModel:
    """What a generation needs: the DiT (the module to ``ax.transform``), the caption encoder, the
    autoencoder whose latents the DiT denoises, and the config."""

    transformer: nn.Module
    encoder: CaptionEncoder
    autoencoder: FrameAutoencoder | None
    config: ReferenceConfig

    def modules(self) -> dict[str, nn.Module]:
        modules = {"transformer": self.transformer, "encoder": self.encoder}
        return modules if self.autoencoder is None else {**modules, "autoencoder": self.autoencoder}

    def eval(self) -> "ReferenceModel":
        for module in self.modules().values():
            module.eval()
        return self


def build(config: ReferenceConfig = ReferenceConfig()) -> ReferenceModel:
    """The (untrained) transformer and caption encoder for ``config``."""
    from diffusers import LatteTransformer3DModel

    transformer = LatteTransformer3DModel(
        num_attention_heads=config.heads,
        attention_head_dim=config.head_dim,
        in_channels=config.dit_channels,
        out_channels=config.dit_channels,
        num_layers=config.num_layers,
        cross_attention_dim=config.hidden,
        sample_size=config.latent_size,
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
    autoencoder = (FrameAutoencoder(config.channels, config.latent_channels, config.autoencoder_width)
                   if config.latent_channels else None)
    return ReferenceModel(transformer, encoder, autoencoder, config)


_FORMAT = "adacache_fx-reference-4"


def save(path: str | Path, model: ReferenceModel) -> None:
    """One safetensors file holding both modules (``transformer.*``, ``encoder.*``) and the config."""
    from safetensors.torch import save_file

    tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
               for name, module in model.modules().items() for k, v in module.state_dict().items()}
    metadata = {"config": json.dumps(asdict(model.config)), "format": _FORMAT}
    save_file(tensors, str(path), metadata=metadata)


def load(path: str | Path) -> ReferenceModel:
    """Load a model saved by :func:`save`, offline, in eval mode."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no reference model there; train one with "
                                "`python -m adacache_lab.reference.train` or use the bundled default")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an adacache_fx reference model of format {_FORMAT} "
                             f"(found {metadata.get('format')!r}); retrain it")
        config = ReferenceConfig(**json.loads(metadata["config"]))
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    model = build(config)
    for name, module in model.modules().items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return model.eval()


def video_noise(shape: tuple[int, ...], config: ReferenceConfig, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Unit-variance noise for videos ``(B, C, T, H, W)`` whose frames correlate by
    ``config.frame_noise_correlation``."""
    rho = config.frame_noise_correlation
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"frame_noise_correlation must be in [0, 1), got {rho}")
    b, c, _, h, w = shape
    shared = torch.randn((b, c, 1, h, w), generator=generator, device=device)
    own = torch.randn(shape, generator=generator, device=device)
    return rho ** 0.5 * shared + (1.0 - rho) ** 0.5 * own


def empty_caption(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional caption (classifier-free guidance): all padding, first position attended
    (an all-masked sequence would make attention undefined)."""
    empty_mask = torch.zeros_like(mask)
    empty_mask[:, 0] = 1
    return torch.full_like(tokens, PAD_ID), empty_mask


def scheduler(config: ReferenceConfig, num_steps: int):
    """The sampling scheduler the model is evaluated with: DDIM over the training betas."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule="squaredcos_cap_v2",
                          clip_sample=True, prediction_type=config.prediction_type)
    sched.set_timesteps(num_steps)
    return sched


@torch.no_grad()
def generate(
    model: ReferenceModel,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    num_steps: int = 20,
    guidance_scale: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    on_step=None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM sampling, then the autoencoder's decoder (if any); returns videos (B, 3, T, H, W) in [-1, 1].

    ``guidance_scale`` above 1 runs classifier-free guidance with the conditional and unconditional
    halves batched (conditional first); at 1 only the conditional half runs, as in diffusers'
    pipelines. The bundled model predicts the clean clip and samples best at 1: guidance on that
    prediction over-saturates (its judge accuracy falls from over 0.9 to about 0.3 at 2).

    ``on_step(index, timestep)``, if given, is called before each transformer call (e.g. to time steps).
    ``eta``: DDIM's stochasticity (0 deterministic, 1 as ancestral DDPM sampling); its noise comes
    from the same seeded generator and correlates across frames as the training noise does, so a call
    stays a pure function of its arguments.
    """
    from tqdm.auto import tqdm

    config = model.config
    sched = scheduler(config, num_steps)
    batch = tokens.shape[0]
    # Noise is drawn on the CPU and moved, so a seed gives the same start on every device.
    device = next(model.transformer.parameters()).device
    tokens, mask = tokens.to(device), mask.to(device)
    generator = torch.Generator().manual_seed(seed)
    latents = video_noise((batch, config.dit_channels, config.frames, config.latent_size, config.latent_size),
                          config, generator).to(device)
    guided = guidance_scale != 1.0
    if guided:
        empty, empty_mask = empty_caption(tokens, mask)
        tokens, mask = torch.cat([tokens, empty]), torch.cat([mask, empty_mask])
    text = model.encoder(tokens, mask)
    copies = 2 if guided else 1
    for index, t in enumerate(tqdm(sched.timesteps, desc="sampling", disable=not progress, leave=False)):
        if on_step is not None:
            on_step(index, t)
        out = model.transformer(
            hidden_states=torch.cat([latents] * copies),
            encoder_hidden_states=text,
            timestep=t.to(device).expand(copies * batch),
            enable_temporal_attentions=True,
            return_dict=False,
        )[0]
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        # Ancestral noise correlates across frames like the training noise (drawn only when used,
        # so eta=0 stays bit-identical to plain DDIM).
        variance_noise = video_noise(tuple(latents.shape), config, generator).to(device) if eta > 0 else None
        latents = sched.step(out, t, latents, eta=eta,
                             variance_noise=variance_noise).prev_sample
    latents = latents.clamp(-1, 1)
    return latents if model.autoencoder is None else model.autoencoder.decode(latents)
