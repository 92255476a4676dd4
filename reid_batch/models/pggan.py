"""The PGGAN chest-X-ray generator prior: architecture, the checkpoint formats users hold, range mapping, latents.

Architecture (checked line by line against both source trees):

* z (N, latent_dim) ~ N(0, I) -> pixel norm -> equalized Linear(latent_dim, 16*C0) -> LeakyReLU(0.2)
  -> view (N, C0, 4, 4) -> [gan_zoo only: pixel norm] -> 3x3 conv -> LeakyReLU -> pixel norm.
* each further scale: nearest x2 upsampling, then twice (3x3 conv -> LeakyReLU -> pixel norm).
* a 1x1 toRGB conv per scale; fading mixes the newest scale with the x2-upsampled toRGB of the one before.
* equalized learning rate: weights are stored N(0, 1) and the layer OUTPUT is multiplied by He's constant
  sqrt(2 / fan_in) at runtime, so the bias is scaled too.  This holds for Segal's `EqualizedLayer` AND for
  pytorch_GAN_zoo's `ConstrainedLayer` (`x = self.module(x); x *= self.weight` in
  models/networks/custom_layers.py); an implementation that leaves the gan_zoo bias unscaled would not
  reproduce that code's images.
* no output activation unless declared: Segal's data pipeline is ToTensor + Normalize(0, 1), so its images
  are declared [0, 1]; gan_zoo normalises data to [-1, 1] and adds tanh only for its MSE/DCGAN losses.
  A tanh is never put on a generator declared [0, 1] (squashing a [0, 1] generator through tanh is a bug).

Checkpoint formats (`load_generator(path, format=...)`); depth per scale is always read from the weights:

* "segal": Segal et al. (github.com/BradSegal/CXR_PGGAN) `ProGenerator.state_dict()`:
  `latent_linear.0.module.{weight,bias}` (an equalized nn.Linear, weight (16*C0, latent_dim), not a
  ConvTranspose), `init_conv.0.module.*`, `ScaleBlocks.{i}.convolv.{0,3}.module.*` (LeakyReLU and
  PixelNorm sit at indices 1, 2, 4, 5), `toRGB.{i}.module.*`, buffers `current_size`, `current_depth`,
  `alpha`.  `PGGANGenerator.state_dict()` has exactly these keys.  Also accepted wrapped as
  `{"state_dict": ..., "settings": ...}` and with a DataParallel `module.` prefix.
* "segal_lightning": their LightningModule checkpoint `{"state_dict": {"generator.*", "gen_shadow.*",
  "discriminator.*", ...}, ...}`; the EMA `gen_shadow` is preferred.
* "gan_zoo": facebookresearch/pytorch_GAN_zoo PGAN `{"config", "netG", "netD", "avgG"}` (or a bare netG);
  keys `formatLayer.module.*`, `groupScale0.0.module.*`, `scaleLayers.{i}.{0,1}.module.*`,
  `toRGBLayers.{i}.module.*`; older files without the `.module` infix load too (as gan_zoo's own
  `loadStateDictCompatible` allows).  `avgG` is preferred.  Declared range [-1, 1].
* "reid": this package's safetensors file with the config as JSON in the safetensors metadata.

Fading convention of `forward(z, depth, alpha)`: alpha is the weight of the NEWEST scale (1.0 = no fading).
Both source trees store the opposite (weight of the upsampled older scale); the stored value is kept in the
`alpha` buffer for format fidelity and exposed in forward()'s convention as `checkpoint_fade_alpha`.

Pixel norm and equalized learning rate are always on: Segal's released configuration uses both, and
gan_zoo's GNet cannot run without pixel norm (it calls the normalisation layer unconditionally).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors
import torch.nn.functional as F
from torch import nn

from reid_batch import log
from reid_batch.errors import InputError

__all__ = [
    "FORMATS",
    "SEGAL_1024_DEPTHS",
    "VARIANTS",
    "PGGANConfig",
    "PGGANDiscriminator",
    "PGGANGenerator",
    "discriminator_bytes",
    "export_state_dict",
    "generator_to_unit",
    "latents_for_ids",
    "load_discriminator",
    "load_generator",
    "save_generator",
    "write_checkpoint",
]

VARIANTS = ("segal", "gan_zoo")
FORMATS = ("segal", "segal_lightning", "gan_zoo", "reid")
OUTPUT_ACTIVATIONS = ("none", "tanh")
# Segal's run: a 512-channel 4x4 start grown by eight scales (configuration.py `depthScales`) -> 1024x1024.
SEGAL_1024_DEPTHS = (512, 512, 512, 512, 256, 128, 64, 32, 16)

_PIXEL_NORM_EPSILON = 1e-8
_BUFFER_KEYS = ("current_size", "current_depth", "alpha")
_REID_METADATA_KEY = "reid_pggan_config"
# gan_zoo losses whose generator ends in tanh (models/loss_criterions/base_loss_criterions.py).
_GAN_ZOO_TANH_LOSSES = {"MSE": True, "DCGAN": True, "WGANGP": False, "Logistic": False}


@dataclass
class PGGANConfig:
    """Everything that shapes a generator's images; `output_range` is a declaration, never inferred."""

    latent_dim: int = 512
    depths: tuple[int, ...] = SEGAL_1024_DEPTHS
    out_channels: int = 3
    output_range: tuple[float, float] = (0.0, 1.0)
    variant: str = "segal"
    output_activation: str = "none"
    leakiness: float = 0.2
    # K > 0: a learned offset per class is added to each latent, the class being the equal-probability bin of the
    # standard normal that z_0 falls in (attack.objectives.condition_latents). Only fine-tuned generators have them.
    class_offsets: int = 0

    def __post_init__(self) -> None:
        self.depths = tuple(int(d) for d in self.depths)
        self.output_range = tuple(float(v) for v in self.output_range)
        if self.variant not in VARIANTS:
            raise InputError(f"unknown variant {self.variant!r}; expected one of {VARIANTS}", where="pggan.variant")
        if not self.depths or any(d <= 0 for d in self.depths):
            raise InputError(f"depths must be positive channel counts, got {self.depths}", where="pggan.depths")
        if self.latent_dim <= 0 or self.out_channels <= 0:
            raise InputError("latent_dim and out_channels must be positive", where="pggan")
        if not isinstance(self.class_offsets, int) or self.class_offsets < 0 or self.class_offsets == 1:
            raise InputError(f"class_offsets must be 0 or a class count >= 2, got {self.class_offsets!r}",
                             where="pggan.class_offsets")
        if len(self.output_range) != 2 or not self.output_range[1] > self.output_range[0]:
            raise InputError(f"output_range must be (low, high) with high > low, got {self.output_range}",
                             where="pggan.output_range")
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise InputError(f"output_activation must be one of {OUTPUT_ACTIVATIONS}", where="pggan.output_activation")
        if self.output_activation == "tanh" and self.output_range != (-1.0, 1.0):
            raise InputError(f"a tanh output only fits a generator declared (-1, 1), not {self.output_range}",
                             where="pggan.output_activation")

    @property
    def resolution(self) -> int:
        return 4 * 2 ** (len(self.depths) - 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str, where: str) -> "PGGANConfig":
        try:
            fields = json.loads(text)
            return cls(**fields)
        except InputError:
            raise
        except (ValueError, TypeError) as exc:
            raise InputError(f"unreadable generator config in metadata: {exc}", where=where) from exc


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x.pow(2).mean(dim=1, keepdim=True) + _PIXEL_NORM_EPSILON).rsqrt()


class EqualizedLayer(nn.Module):
    """Holds the layer as `.module` so state_dict keys read `<name>.module.weight`, as in both source trees."""

    def __init__(self, module: nn.Linear | nn.Conv2d):
        super().__init__()
        self.module = module
        with torch.no_grad():
            module.weight.normal_(0.0, 1.0)
            module.bias.zero_()
        self.he_constant = math.sqrt(2.0 / math.prod(module.weight.shape[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the output (not the weight) scales the bias as well, exactly like both reference codes.
        return self.module(x) * self.he_constant


def _equalized_conv(in_channels: int, out_channels: int, kernel: int) -> EqualizedLayer:
    return EqualizedLayer(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2))


class _ScaleBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, leakiness: float):
        super().__init__()
        self.convolv = nn.Sequential(
            _equalized_conv(in_channels, out_channels, 3), nn.LeakyReLU(leakiness), PixelNorm(),
            _equalized_conv(out_channels, out_channels, 3), nn.LeakyReLU(leakiness), PixelNorm(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolv(F.interpolate(x, scale_factor=2, mode="nearest"))


class PGGANGenerator(nn.Module):
    """Progressive-GAN generator whose state_dict keys are Segal et al.'s, for either variant's forward pass."""

    def __init__(self, config: PGGANConfig | None = None):
        super().__init__()
        self.config = config or PGGANConfig()
        cfg = self.config
        first = cfg.depths[0]
        self.pixel_norm = PixelNorm()
        self.latent_linear = nn.Sequential(
            EqualizedLayer(nn.Linear(cfg.latent_dim, 16 * first)), nn.LeakyReLU(cfg.leakiness))
        self.init_conv = nn.Sequential(
            _equalized_conv(first, first, 3), nn.LeakyReLU(cfg.leakiness), PixelNorm())
        self.ScaleBlocks = nn.ModuleList(
            _ScaleBlock(a, b, cfg.leakiness) for a, b in zip(cfg.depths[:-1], cfg.depths[1:]))
        self.toRGB = nn.ModuleList(_equalized_conv(d, cfg.out_channels, 1) for d in cfg.depths)
        self.output_activation = nn.Tanh() if cfg.output_activation == "tanh" else nn.Identity()
        # Segal's progressive-training state, kept so exports reproduce their files key for key.
        self.register_buffer("current_size", torch.tensor(cfg.resolution))
        self.register_buffer("current_depth", torch.tensor(len(cfg.depths) - 1))
        self.register_buffer("alpha", torch.tensor(0.0))
        if cfg.class_offsets:
            self.class_offsets = nn.Parameter(torch.zeros(cfg.class_offsets, cfg.latent_dim))

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def checkpoint_fade_alpha(self) -> float:
        """The fade recorded in the weights, in forward()'s convention (1.0 = fading finished)."""
        return 1.0 - float(self.alpha)

    def forward(self, z: torch.Tensor, depth: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        """Images at scale `depth` (0 = 4x4; None = full resolution); `alpha` weights that scale against
        the upsampled image of the scale below it."""
        last = len(self.toRGB) - 1
        depth = last if depth is None else int(depth)
        if not 0 <= depth <= last:
            raise ValueError(f"depth must be in [0, {last}], got {depth}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        x = z.reshape(z.shape[0], -1)
        if x.shape[1] != self.config.latent_dim:
            raise ValueError(f"expected latents of dimension {self.config.latent_dim}, got {tuple(z.shape)}")
        if self.config.class_offsets:
            x = x + self.class_offsets[latent_bins(x[:, 0].detach(), self.config.class_offsets)].to(x.dtype)
        x = self.latent_linear(self.pixel_norm(x)).view(x.shape[0], -1, 4, 4)
        if self.config.variant == "gan_zoo":
            x = self.pixel_norm(x)
        x = self.init_conv(x)
        coarser = x
        for block in self.ScaleBlocks[:depth]:
            coarser = x
            x = block(x)
        image = self.toRGB[depth](x)
        if depth > 0 and float(alpha) < 1.0:
            upsampled = F.interpolate(self.toRGB[depth - 1](coarser), scale_factor=2, mode="nearest")
            image = alpha * image + (1.0 - alpha) * upsampled
        return self.output_activation(image)


def latent_bins(z0: torch.Tensor, classes: int) -> torch.Tensor:
    """The equal-probability bin (0..classes-1) of the standard normal that each z_0 falls in."""
    return (torch.special.ndtr(z0.double()) * classes).floor().clamp(0, classes - 1).long()


def with_class_offsets(generator: PGGANGenerator, classes: int) -> PGGANGenerator:
    """A copy of `generator` (same weights and buffers, same device) with a zero latent offset per class: it draws
    exactly what `generator` draws until the offsets are trained."""
    config = dataclasses.replace(generator.config, class_offsets=classes)
    device = next(generator.parameters()).device
    out = PGGANGenerator(config).to(device)
    missing, unexpected = out.load_state_dict(generator.state_dict(), strict=False)
    assert missing == ["class_offsets"] and not unexpected, (missing, unexpected)
    return out


def generator_to_unit(images: torch.Tensor, output_range: Sequence[float]) -> torch.Tensor:
    """Map images from the generator's declared range to [0, 1].

    Clamped because an activation-free generator (Segal's) overshoots its declared range in practice, and the
    target's input transform downstream assumes [0, 1] pixels.
    """
    low, high = (float(v) for v in output_range)
    if not high > low:
        raise ValueError(f"output_range must have high > low, got {tuple(output_range)}")
    return ((images - low) / (high - low)).clamp(0.0, 1.0)


_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64_mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def latents_for_ids(seed: int, ids: torch.Tensor | Sequence[int], latent_dim: int = 512) -> torch.Tensor:
    """(N, latent_dim) float32 N(0, 1) latents, each a pure function of (seed, id).

    Candidate k's latent can be regenerated alone, on any device and in any batch: every id owns a
    SplitMix64 stream (state = mix(id ^ mix(seed)), advanced by the golden gamma), turned into normals by
    Box-Muller in float64.  Vectorised numpy; no torch RNG, so a torch upgrade cannot change the latents.
    """
    if isinstance(ids, torch.Tensor) and ids.is_floating_point():
        raise TypeError("ids must be integers")
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    if np.asarray(ids).dtype.kind == "f":
        raise TypeError("ids must be integers")
    id_values = np.array(ids, dtype=np.int64).reshape(-1).view(np.uint64)  # a copy: read-only arrays are fine
    pairs = (int(latent_dim) + 1) // 2
    with np.errstate(over="ignore"):
        seed_key = _splitmix64_mix(np.array([int(seed) % 2**64], dtype=np.uint64) + _GOLDEN_GAMMA)
        stream_state = _splitmix64_mix((id_values ^ seed_key) + _GOLDEN_GAMMA)
        steps = np.arange(1, 2 * pairs + 1, dtype=np.uint64) * _GOLDEN_GAMMA
        bits = _splitmix64_mix(stream_state[:, None] + steps[None, :])
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log() stays finite
    radius = np.sqrt(-2.0 * np.log(uniform[:, 0::2]))
    angle = 2.0 * np.pi * uniform[:, 1::2]
    normals = np.empty((len(id_values), 2 * pairs), dtype=np.float64)
    normals[:, 0::2] = radius * np.cos(angle)
    normals[:, 1::2] = radius * np.sin(angle)
    return torch.from_numpy(np.ascontiguousarray(normals[:, :latent_dim], dtype=np.float32))


# ---------------------------------------------------------------------------------------------- reading files


class _InertStandIn(dict):
    """Takes the place of any class or function a checkpoint's pickle names and weights_only refuses
    (gan_zoo's BaseConfig, argparse.Namespace hparams, ...): it records arguments and state and runs nothing,
    so the named code is never imported or called."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state

    def append(self, item) -> None:
        self.setdefault("__items__", []).append(item)

    def extend(self, items) -> None:
        for item in items:
            self.append(item)


_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_MAX_STAND_INS = 32


def _brief(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("error:", "Unsupported")):
            return line
    return lines[0][:300] if lines else type(exc).__name__


def _torch_load_inert(path: Path) -> object:
    stand_ins: list[str] = []
    for _ in range(_MAX_STAND_INS + 1):
        try:
            with torch.serialization.safe_globals([(_InertStandIn, name) for name in stand_ins]):
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            refused = _REFUSED_GLOBAL.search(str(exc))
            if refused is None or refused.group(1) in stand_ins:
                raise InputError(f"not a loadable PyTorch checkpoint (torch.load with weights_only=True "
                                 f"refused it: {_brief(exc)})", where=str(path)) from exc
            stand_ins.append(refused.group(1))
            continue
        except Exception as exc:  # torch raises RuntimeError/EOFError/... for truncated or foreign files
            raise InputError(f"not a readable PyTorch checkpoint: {_brief(exc)}", where=str(path)) from exc
        if stand_ins:
            log.event("checkpoint_pickled_objects_not_loaded", path=str(path), globals=stand_ins)
        return loaded
    raise InputError(f"checkpoint names more than {_MAX_STAND_INS} non-tensor Python objects", where=str(path))


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_length <= path.stat().st_size - 8


def _read_file(path: Path) -> tuple[object, dict[str, str] | None]:
    if not path.is_file():
        raise InputError("generator checkpoint not found", where=str(path))
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as exc:
            raise InputError(f"unreadable safetensors file: {_brief(exc)}", where=str(path)) from exc
        return tensors, metadata
    return _torch_load_inert(path), None


# ------------------------------------------------------------------------------------------- key layouts


def _strip_prefix(state: dict, prefix: str) -> dict:
    return OrderedDict((k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix))


def _strip_data_parallel(state: dict) -> dict:
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return _strip_prefix(state, "module.")
    return state


_GAN_ZOO_TO_SEGAL = [
    (re.compile(r"^formatLayer\.module\.(weight|bias)$"), r"latent_linear.0.module.\1"),
    (re.compile(r"^groupScale0\.0\.module\.(weight|bias)$"), r"init_conv.0.module.\1"),
    (re.compile(r"^scaleLayers\.(\d+)\.0\.module\.(weight|bias)$"), r"ScaleBlocks.\1.convolv.0.module.\2"),
    (re.compile(r"^scaleLayers\.(\d+)\.1\.module\.(weight|bias)$"), r"ScaleBlocks.\1.convolv.3.module.\2"),
    (re.compile(r"^toRGBLayers\.(\d+)\.module\.(weight|bias)$"), r"toRGB.\1.module.\2"),
]
_SEGAL_TO_GAN_ZOO = [
    (re.compile(r"^latent_linear\.0\.module\.(weight|bias)$"), r"formatLayer.module.\1"),
    (re.compile(r"^init_conv\.0\.module\.(weight|bias)$"), r"groupScale0.0.module.\1"),
    (re.compile(r"^ScaleBlocks\.(\d+)\.convolv\.0\.module\.(weight|bias)$"), r"scaleLayers.\1.0.module.\2"),
    (re.compile(r"^ScaleBlocks\.(\d+)\.convolv\.3\.module\.(weight|bias)$"), r"scaleLayers.\1.1.module.\2"),
    (re.compile(r"^toRGB\.(\d+)\.module\.(weight|bias)$"), r"toRGBLayers.\1.module.\2"),
]
_LEGACY_GAN_ZOO_KEY = re.compile(r"\.(weight|bias)$")


def _rename(key: str, table) -> str:
    for pattern, replacement in table:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key  # left as is, so the shape check reports it as unexpected


def _gan_zoo_to_segal_keys(state: dict) -> dict:
    renamed = OrderedDict()
    for key, value in _strip_data_parallel(state).items():
        if not key.endswith((".module.weight", ".module.bias")):
            # Files saved before gan_zoo dropped its state_dict override lack the `.module` infix.
            key = _LEGACY_GAN_ZOO_KEY.sub(r".module.\1", key)
        renamed[_rename(key, _GAN_ZOO_TO_SEGAL)] = value
    return renamed


def _segal_to_gan_zoo_keys(state: dict) -> dict:
    return OrderedDict((_rename(k, _SEGAL_TO_GAN_ZOO), v) for k, v in state.items() if k not in _BUFFER_KEYS)


# ----------------------------------------------------------------------------------------- format detection


def _has_segal_keys(state: object) -> bool:
    return isinstance(state, dict) and "latent_linear.0.module.weight" in _strip_data_parallel(state)


def _has_gan_zoo_keys(state: object) -> bool:
    return isinstance(state, dict) and any(
        isinstance(k, str) and k.startswith("formatLayer.") for k in _strip_data_parallel(state))


def _detect_format(loaded: object, metadata: dict[str, str] | None) -> str | None:
    if metadata is not None and _REID_METADATA_KEY in metadata:
        return "reid"
    if not isinstance(loaded, dict):
        return None
    if "netG" in loaded or "avgG" in loaded or _has_gan_zoo_keys(loaded):
        return "gan_zoo"
    inner = loaded.get("state_dict")
    if isinstance(inner, dict):
        if any(isinstance(k, str) and k.startswith(("generator.", "gen_shadow.")) for k in inner):
            return "segal_lightning"
        if _has_segal_keys(inner):
            return "segal"
    if _has_segal_keys(loaded):
        return "segal"
    return None


_FORMAT_EXPECTATIONS = {
    "segal": "a state_dict with 'latent_linear.0.module.weight', 'init_conv.0.module.weight', "
             "'ScaleBlocks.{i}.convolv.{0,3}.module.*', 'toRGB.{i}.module.*'",
    "segal_lightning": "{'state_dict': {'generator.*' and/or 'gen_shadow.*' keys as in format segal}}",
    "gan_zoo": "{'config', 'netG', 'avgG'?} with 'formatLayer.module.weight', 'groupScale0.0.module.*', "
               "'scaleLayers.{i}.{0,1}.module.*', 'toRGBLayers.{i}.module.*'",
    "reid": f"a safetensors file from save_generator (metadata key '{_REID_METADATA_KEY}')",
}


def _describe_found(loaded: object, metadata: dict[str, str] | None) -> str:
    if metadata is not None:
        return f"a safetensors file with metadata keys {sorted(metadata)[:8]} and tensors {sorted(loaded)[:8]}"
    if isinstance(loaded, dict):
        keys = [str(k) for k in loaded][:10]
        inner = loaded.get("state_dict")
        extra = f"; state_dict keys start {[str(k) for k in inner][:6]}" if isinstance(inner, dict) else ""
        return f"a dict with keys {keys}{' ...' if len(loaded) > 10 else ''}{extra}"
    return f"a {type(loaded).__name__}"


# ------------------------------------------------------------------------------ from raw weights to a model


def _tensor(state: dict, key: str, where: str) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise InputError(f"missing tensor '{key}' (found keys {sorted(map(str, state))[:12]})", where=where)
    return value


def _architecture_from_weights(state: dict, where: str) -> tuple[int, tuple[int, ...], int]:
    latent = _tensor(state, "latent_linear.0.module.weight", where)
    first_conv = _tensor(state, "init_conv.0.module.weight", where)
    if latent.dim() != 2 or first_conv.dim() != 4:
        raise InputError(f"latent layer weight should be 2-D (16*C0, latent_dim) and the 4x4 conv 4-D, found "
                         f"{tuple(latent.shape)} and {tuple(first_conv.shape)}", where=where)
    if any(re.match(r"^ScaleBlocks\.\d+\.convolv\.2\.module\.", str(k)) for k in state):
        raise InputError("this generator was trained without pixel norm (convs at convolv.0/2); only the "
                         "pixel-norm architecture is supported", where=where)
    scale_count = len({m.group(1) for k in state if (m := re.match(r"^toRGB\.(\d+)\.module\.weight$", str(k)))})
    if scale_count == 0:
        raise InputError("no toRGB layers found ('toRGB.{i}.module.weight')", where=where)
    depths = [int(first_conv.shape[0])]
    for index in range(scale_count - 1):
        depths.append(int(_tensor(state, f"ScaleBlocks.{index}.convolv.0.module.weight", where).shape[0]))
    out_channels = int(_tensor(state, "toRGB.0.module.weight", where).shape[0])
    return int(latent.shape[1]), tuple(depths), out_channels


def _shape_of(value: object) -> object:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_shapes(state: dict, config: PGGANConfig, where: str) -> None:
    with torch.device("meta"):
        reference = PGGANGenerator(config).state_dict()
    missing = [k for k in reference if k not in state and k not in _BUFFER_KEYS]
    unexpected = [k for k in state if k not in reference]
    mismatched = [f"{k}: expected {tuple(reference[k].shape)}, found {_shape_of(state[k])}"
                  for k in reference if k in state
                  and (not isinstance(state[k], torch.Tensor) or state[k].shape != reference[k].shape)]
    if missing or unexpected or mismatched:
        problems = ([f"missing {k} (expected {tuple(reference[k].shape)})" for k in missing]
                    + [f"unexpected {k} (found {_shape_of(state[k])})" for k in unexpected]
                    + mismatched)
        shown = "; ".join(problems[:12]) + (f"; ... {len(problems) - 12} more" if len(problems) > 12 else "")
        raise InputError(f"weights do not form a PGGAN generator with depths {list(config.depths)}, "
                         f"latent_dim {config.latent_dim}, {config.out_channels} output channels: {shown}",
                         where=where)


def _build(state: dict, declared: dict, where: str) -> tuple[PGGANGenerator, PGGANConfig]:
    latent_dim, depths, out_channels = _architecture_from_weights(state, where)
    config = PGGANConfig(latent_dim=latent_dim, depths=depths, out_channels=out_channels, **declared)
    _check_shapes(state, config, where)
    generator = PGGANGenerator(config)
    weights = OrderedDict((k, v) for k, v in state.items() if k not in _BUFFER_KEYS)
    generator.load_state_dict(weights, strict=False)
    for name in _BUFFER_KEYS:
        if isinstance(state.get(name), torch.Tensor) and state[name].numel() == 1:
            getattr(generator, name).copy_(state[name].reshape(()))
    return generator.eval(), config


def _gan_zoo_fields(config: object) -> dict:
    if isinstance(config, _InertStandIn):
        state = getattr(config, "state", None)
        return state if isinstance(state, dict) else dict(config)
    return config if isinstance(config, dict) else {}


def _gan_zoo_declared(fields: dict, where: str) -> dict:
    if fields.get("perChannelNormalization") is False or fields.get("equalizedlR") is False:
        raise InputError("only gan_zoo generators with perChannelNormalization and equalizedlR are supported",
                         where=where)
    loss = fields.get("lossCriterion", "WGANGP")  # gan_zoo's BaseGAN default lossMode
    if not isinstance(loss, str) or loss not in _GAN_ZOO_TANH_LOSSES:
        raise InputError(f"unknown gan_zoo lossCriterion {loss!r}; cannot tell whether the generator ends in "
                         f"tanh (known: {sorted(_GAN_ZOO_TANH_LOSSES)})", where=where)
    leak = fields.get("leakyReluLeak", 0.2)
    return {
        "variant": "gan_zoo",
        "output_range": (-1.0, 1.0),
        "output_activation": "tanh" if _GAN_ZOO_TANH_LOSSES[loss] else "none",
        "leakiness": float(leak) if isinstance(leak, (int, float)) else 0.2,
    }


def _extract(fmt: str, loaded: object, metadata: dict[str, str] | None, where: str):
    """Returns (state in Segal key layout, which weights were used, declared config fields, stored fade)."""
    segal_declared = {"variant": "segal", "output_range": (0.0, 1.0), "output_activation": "none"}
    if fmt == "segal":
        state = loaded["state_dict"] if isinstance(loaded.get("state_dict"), dict) else loaded
        return _strip_data_parallel(state), "state_dict", segal_declared, None
    if fmt == "segal_lightning":
        inner = loaded["state_dict"]
        for prefix, label in (("gen_shadow.", "gen_shadow (EMA)"), ("generator.", "generator (no EMA in file)")):
            state = _strip_prefix(inner, prefix)
            if state:
                return state, label, segal_declared, None
    if fmt == "gan_zoo":
        fields = _gan_zoo_fields(loaded.get("config")) if "netG" in loaded or "avgG" in loaded else {}
        if isinstance(loaded.get("avgG"), dict):
            state, label = loaded["avgG"], "avgG (moving average)"
        elif isinstance(loaded.get("netG"), dict):
            state, label = loaded["netG"], "netG (no avgG in file)"
        else:
            state, label = loaded, "bare netG state_dict (no config in file)"
        stored_alpha = fields.get("alpha")
        fade = float(stored_alpha) if isinstance(stored_alpha, (int, float)) else None
        return _gan_zoo_to_segal_keys(state), label, _gan_zoo_declared(fields, where), fade
    if fmt == "reid":
        config = PGGANConfig.from_json(metadata[_REID_METADATA_KEY], where)
        declared = {k: getattr(config, k) for k in ("variant", "output_range", "output_activation", "leakiness",
                                                    "class_offsets")}
        return dict(loaded), "reid", declared, None
    raise AssertionError(fmt)


def load_generator(path: str | Path, format: str = "auto", *,
                   output_range: Sequence[float] | None = None) -> tuple[PGGANGenerator, PGGANConfig]:
    """Load a generator from any supported format (see module docstring); returns it in eval mode on CPU.

    `output_range` overrides the format's declared range (e.g. a Segal-code run trained on [-1, 1] data).
    """
    path = Path(path)
    where = str(path)
    if format != "auto" and format not in FORMATS:
        raise InputError(f"unknown generator format {format!r}; expected 'auto' or one of {FORMATS}",
                         where="generator.format")
    loaded, metadata = _read_file(path)
    detected = _detect_format(loaded, metadata)
    if detected is None or (format != "auto" and detected != format):
        wanted = [format] if format != "auto" else list(FORMATS)
        expected = "; or ".join(f"{name}: {_FORMAT_EXPECTATIONS[name]}" for name in wanted)
        raise InputError(f"not a {format if format != 'auto' else 'recognised'} PGGAN generator checkpoint. "
                         f"Expected {expected}. Found {_describe_found(loaded, metadata)}"
                         + (f" (looks like format {detected!r})" if detected else ""), where=where)
    state, weights_used, declared, stored_fade = _extract(detected, loaded, metadata, where)
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(f"{len(bad)} weight tensors contain NaN or infinite values (a diverged or corrupted "
                         f"training run?), first: {', '.join(bad[:5])}", where=where)
    if output_range is not None:
        declared = {**declared, "output_range": tuple(output_range)}
    generator, config = _build(state, declared, where)
    if detected == "reid":
        stored = PGGANConfig.from_json(metadata[_REID_METADATA_KEY], where)
        if (stored.latent_dim, stored.depths, stored.out_channels) != (
                config.latent_dim, config.depths, config.out_channels):
            raise InputError(f"metadata says latent_dim {stored.latent_dim}, depths {list(stored.depths)}, "
                             f"{stored.out_channels} channels but the weights hold {config.latent_dim}, "
                             f"{list(config.depths)}, {config.out_channels}", where=where)
    if stored_fade is not None:
        generator.alpha.fill_(stored_fade)
    log.event("pggan_loaded", path=where, format=detected, weights=weights_used, resolution=config.resolution,
              depths=list(config.depths), output_range=list(config.output_range),
              output_activation=config.output_activation, fade_alpha=generator.checkpoint_fade_alpha)
    return generator, config


# ------------------------------------------------------------------------------------------------- writing


def _weights(generator: PGGANGenerator) -> OrderedDict:
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in generator.state_dict().items())


def _require_export_semantics(generator: PGGANGenerator, fmt: str) -> None:
    cfg = generator.config
    if cfg.class_offsets:
        raise ValueError(f"format {fmt!r} cannot hold per-class latent offsets (use save_generator)")
    if fmt in ("segal", "segal_lightning"):
        ok = cfg.variant == "segal" and cfg.output_range == (0.0, 1.0) and cfg.output_activation == "none"
        need = "variant 'segal', output_range (0, 1), no output activation"
    else:
        ok = cfg.variant == "gan_zoo" and cfg.output_range == (-1.0, 1.0)
        need = "variant 'gan_zoo' and output_range (-1, 1)"
    if not ok:
        raise ValueError(f"format {fmt!r} can only hold a generator with {need}; this one has variant "
                         f"{cfg.variant!r}, range {cfg.output_range}, activation {cfg.output_activation!r} "
                         f"(use save_generator for any generator)")


def export_state_dict(generator: PGGANGenerator, format: str, *, ema: PGGANGenerator | None = None) -> dict:
    """The object a checkpoint of `format` stores (pass it to torch.save); `ema` fills the EMA slot
    (`gen_shadow` / `avgG`), which is left out when None."""
    if format == "reid":
        raise ValueError("format 'reid' is a safetensors file: use save_generator")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    for model in (generator, ema) if ema is not None else (generator,):
        _require_export_semantics(model, format)
    if ema is not None and ema.config != generator.config:
        raise ValueError("the EMA generator must share the generator's config")
    if format == "segal":
        return _weights(generator)
    if format == "segal_lightning":
        state = OrderedDict(("generator." + k, v) for k, v in _weights(generator).items())
        if ema is not None:
            state.update(("gen_shadow." + k, v) for k, v in _weights(ema).items())
        return {"state_dict": state, "epoch": 0, "global_step": 0}
    cfg = generator.config
    checkpoint = {
        "config": {
            "depthScale0": cfg.depths[0],
            "depthOtherScales": list(cfg.depths[1:]),
            "latentVectorDim": cfg.latent_dim,
            "noiseVectorDim": cfg.latent_dim,
            "dimOutput": cfg.out_channels,
            "perChannelNormalization": True,
            "equalizedlR": True,
            "initBiasToZero": True,
            "leakyReluLeak": cfg.leakiness,
            "alpha": float(generator.alpha),
            "lossCriterion": "DCGAN" if cfg.output_activation == "tanh" else "WGANGP",
        },
        "netG": _segal_to_gan_zoo_keys(_weights(generator)),
    }
    if ema is not None:
        checkpoint["avgG"] = _segal_to_gan_zoo_keys(_weights(ema))
    return checkpoint


def generator_bytes(generator: PGGANGenerator) -> bytes:
    """The "reid" format as bytes (what save_generator writes), so it can go through any store."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in _weights(generator).items()}
    return save_tensors(tensors, metadata={_REID_METADATA_KEY: generator.config.to_json()})


# ------------------------------------------------------------------------------------------------ the critic


def _critic_conv(in_channels: int, out_channels: int, kernel: int) -> EqualizedLayer:
    return EqualizedLayer(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2))


def minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """Append one channel holding the feature standard deviation within each group of samples (Karras et al.).

    Groups are the largest divisor of the batch not above `group_size`, so any batch size works. A collapsed
    generator produces near-identical samples, whose low spread the critic can then see and punish.
    """
    n, c, h, w = x.shape
    group = max(g for g in range(1, min(group_size, n) + 1) if n % g == 0)
    y = x.reshape(group, n // group, c, h, w)
    std = (y - y.mean(dim=0, keepdim=True)).pow(2).mean(dim=0).add(1e-8).sqrt()
    per_group = std.mean(dim=(1, 2, 3)).reshape(1, n // group, 1, 1, 1)
    # The reshape put sample i in group i % (n // group); each sample gets its own group's value.
    feature = per_group.expand(group, -1, 1, h, w).reshape(n, 1, h, w)
    return torch.cat([x, feature], dim=1)


class PGGANDiscriminator(nn.Module):
    """The generator's mirror: fromRGB (1x1) per scale, per scale two 3x3 convs + LeakyReLU(0.2) then average
    pooling, and at 4x4 minibatch stddev, a 3x3 conv, a dense layer over the 4x4 map (a 4x4 conv) and a linear
    score. Equalized learning rate throughout. `depths` are the generator's, from 4x4 up."""

    def __init__(self, depths: tuple[int, ...], in_channels: int, leakiness: float = 0.2):
        super().__init__()
        depths = tuple(int(d) for d in depths)
        self.depths = depths
        self.leakiness = leakiness
        self.fromRGB = nn.ModuleList(_critic_conv(in_channels, d, 1) for d in depths)
        # blocks[i - 1] takes scale i down to scale i - 1.
        self.blocks = nn.ModuleList(
            nn.Sequential(_critic_conv(depths[i], depths[i], 3), nn.LeakyReLU(leakiness),
                          _critic_conv(depths[i], depths[i - 1], 3), nn.LeakyReLU(leakiness), nn.AvgPool2d(2))
            for i in range(1, len(depths)))
        first = depths[0]
        self.final_conv = _critic_conv(first + 1, first, 3)
        self.final_dense = EqualizedLayer(nn.Linear(16 * first, first))
        self.decision = EqualizedLayer(nn.Linear(first, 1))

    def _from_rgb(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        return F.leaky_relu(self.fromRGB[depth](images), self.leakiness)

    def forward(self, images: torch.Tensor, depth: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        """Scores (N,) of images at scale `depth` (0 = 4x4; None = full resolution); `alpha` as the generator's."""
        last = len(self.depths) - 1
        depth = last if depth is None else int(depth)
        if not 0 <= depth <= last:
            raise ValueError(f"depth must be in [0, {last}], got {depth}")
        expected = 4 * 2**depth
        if tuple(images.shape[-2:]) != (expected, expected):
            raise ValueError(f"depth {depth} takes {expected}x{expected} images, got {tuple(images.shape)}")
        x = self._from_rgb(images, depth)
        if depth > 0:
            x = self.blocks[depth - 1](x)
            if float(alpha) < 1.0:
                older = self._from_rgb(F.avg_pool2d(images, 2), depth - 1)
                x = alpha * x + (1.0 - alpha) * older
            for block in reversed(self.blocks[: depth - 1]):
                x = block(x)
        x = F.leaky_relu(self.final_conv(minibatch_stddev(x)), self.leakiness)
        x = F.leaky_relu(self.final_dense(x.flatten(1)), self.leakiness)
        return self.decision(x).squeeze(1)


_CRITIC_METADATA_KEY = "reid_pggan_critic"


def discriminator_bytes(discriminator: "PGGANDiscriminator") -> bytes:
    """The critic as safetensors bytes, its shape (depths, channels, leakiness) as JSON in the metadata."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in discriminator.state_dict().items()}
    shape = {"depths": list(discriminator.depths), "in_channels": discriminator.fromRGB[0].module.in_channels,
             "leakiness": discriminator.leakiness}
    return save_tensors(tensors, metadata={_CRITIC_METADATA_KEY: json.dumps(shape)})


def load_discriminator(path: str | Path) -> "PGGANDiscriminator":
    """A critic written by discriminator_bytes (frozen, eval mode, CPU); anything else is invalid input."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", where=str(path))
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # safetensors raises several types for a file that is not one of its own
        raise InputError(f"not a safetensors file: {_brief(exc)}", where=str(path)) from exc
    if _CRITIC_METADATA_KEY not in metadata:
        raise InputError("not a critic written by train-prior (no '" + _CRITIC_METADATA_KEY + "' metadata)",
                         where=str(path))
    shape = json.loads(metadata[_CRITIC_METADATA_KEY])
    critic = PGGANDiscriminator(tuple(shape["depths"]), int(shape["in_channels"]), float(shape["leakiness"]))
    try:
        critic.load_state_dict(tensors)
    except RuntimeError as exc:
        raise InputError(f"the critic's tensors do not match its declared shape: {_brief(exc)}",
                         where=str(path)) from exc
    return critic.eval().requires_grad_(False)


def save_generator(generator: PGGANGenerator, path: str | Path) -> None:
    """Write the "reid" format: safetensors weights with the config as JSON in the file's metadata."""
    Path(path).write_bytes(generator_bytes(generator))


def write_checkpoint(generator: PGGANGenerator, path: str | Path, format: str, *,
                     ema: PGGANGenerator | None = None) -> None:
    """Write `generator` to `path` in any supported format (for users converting between tools)."""
    if format == "reid":
        save_generator(generator, path)
    else:
        torch.save(export_state_dict(generator, format, ema=ema), path)
