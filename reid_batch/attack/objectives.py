"""The objective of both stages: how far the FROZEN target's reaction to a batch is from its reaction to its training data.

One forward pass through the target collects, with hooks, everything every configured term needs. Each term is
returned twice: as a scalar batch loss (stage 1 trains the generator on the weighted sum) and per sample, a
vector of shape (N,) (stage 2 ranks candidates by the weighted sum of all terms but `tv`, as the study did).
Every term is a loss: non-negative, added with a non-negative weight, smaller is better.

CNN terms (torchvision ResNet / DenseNet)
-----------------------------------------
`bn_stats`: for every BatchNorm2d, its INPUT x (not its output, which the layer has already normalised with the
    running statistics) has per-channel batch mean mu_c and biased variance var_c over (N, H, W). DeepInversion's
    form, summed over layers, the first BatchNorm2d in registration order (the stem's) times `first_bn_multiplier`:
        sum_l  m_l * ( ||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2 )
    Per sample: the same with sample i's own mean and variance over (H, W). This is a proxy: the running
    statistics describe the whole training set, and one image's spatial statistics need not match them (a 1x1
    map has zero spatial variance), but it ranks candidates by how typical their activations are.
`feature_stats`: the OUTPUT of `feature_layer` (default "layer4.1.conv2") has per-channel mean mu_c and standard
    deviation sigma_c = sqrt(biased var_c + 1e-8) over (N, H, W), pushed to per-channel targets (m_c, s_c):
        mean_c (mu_c - m_c)^2 + mean_c (sigma_c - s_c)^2.   Per sample: over (H, W) only.
    `feature_target.source: model` (default) takes the targets from the model: the normalisation layer that reads
    the feature layer's output (the module registered right after it: `<block>.convK` -> `<block>.bnK`,
    `downsample.0` -> `downsample.1`, DenseNet's `denseblock4` -> `norm5`), m = its running mean, s = sqrt(running var + eps) for a BatchNorm, or its
    reference statistics for a GroupNorm. The term then pulls the same way as that layer's share of `bn_stats`
    (a fixed target of mean 0, std 1 made the two fight: the layer's running statistics are not 0 and 1).
    `source: fixed` uses the manifest's `mean` and `std` for every channel.
`logits`: class-conditional. The target's head reveals C: C = 1 is binary with one logit (binary cross-entropy
    with logits toward class 0 or 1); C > 1 is cross-entropy toward the assigned class. `assign_classes`
    alternates classes (sample i gets class (offset + i) mod K, K = 2 if C == 1 else C), so every run of K
    consecutive samples holds each class once and equal shards of a batch stay balanced; stage 1 writes each
    sample's class into its latent (`condition_latents`), or an unconditional generator could not tell which
    samples are asked for which class and the term would only push toward uncertainty. The batch loss is
    the mean of the per-sample losses. `classes=None` uses the class the target predicts (logit > 0, or argmax):
    the per-sample loss then measures how confidently the target classifies the candidate.
`tv`: anisotropic L1 total variation of the [0, 1] IMAGE (not the normalised target input), per sample
        mean_{c,h,w} |x[c,h+1,w] - x[c,h,w]| + mean_{c,h,w} |x[c,h,w+1] - x[c,h,w]|
    (L1 smooths noise but, unlike squared differences, does not penalise a sharp rib or body edge more than a
    gradual ramp of the same height). The batch loss is the mean over samples.

GroupNorm CNNs (DP-SGD targets: Opacus replaces every BatchNorm by GroupNorm, which keeps no running statistics)
-------------------------------------------------------------------------------------------------------------
`bn_stats` has nothing to compare with, so it falls back AUTOMATICALLY (logged as `objective_fallback` and kept in
`TargetObjective.fallback`, which stage 1 and sampling record and the report states) to
`gn_stats`: as `bn_stats`, with every GroupNorm's INPUT compared per channel with REFERENCE statistics that
    `compute_reference_stats` measures through the frozen target (as for a ViT's LayerNorms), with the same weight
    and the same first-layer multiplier. `feature_stats`, `logits` and `tv` apply unchanged. Without reference
    statistics `bn_stats` is dropped and the other terms remain. The Mahalanobis features are the spatial means
    of the last GroupNorm's input; their diagonal Gaussian is that layer's reference statistics.

ViT terms (torchvision VisionTransformer)
----------------------------------------
A ViT stores no running statistics, so `ln_stats` and `cls_magnitude` compare with REFERENCE statistics that
`compute_reference_stats` measures once through the frozen target on whatever reference images the caller
chooses (public X-rays or the prior generator's samples); the result is a plain dict of tensors to cache.
`ln_stats`: for each chosen LayerNorm (default all: every block's ln_1 and ln_2 and the final encoder.ln), its
    INPUT x (N, T, D) -- the pre-normalised residual stream -- has per-channel mean mu_d and biased variance var_d
    over all tokens of all samples, compared as for BatchNorm and summed over layers:
        sum_l ||mu_l - ref_mean_l||_2 + ||var_l - ref_var_l||_2
    The study's "aggregate across tokens" form keeps only the mean over channels of these (two numbers per layer),
    which cannot tell channels apart; the per-channel form contains it (the token-averaged per-token mean is the
    channel average of mu_d) and sees the channel-specific scales a transformer's residual stream is known for.
    Per sample: over that sample's tokens only.
`cls_magnitude`: the CLS token c (index 0 of the output of `model.encoder`, i.e. after encoder.ln) has
    rms(c) = sqrt(mean_d c_d^2); per sample (rms(c) / ref_rms - 1)^2, where ref_rms is the mean rms over the
    reference images; the batch loss is the mean. Its deviation from the reference rather than its raw magnitude:
    after the final LayerNorm the norm is nearly fixed by the affine weights, so "smaller" has no meaning, while
    an atypical magnitude marks noise the head was never trained on. Relative, so one weight suits any width.
`attn_entropy`, `attn_diversity`: torchvision calls attention with need_weights=False, so the probabilities are
    recomputed from each chosen block's self_attention INPUT (ln_1's output) and the layer's own projection:
    q, k = x W_q^T + b_q, x W_k^T + b_k split into heads, P = softmax(q k^T / sqrt(head_dim)), (N, heads, T, T),
    exactly what nn.MultiheadAttention(need_weights=True, average_attn_weights=False) returns; the model's own
    forward and outputs are untouched.
    entropy_b = mean over heads and query rows of -sum_j P_ij log P_ij (nats, in [0, log T]) and
    similarity_b = mean over unordered head pairs (h, h') of cos(P_h, P_h') with the maps flattened to T*T (in
    [0, 1]) are measured per block b and compared with the same block's level on the reference images:
        attn_entropy = mean over blocks of (entropy_b / ref_entropy_b - 1)^2, attn_diversity likewise,
    as `cls_magnitude` is. Minimising the raw values pushed toward one-hot, orthogonal attention that no real image
    produces; the target's attention on real images is what a training image looks like to it.
    Per sample: the same means within one sample; the batch loss is the mean over samples. Means (not sums) over
    blocks keep both in a fixed range whatever the depth.
`logits` and `tv` as for CNNs (the head is `heads.head`; its outputs are the model's outputs).

Global batch statistics
-----------------------
Every batch loss is a function of SUMS over samples: per-channel sums of (x - shift) and (x - shift)^2 with counts
for the statistics terms (shift = the reference mean, which every process knows, so E[x^2] - E[x]^2 does not
cancel catastrophically), and sums of per-sample losses with sample counts for the other terms. All of one
forward's sums are packed into one float32 vector and passed ONCE through `reduce_sum` (identity by default; in
distributed training a differentiable all-reduce such as torch.distributed.nn.functional.all_reduce), so k
processes with n images each get exactly the loss of one process with k*n images. Gradients: that all-reduce's
backward sums the upstream gradient over ranks, so each rank's gradient is world_size times its share, and
DDP's gradient averaging divides it back: the net is the gradient of the global loss. Per-sample values never
need a reduction.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reid_batch import log
from reid_batch.errors import InputError
from reid_batch.archs import CNN_ALLOWED_TERMS, CNN_TERMS, FAMILY_TERMS, VIT_TERMS  # noqa: F401 - re-exported
from reid_batch.models.pggan import latent_bins
from reid_batch.models.targets import family as target_family

# Stage 2 scores candidates by how well they match the target; image smoothness says nothing about that.
SCORING_EXCLUDES = ("tv",)
FEATURE_STD_EPS = 1e-8

ReduceSum = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


def assign_classes(n: int, num_classes: int, offset: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Class of each of n samples: (offset + i) mod K with K = 2 for a one-logit binary target, else num_classes.

    A process holding samples offset .. offset+n-1 of a global batch gets the same classes as the single-process run.
    """
    if n < 0 or num_classes < 1:
        raise ValueError(f"need n >= 0 and num_classes >= 1, got n={n}, num_classes={num_classes}")
    k = 2 if num_classes == 1 else num_classes
    return (torch.arange(n, device=device) + offset) % k


def condition_latents(latents: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """The latents with each sample's class written into its first coordinate, so the generator can tell.

    An unconditional generator cannot know which half of a batch is asked for which class: pushed toward both, the
    logits term can only settle at maximal uncertainty. Here z_0 is moved into the class's equal-probability bin of
    the standard normal, keeping its rank inside the bin: z_0 = Phi^-1((class + Phi(z_0)) / K). Over balanced
    classes z_0 stays N(0, 1), so the prior's input distribution is unchanged, and z_0 alone tells the class.
    """
    k = 2 if num_classes == 1 else num_classes
    out = latents.clone()
    within = torch.special.ndtr(latents[:, 0].double()).clamp(1e-12, 1 - 1e-12)
    out[:, 0] = torch.special.ndtri((classes.double() + within) / k).clamp(-8, 8).to(latents.dtype)
    return out


def requested_classes(latents: Tensor, num_classes: int) -> Tensor:
    """The class each latent asks for under `condition_latents`: the equal-probability bin of the standard normal
    that z_0 falls in (the inverse of that function; any N(0, 1) latent, conditioned or not, asks for one)."""
    return latent_bins(latents[:, 0], 2 if num_classes == 1 else num_classes)


def check_classes(classes: Tensor, n: int, k: int) -> None:
    """Refuse classes that are not one per sample in [0, k). On a CPU the values are read (ValueError). On a GPU,
    reading min and max to the host made every fine-tuning step wait for the device; a device-side assertion checks
    the same without waiting (it stops the process at the next synchronisation, with this message)."""
    if classes.shape != (n,):
        raise ValueError(f"classes must be ({n},) with values in [0, {k}), got {tuple(classes.shape)}")
    if not n:
        return
    if classes.device.type == "cpu":
        if int(classes.min()) < 0 or int(classes.max()) >= k:
            raise ValueError(f"classes must be in [0, {k}), got values from {int(classes.min())} to "
                             f"{int(classes.max())}")
        return
    torch._assert_async(((classes >= 0) & (classes < k)).all(), f"classes must be in [0, {k})")


def predicted_classes(logits: Tensor) -> Tensor:
    """The class the target predicts: logit > 0 for a one-logit binary target, else the argmax."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def class_losses(logits: Tensor, classes: Tensor) -> Tensor:
    """Per-sample binary cross-entropy (one logit) or cross-entropy toward `classes`, shape (N,)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], classes.to(logits.dtype), reduction="none")
    return F.cross_entropy(logits, classes, reduction="none")


def total_variation(images01: Tensor) -> Tensor:
    """Anisotropic L1 total variation of each image, (N,): mean |vertical| + mean |horizontal| neighbour differences."""
    x = images01.float()
    # Reduced over (C, H, W) in place: flatten(1) would copy each strided difference first.
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs_().mean(dim=(1, 2, 3))
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs_().mean(dim=(1, 2, 3))
    return dh + dw


def _projection_weights(mha: nn.MultiheadAttention) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    if mha._qkv_same_embed_dim:
        w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q = b_k = None
    if mha.in_proj_bias is not None:
        b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    return w_q, w_k, b_q, b_k


def attention_log_probabilities(mha: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """log softmax(q k^T / sqrt(head_dim)) of self-attention on x, shape (N, heads, T, T), in float32.

    x is the layer's query (= key) input, (N, T, D) if mha.batch_first else (T, N, D). Log-probabilities keep the
    entropy finite where a probability underflows to 0.
    """
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("attention with bias_k/bias_v or add_zero_attn is not supported")
    if not mha.batch_first:
        x = x.transpose(0, 1)
    n, t, d = x.shape
    heads = mha.num_heads
    head_dim = d // heads
    w_q, w_k, b_q, b_k = _projection_weights(mha)
    q = F.linear(x, w_q, b_q).view(n, t, heads, head_dim).transpose(1, 2)
    k = F.linear(x, w_k, b_k).view(n, t, heads, head_dim).transpose(1, 2)
    # Autocast recasts a matmul of float32 inputs to bf16/fp16: the scores and their softmax must not follow it.
    with torch.autocast(device_type=x.device.type, enabled=False):
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(head_dim)
        return scores.log_softmax(dim=-1)


def attention_probabilities(mha: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """Per-head self-attention probabilities (N, heads, T, T) that `mha` computes on x, recomputed from its weights."""
    return attention_log_probabilities(mha, x).exp()


def _attention_terms(log_p: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample (entropy, head similarity) of one block's attention, each (N,)."""
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1).mean(dim=(1, 2))
    heads = p.shape[1]
    if heads < 2:
        return entropy, torch.zeros_like(entropy)
    unit = F.normalize(p.float().flatten(2), dim=-1)
    with torch.autocast(device_type=unit.device.type, enabled=False):  # as for the scores above
        gram = unit @ unit.transpose(1, 2)
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return entropy, off_diagonal / (heads * (heads - 1))


def _cls_rms(cls: Tensor) -> Tensor:
    return cls.float().square().mean(dim=1).add(1e-12).sqrt()


def _channels_first(x: Tensor, channel_dim: int) -> Tensor:
    """(N, C, L) view of an activation with channels at `channel_dim` and every other non-batch dim flattened."""
    x = x.float()
    if channel_dim != 1:
        x = x.movedim(channel_dim, 1)
    return x.flatten(2) if x.ndim > 2 else x.unsqueeze(2)


def _shifted_sums(x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-sample per-channel sums of (x - shift) and (x - shift)^2, (N, C) each, and positions per sample."""
    d = x - shift.view(1, -1, 1)
    return d.sum(2), d.square().sum(2), x.shape[2]


def _option(options, name: str, default):
    if options is None:
        return default
    if isinstance(options, Mapping):
        return options.get(name, default)
    return getattr(options, name, default)


def _similar(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    if close:
        return "close matches: " + ", ".join(close)
    if candidates:
        return "valid names look like: " + ", ".join(candidates[:5])
    return "the model has no suitable module"


def _resolve(
    model: nn.Module, name: str, where: str, accept: Callable[[nn.Module], bool], kind: str
) -> nn.Module:
    modules = dict(model.named_modules())
    typed = [n for n, m in modules.items() if n and accept(m)]
    if name not in modules:
        raise InputError(f"the target has no module '{name}'; {_similar(name, typed or list(modules))}", where=where)
    module = modules[name]
    if not accept(module):
        raise InputError(
            f"'{name}' is a {type(module).__name__}, not a {kind}; {_similar(name, typed)}", where=where
        )
    return module


def _is_layernorm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm)


def _attention_of(m: nn.Module) -> nn.MultiheadAttention | None:
    if isinstance(m, nn.MultiheadAttention):
        return m
    inner = getattr(m, "self_attention", None)
    return inner if isinstance(inner, nn.MultiheadAttention) else None


def _resolve_list(
    model: nn.Module, names, where: str, accept: Callable[[nn.Module], bool], kind: str
) -> list[tuple[str, nn.Module]]:
    if names == "all":
        found = [(n, m) for n, m in model.named_modules() if n and accept(m)]
        if not found:
            raise InputError(f"the target has no {kind} layers", where=where)
        return found
    if isinstance(names, str) or not names:
        raise InputError(f"give 'all' or a non-empty list of module paths, got {names!r}", where=where)
    seen: set[str] = set()
    found = []
    for i, name in enumerate(names):
        if name in seen:
            raise InputError(f"'{name}' is listed twice", where=f"{where}[{i}]")
        seen.add(name)
        found.append((name, _resolve(model, name, f"{where}[{i}]", accept, kind)))
    return found


class _Recorder:
    """Forward hooks that store what they see, only while the objective runs its own forward pass.

    Outside `active`, the hooks store nothing, so using the target elsewhere neither leaks memory nor graphs.
    """

    def __init__(self) -> None:
        self.values: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        self.expected: list[str] = []
        self.active = False
        self._handles: list = []

    def _store(self, key: str, value) -> None:
        if not self.active:
            return
        if not isinstance(value, Tensor):
            raise RuntimeError(f"hook {key} expected a tensor, got {type(value).__name__}")
        self.calls[key] = self.calls.get(key, 0) + 1
        self.values[key] = value

    def input_of(self, name: str, module: nn.Module) -> str:
        key = f"input of {name}"

        def hook(_module, args):
            self._store(key, args[0])

        self._handles.append(module.register_forward_pre_hook(hook))
        self.expected.append(key)
        return key

    def output_of(self, name: str, module: nn.Module) -> str:
        key = f"output of {name}"

        def hook(_module, _args, output):
            self._store(key, output)

        self._handles.append(module.register_forward_hook(hook))
        self.expected.append(key)
        return key

    def self_attention_input(self, name: str, mha: nn.MultiheadAttention) -> str:
        key = f"self-attention input of {name}"

        def hook(_module, args, kwargs):
            if not self.active:
                return
            query = args[0] if args else kwargs.get("query")
            key_input = args[1] if len(args) > 1 else kwargs.get("key")
            # Recomputing probabilities from one input is only right for unmasked self-attention.
            if key_input is not None and key_input is not query:
                raise RuntimeError(f"{name}: key differs from query; only self-attention can be recomputed")
            if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None:
                raise RuntimeError(f"{name}: masked attention is not supported")
            self._store(key, query)

        self._handles.append(mha.register_forward_pre_hook(hook, with_kwargs=True))
        self.expected.append(key)
        return key

    def start(self) -> None:
        self.values.clear()
        self.calls.clear()
        self.active = True

    def stop(self) -> None:
        self.active = False

    def check(self) -> None:
        missing = [k for k in self.expected if k not in self.calls]
        if missing:
            raise RuntimeError(
                "configured hooks did not fire, so their terms would silently be missing: " + "; ".join(missing)
            )
        repeated = [k for k in self.expected if self.calls[k] > 1]
        if repeated:
            raise RuntimeError("modules called more than once per forward pass (ambiguous): " + "; ".join(repeated))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.values.clear()


@dataclass
class ObjectiveResult:
    """One forward pass's objective.

    total: weighted scalar batch loss (all configured terms), reduced over processes.
    terms: unweighted scalar batch loss per term.
    per_sample: unweighted per-sample loss per term, (N,) each, from this process's samples only.
    per_sample_total: weighted sum over terms except `tv`, (N,): stage 2's match score (lower is better).
    logits: the target's outputs (N, C); classes: the class each sample's `logits` term aimed at, (N,).
    features: for Mahalanobis distances: CNN, per-channel spatial means of the input of the last BatchNorm2d
        (GroupNorm CNN: of the last GroupNorm)
        (N, C_last); ViT, the CLS token after encoder.ln (N, hidden). See TargetObjective.feature_prior.
    Tensors keep their autograd graph when computed with gradients; detach them before storing.
    """

    total: Tensor
    terms: dict[str, Tensor]
    per_sample: dict[str, Tensor]
    per_sample_total: Tensor
    logits: Tensor
    classes: Tensor
    features: Tensor | None


class TargetObjective:
    """Hooks on a frozen target that turn one forward pass into every configured term (see the module docstring).

    terms: term name -> weight (>= 0); terms with weight 0 are not computed. options: an ObjectiveSpec or a
    mapping with first_bn_multiplier, feature_layer, feature_target {mean, std}, layernorm_layers,
    attention_blocks (defaults as in the manifest). reference_stats: from `compute_reference_stats`, needed by
    the ViT's ln_stats and cls_magnitude. field_prefix names the manifest section in error messages.
    Use as a context manager, or call close(), to remove the hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        terms: Mapping[str, float],
        options=None,
        reference_stats: Mapping[str, Tensor] | None = None,
        family: str | None = None,
        field_prefix: str = "targets[0].objective",
    ) -> None:
        self.model = model
        self.family = family or target_family(model)
        self.field_prefix = field_prefix
        allowed = FAMILY_TERMS[self.family]
        unknown = sorted(set(terms) - set(allowed))
        if unknown:
            raise InputError(
                f"terms {unknown} do not apply to a {self.family}; allowed: {list(allowed)}", where=f"{field_prefix}.terms"
            )
        bad = {k: w for k, w in terms.items() if not (math.isfinite(float(w)) and float(w) >= 0)}
        if bad:
            raise InputError(f"weights must be finite and >= 0, got {bad}", where=f"{field_prefix}.terms")
        # Canonical order, so totals add up in the same order on every process.
        self.weights = {t: float(terms[t]) for t in allowed if t in terms and float(terms[t]) > 0}
        if not self.weights:
            raise InputError("at least one term needs a positive weight", where=f"{field_prefix}.terms")
        self.first_bn_multiplier = float(_option(options, "first_bn_multiplier", 1.0))
        feature_target = _option(options, "feature_target", None)
        self.feature_target_source = str(_option(feature_target, "source", "model"))
        self.feature_target_mean: float | Tensor = float(_option(feature_target, "mean", 0.0))
        self.feature_target_std: float | Tensor = float(_option(feature_target, "std", 1.0))
        self.feature_target_from: str | None = None
        self._recorder = _Recorder()
        self._bn_keys: list[tuple[str, nn.BatchNorm2d]] = []
        self._last_bn: tuple[str, nn.BatchNorm2d] | None = None
        self._feature_key: str | None = None
        self._encoder_key: str | None = None
        self._reference: dict[str, Tensor] = {}
        self._device_reference: dict[tuple[str, torch.device], Tensor] = {}
        self._ln_keys: list[tuple[str, str]] = []
        self._attn_keys: list[tuple[str, nn.MultiheadAttention]] = []
        self._attn_levels: list[tuple[float, float]] = []  # per block: reference (entropy, head similarity)
        self._gn_keys: list[tuple[str, str]] = []
        self._last_gn: tuple[str, str] | None = None
        self.fallback: dict | None = None
        try:
            if self.family == "cnn":
                self._setup_cnn(options, reference_stats)
            elif self.family == "vit":
                self._setup_vit(options, reference_stats)
            else:
                raise ValueError(f"unknown target family {self.family!r}")
        except BaseException:
            self._recorder.remove()
            raise
        log.event(
            "objective_ready",
            family=self.family,
            terms=self.weights,
            hooks=len(self._recorder.expected),
            fallback=self.fallback,
        )

    # ------------------------------------------------------------------------------------------- setup

    def _fall_back_from_bn(self, reference_stats) -> None:
        """No BatchNorm running statistics: replace bn_stats by gn_stats where the target has GroupNorms and
        reference statistics are given, else drop it. Recorded in self.fallback and logged."""
        weight = self.weights.pop("bn_stats")
        groupnorms = [n for n, m in self.model.named_modules() if isinstance(m, nn.GroupNorm)]
        added = []
        if groupnorms and reference_stats is not None and "gn_stats" not in self.weights:
            self.weights["gn_stats"] = weight
            added.append("gn_stats")
        self.weights = {t: self.weights[t] for t in CNN_ALLOWED_TERMS if t in self.weights}
        if not self.weights:
            raise InputError("bn_stats was the only term and the target has no BatchNorm running statistics; "
                             "add feature_stats, logits or gn_stats", where=f"{self.field_prefix}.terms")
        reason = ("the target has no BatchNorm running statistics (GroupNorm: trained with DP-SGD?)" if groupnorms
                  else "the target has no BatchNorm running statistics")
        if groupnorms and reference_stats is None:
            reason += "; no reference statistics were given, so gn_stats cannot replace bn_stats"
        self.fallback = {"dropped": ["bn_stats"], "added": added, "terms": list(self.weights), "reason": reason}
        log.event("objective_fallback", **self.fallback)

    def _setup_cnn(self, options, reference_stats=None) -> None:
        bns = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        with_statistics = all(bn.running_mean is not None and bn.running_var is not None for _, bn in bns)
        if "bn_stats" in self.weights and (not bns or not with_statistics):
            self._fall_back_from_bn(reference_stats)
            bns = [] if not with_statistics else bns
        for name, bn in bns:
            if bn.running_mean is None or bn.running_var is None:
                raise InputError(f"BatchNorm '{name}' tracks no running statistics", where=f"{self.field_prefix}.terms")
        groupnorms = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.GroupNorm)]
        if "gn_stats" in self.weights:
            if not groupnorms:
                raise InputError("gn_stats needs GroupNorm layers; the target has none",
                                 where=f"{self.field_prefix}.terms")
            for name, module in groupnorms:
                self._check_reference(reference_stats, f"gn/{name}/mean", (module.num_channels,))
                self._check_reference(reference_stats, f"gn/{name}/var", (module.num_channels,))
                self._gn_keys.append((self._recorder.input_of(name, module), name))
        if not bns and groupnorms and reference_stats is not None:
            name, module = groupnorms[-1]
            if f"gn/{name}/mean" in reference_stats:
                self._check_reference(reference_stats, f"gn/{name}/mean", (module.num_channels,))
                self._check_reference(reference_stats, f"gn/{name}/var", (module.num_channels,))
                key = next((k for k, n in self._gn_keys if n == name), None) or self._recorder.input_of(name, module)
                self._last_gn = (key, name)
        if "bn_stats" in self.weights:
            self._bn_keys = [(self._recorder.input_of(n, m), m) for n, m in bns]
        if bns:
            name, bn = bns[-1]
            key = next((k for k, m in self._bn_keys if m is bn), None) or self._recorder.input_of(name, bn)
            self._last_bn = (key, bn)
        if "feature_stats" in self.weights:
            layer_name = _option(options, "feature_layer", "layer4.1.conv2")
            layer = _resolve(
                self.model, layer_name, f"{self.field_prefix}.feature_layer", lambda m: True, "module"
            )
            self._feature_key = self._recorder.output_of(layer_name, layer)
            if self.feature_target_source == "model":
                self._feature_target_from_model(layer_name, layer, reference_stats)
            else:
                self.feature_target_from = f"fixed mean {self.feature_target_mean:g}, std {self.feature_target_std:g}"

    def _feature_target_from_model(self, layer_name: str, layer: nn.Module, reference_stats) -> None:
        """Per-channel feature targets from the normalisation layer that reads `layer`'s output."""
        where = f"{self.field_prefix}.feature_target.source"
        # The normalisation layer registered right after the feature layer's own submodules: torchvision's ResNets
        # (conv2 -> bn2, downsample.0 -> downsample.1), DenseNets (denseblock4 -> norm5) and VGG-BN read it next.
        names = [name for name, _ in self.model.named_modules()]
        modules = dict(self.model.named_modules())
        after = [n for n in names[names.index(layer_name) + 1:] if not n.startswith(layer_name + ".")]
        follower = after[0] if after else None
        norm = modules.get(follower) if follower else None
        channels = getattr(layer, "out_channels", None)
        if channels is not None and getattr(norm, "num_features", getattr(norm, "num_channels", channels)) != channels:
            norm = None
        if isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None:
            self.feature_target_mean = norm.running_mean.detach().clone()
            self.feature_target_std = (norm.running_var.detach() + norm.eps).sqrt()
            self.feature_target_from = f"running statistics of {follower}"
        elif isinstance(norm, nn.GroupNorm) and reference_stats is not None and f"gn/{follower}/mean" in reference_stats:
            self.feature_target_mean = reference_stats[f"gn/{follower}/mean"].detach().float().clone()
            self.feature_target_std = (reference_stats[f"gn/{follower}/var"].detach().float() + norm.eps).sqrt()
            self.feature_target_from = f"reference statistics of {follower}"
        elif isinstance(norm, nn.GroupNorm):
            # A GroupNorm keeps no statistics, and none were measured: the stated fixed target is all there is.
            self.feature_target_from = (f"fixed mean {self.feature_target_mean:g}, std {self.feature_target_std:g} "
                                        f"({follower} is a GroupNorm and no reference statistics were given)")
            log.event("feature_target_fixed", layer=layer_name, follower=follower, reason="no reference statistics")
        else:
            raise InputError(f"feature_stats takes its target from the normalisation layer after '{layer_name}', but "
                             f"found none with statistics ('{follower}'); choose a convolution followed by a "
                             "BatchNorm (or a GroupNorm with reference statistics), or set feature_target.source: "
                             "fixed with mean and std", where=where)

    def _setup_vit(self, options, reference_stats) -> None:
        encoder = getattr(self.model, "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise ValueError("a ViT target needs an `encoder` module (torchvision VisionTransformer)")
        self._encoder_key = self._recorder.output_of("encoder", encoder)
        if reference_stats is not None and "cls/mean" in reference_stats and "cls/var" in reference_stats:
            self._check_reference(reference_stats, "cls/mean", (self.model.hidden_dim,))
            self._check_reference(reference_stats, "cls/var", (self.model.hidden_dim,))
        if "ln_stats" in self.weights:
            layers = _resolve_list(
                self.model,
                _option(options, "layernorm_layers", "all"),
                f"{self.field_prefix}.layernorm_layers",
                _is_layernorm,
                "LayerNorm",
            )
            for name, module in layers:
                self._check_reference(reference_stats, f"ln/{name}/mean", module.normalized_shape)
                self._check_reference(reference_stats, f"ln/{name}/var", module.normalized_shape)
                self._ln_keys.append((self._recorder.input_of(name, module), name))
        if "cls_magnitude" in self.weights:
            self._check_reference(reference_stats, "cls/rms", ())
            if float(reference_stats["cls/rms"]) <= 0:
                raise InputError("reference CLS rms must be positive", where=f"{self.field_prefix}.reference")
        if "attn_entropy" in self.weights or "attn_diversity" in self.weights:
            paths = {id(m): n for n, m in self.model.named_modules()}
            chosen = _option(options, "attention_blocks", "all")
            where = f"{self.field_prefix}.attention_blocks"
            blocks = _resolve_list(
                self.model, chosen, where, lambda m: _attention_of(m) is not None, "attention block"
            )
            seen: dict[int, str] = {}
            for name, block in blocks:
                mha = _attention_of(block)
                # "all" finds each block and, inside it, its attention layer: one attention, counted once.
                if id(mha) in seen:
                    if chosen == "all":
                        continue
                    raise InputError(f"'{name}' is the same attention as '{seen[id(mha)]}'", where=where)
                seen[id(mha)] = name
                if mha.bias_k is not None or mha.add_zero_attn:
                    raise InputError(
                        f"'{name}' uses bias_k/add_zero_attn, which the recomputation does not model",
                        where=f"{self.field_prefix}.attention_blocks",
                    )
                if "attn_diversity" in self.weights and mha.num_heads < 2:
                    raise InputError(
                        f"attn_diversity compares heads, but '{name}' has {mha.num_heads}",
                        where=f"{self.field_prefix}.terms",
                    )
                self._attn_keys.append((self._recorder.self_attention_input(name, mha), mha))
                levels = []
                for measure in ("entropy", "diversity"):
                    key = f"attn/{paths[id(mha)]}/{measure}"
                    self._check_reference(reference_stats, key, ())
                    levels.append(float(reference_stats[key]))
                if levels[0] <= 0 or ("attn_diversity" in self.weights and levels[1] <= 0):
                    raise InputError(f"the reference attention of '{name}' is degenerate (entropy {levels[0]:.3g}, "
                                     f"head similarity {levels[1]:.3g})", where=f"{self.field_prefix}.reference")
                self._attn_levels.append((levels[0], max(levels[1], 1e-6)))

    def _check_reference(self, reference_stats, key: str, shape) -> None:
        where = f"{self.field_prefix}.reference"
        if reference_stats is None:
            raise ValueError("ln_stats, cls_magnitude and gn_stats need reference_stats (see compute_reference_stats)")
        if key not in reference_stats:
            raise InputError(
                f"reference statistics lack '{key}'; recompute them with compute_reference_stats on this target",
                where=where,
            )
        value = torch.as_tensor(reference_stats[key], dtype=torch.float32)
        if tuple(value.shape) != tuple(shape):
            raise InputError(
                f"reference '{key}' has shape {tuple(value.shape)}, the target needs {tuple(shape)}: "
                "statistics of a different model?",
                where=where,
            )
        self._reference[key] = value
        self._device_reference.clear()

    def _reference_on(self, key: str, device: torch.device) -> Tensor:
        """A reference statistic on `device`, copied there once (a copy per forward was a host sync per layer)."""
        cached = self._device_reference.get((key, device))
        if cached is None:
            cached = self._device_reference[(key, device)] = self._reference[key].to(device)
        return cached

    # ------------------------------------------------------------------------------------------- forward

    def feature_prior(self) -> tuple[Tensor, Tensor] | None:
        """(mean, variance) per feature channel the target's own statistics imply, for Mahalanobis distances.

        CNN: the last BatchNorm2d's running mean and variance. These describe single positions of its input;
        `features` are spatial means, whose variance is smaller wherever neighbouring positions decorrelate.
        ViT: the reference CLS statistics, when the reference includes them. None otherwise.
        """
        if self.family == "cnn":
            if self._last_gn is not None:
                name = self._last_gn[1]
                return self._reference[f"gn/{name}/mean"].clone(), self._reference[f"gn/{name}/var"].clone()
            if self._last_bn is None:
                return None
            bn = self._last_bn[1]
            return bn.running_mean.detach().clone(), bn.running_var.detach().clone()
        if "cls/mean" in self._reference and "cls/var" in self._reference:
            return self._reference["cls/mean"].clone(), self._reference["cls/var"].clone()
        return None

    def __call__(self, *args, **kwargs) -> ObjectiveResult:
        return self.forward(*args, **kwargs)

    def forward(
        self,
        target_input: Tensor,
        image01: Tensor | None = None,
        classes: Tensor | None = None,
        reduce_sum: ReduceSum | None = None,
    ) -> ObjectiveResult:
        """All terms for one batch: target_input is what the target sees (N, C, S, S); image01 the [0, 1] image
        (only `tv` reads it). classes: per-sample class for `logits`, None for the target's own prediction.
        reduce_sum is called exactly once, on one float32 vector of this process's sums."""
        if self.model.training:
            raise ValueError("the target must be in eval mode: BatchNorm would use and update batch statistics")
        if "tv" in self.weights and image01 is None:
            raise ValueError("the tv term needs the [0, 1] image")
        self._recorder.start()
        try:
            logits = self.model(target_input)
        finally:
            self._recorder.stop()
        self._recorder.check()
        values = self._recorder.values
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise RuntimeError(f"expected the target to return logits (N, C), got {getattr(logits, 'shape', logits)}")
        n = logits.shape[0]
        if classes is None:
            classes = predicted_classes(logits.detach())
        else:
            classes = torch.as_tensor(classes, device=logits.device).long()
            check_classes(classes, n, 2 if logits.shape[1] == 1 else logits.shape[1])

        # Each term gives its per-sample values, the sums to reduce, and how to finish the batch loss from them.
        pending: list[tuple[str, Tensor, list[Tensor], Callable[..., Tensor]]] = []
        count = torch.full((), float(n), device=logits.device)  # a fill on the device, not a host copy
        for term in self.weights:
            if term == "bn_stats":
                pending.append(("bn_stats", *self._bn_term(values)))
            elif term == "gn_stats":
                pending.append(("gn_stats", *self._gn_term(values)))
            elif term == "feature_stats":
                pending.append(("feature_stats", *self._feature_term(values[self._feature_key])))
            elif term == "ln_stats":
                pending.append(("ln_stats", *self._ln_term(values)))
            elif term == "logits":
                pending.append(("logits", *_mean_term(class_losses(logits, classes), count)))
            elif term == "tv":
                pending.append(("tv", *_mean_term(total_variation(image01), count)))
            elif term == "cls_magnitude":
                rms = _cls_rms(values[self._encoder_key][:, 0])
                ratio = rms / self._reference_on("cls/rms", rms.device)
                pending.append(("cls_magnitude", *_mean_term((ratio - 1).square(), count)))
        if self._attn_keys:
            entropy, diversity = self._attention_per_sample(values)
            if "attn_entropy" in self.weights:
                pending.append(("attn_entropy", *_mean_term(entropy, count)))
            if "attn_diversity" in self.weights:
                pending.append(("attn_diversity", *_mean_term(diversity, count)))

        sums = [s for _, _, parts, _ in pending for s in parts]
        reduced = _reduce_all(sums, reduce_sum or _identity)
        terms: dict[str, Tensor] = {}
        per_sample: dict[str, Tensor] = {}
        at = 0
        for name, values_i, parts, finish in pending:
            terms[name] = finish(*reduced[at : at + len(parts)])
            per_sample[name] = values_i
            at += len(parts)
        order = [t for t in self.weights if t in terms]
        total = sum(self.weights[t] * terms[t] for t in order)
        scored = [t for t in order if t not in SCORING_EXCLUDES]
        per_sample_total = torch.zeros(n, device=logits.device)
        for t in scored:
            per_sample_total = per_sample_total + self.weights[t] * per_sample[t]
        features = None
        if self.family == "cnn" and self._last_bn is not None:
            features = _channels_first(values[self._last_bn[0]], 1).mean(2)
        elif self.family == "cnn" and self._last_gn is not None:
            features = _channels_first(values[self._last_gn[0]], 1).mean(2)
        elif self.family == "vit":
            features = values[self._encoder_key][:, 0]
        result = ObjectiveResult(
            total=total,
            terms={t: terms[t] for t in order},
            per_sample={t: per_sample[t] for t in order},
            per_sample_total=per_sample_total,
            logits=logits,
            classes=classes,
            features=features,
        )
        self._recorder.values.clear()
        return result

    def _bn_term(self, values) -> tuple[Tensor, list[Tensor], Callable[..., Tensor]]:
        layers = []
        for i, (key, bn) in enumerate(self._bn_keys):
            multiplier = self.first_bn_multiplier if i == 0 else 1.0
            layers.append((values[key], 1, bn.running_mean.float(), bn.running_var.float(), multiplier))
        return _moment_matching(layers)

    def _gn_term(self, values) -> tuple[Tensor, list[Tensor], Callable[..., Tensor]]:
        layers = []
        for i, (key, name) in enumerate(self._gn_keys):
            x = values[key]
            multiplier = self.first_bn_multiplier if i == 0 else 1.0
            layers.append((x, 1, self._reference_on(f"gn/{name}/mean", x.device),
                           self._reference_on(f"gn/{name}/var", x.device), multiplier))
        return _moment_matching(layers)

    def _ln_term(self, values) -> tuple[Tensor, list[Tensor], Callable[..., Tensor]]:
        layers = []
        for key, name in self._ln_keys:
            x = values[key]
            mean = self._reference_on(f"ln/{name}/mean", x.device)
            var = self._reference_on(f"ln/{name}/var", x.device)
            layers.append((x, x.ndim - 1, mean, var, 1.0))
        return _moment_matching(layers)

    def _feature_term(self, out: Tensor) -> tuple[Tensor, list[Tensor], Callable[..., Tensor]]:
        x = _channels_first(out, 1)
        if isinstance(self.feature_target_mean, Tensor) and self.feature_target_mean.numel() != x.shape[1]:
            raise InputError(f"feature_stats' target has {self.feature_target_mean.numel()} channels, the feature layer "
                             f"{x.shape[1]}", where=f"{self.field_prefix}.feature_target.source")
        m = torch.as_tensor(self.feature_target_mean, dtype=x.dtype, device=x.device).expand(x.shape[1])
        s = torch.as_tensor(self.feature_target_std, dtype=x.dtype, device=x.device).expand(x.shape[1])
        s1, s2, positions = _shifted_sums(x, m)

        def loss(mean_dev: Tensor, var: Tensor) -> Tensor:
            std = (var.clamp_min(0) + FEATURE_STD_EPS).sqrt()
            return mean_dev.square().mean(-1) + (std - s).square().mean(-1)

        mean_i = s1 / positions
        per_sample = loss(mean_i, s2 / positions - mean_i.square())
        count = torch.full((), float(x.shape[0] * positions), device=x.device)

        def finish(t1: Tensor, t2: Tensor, c: Tensor) -> Tensor:
            mean_dev = t1 / c
            return loss(mean_dev, t2 / c - mean_dev.square())

        return per_sample, [s1.sum(0), s2.sum(0), count], finish

    def _attention_per_sample(self, values) -> tuple[Tensor, Tensor]:
        """Per sample: mean over blocks of (entropy_b / reference_b - 1)^2 and the same for head similarity."""
        entropies, diversities = [], []
        for (key, mha), (entropy_level, diversity_level) in zip(self._attn_keys, self._attn_levels):
            entropy, diversity = _attention_terms(attention_log_probabilities(mha, values[key]))
            entropies.append((entropy / entropy_level - 1).square())
            diversities.append((diversity / diversity_level - 1).square())
        return torch.stack(entropies).mean(0), torch.stack(diversities).mean(0)

    # ------------------------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        self._recorder.remove()

    def __enter__(self) -> "TargetObjective":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mean_term(per_sample: Tensor, count: Tensor) -> tuple[Tensor, list[Tensor], Callable[..., Tensor]]:
    return per_sample, [per_sample.sum(), count], lambda total, c: total / c


def _moment_matching(layers) -> tuple[Tensor, list[Tensor], Callable[..., Tensor]]:
    """sum_l m_l (||mu_l - ref_mean_l|| + ||var_l - ref_var_l||) from shifted sums; layers are
    (activation, channel dim, ref_mean, ref_var, m_l). Shifting by ref_mean gives mu - ref_mean directly."""
    per_sample = None
    sums: list[Tensor] = []
    plan = []
    for x, channel_dim, ref_mean, ref_var, multiplier in layers:
        x = _channels_first(x, channel_dim)
        s1, s2, positions = _shifted_sums(x, ref_mean)
        mean_i = s1 / positions
        var_i = s2 / positions - mean_i.square()
        layer_i = multiplier * (
            torch.linalg.vector_norm(mean_i, dim=1) + torch.linalg.vector_norm(var_i - ref_var, dim=1)
        )
        per_sample = layer_i if per_sample is None else per_sample + layer_i
        sums += [s1.sum(0), s2.sum(0), torch.full((), float(x.shape[0] * positions), device=x.device)]
        plan.append((ref_var, multiplier))

    def finish(*reduced: Tensor) -> Tensor:
        total = reduced[0].new_zeros(())
        for i, (ref_var, multiplier) in enumerate(plan):
            t1, t2, c = reduced[3 * i : 3 * i + 3]
            mean_dev = t1 / c
            var = t2 / c - mean_dev.square()
            total = total + multiplier * (
                torch.linalg.vector_norm(mean_dev) + torch.linalg.vector_norm(var - ref_var)
            )
        return total

    return per_sample, sums, finish


def _reduce_all(sums: list[Tensor], reduce_sum: ReduceSum) -> list[Tensor]:
    """One reduction for all sums of a forward pass: one all-reduce per step, not one per layer."""
    if not sums:
        return []
    flat = torch.cat([s.float().reshape(-1) for s in sums])
    out = reduce_sum(flat)
    if out.shape != flat.shape:
        raise RuntimeError(f"reduce_sum changed the shape {tuple(flat.shape)} to {tuple(out.shape)}")
    pieces = []
    at = 0
    for s in sums:
        pieces.append(out[at : at + s.numel()].view(s.shape))
        at += s.numel()
    return pieces


def needs_reference_stats(model: nn.Module, family: str | None = None) -> bool:
    """Whether the target keeps no running statistics of its own: a ViT, or a CNN whose norms are GroupNorms."""
    if (family or target_family(model)) == "vit":
        return True
    has_running = any(isinstance(m, nn.BatchNorm2d) and m.running_mean is not None for m in model.modules())
    return not has_running and any(isinstance(m, nn.GroupNorm) for m in model.modules())


def compute_reference_stats(
    model: nn.Module,
    batches: Iterable[Tensor],
    reduce_sum: ReduceSum | None = None,
) -> dict[str, Tensor]:
    """Statistics of a frozen target without running statistics on reference images: a ViT (ln_stats,
    cls_magnitude) or a GroupNorm CNN (gn_stats, the Mahalanobis Gaussian).

    batches: target-ready inputs (already mapped and normalised). Every LayerNorm and GroupNorm is measured, so one
    cached result serves any `layernorm_layers` choice. Returns float32 tensors:
      "ln/<path>/mean", "ln/<path>/var": per-channel mean and biased variance of the LayerNorm's INPUT over all
          tokens of all images, (hidden,);
      "gn/<path>/mean", "gn/<path>/var": the same for a GroupNorm's input over all positions of all images, (C,);
      ViT only: "cls/rms": mean over images of rms(CLS) after encoder.ln, (); "cls/mean", "cls/var": per-channel
          mean and variance of that CLS token, (hidden,), for Mahalanobis distances; "attn/<path>/entropy",
          "attn/<path>/diversity": per attention layer, the mean over images of its attention entropy and head
          similarity (`_attention_terms`), ();
      "count": number of images, ().
    Accumulated in float64. reduce_sum (identity by default) combines the sums of all processes.
    """
    if model.training:
        raise ValueError("the target must be in eval mode")
    norms = [(n, m, "ln" if isinstance(m, nn.LayerNorm) else "gn") for n, m in model.named_modules()
             if n and isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
    encoder = getattr(model, "encoder", None)
    vit = isinstance(encoder, nn.Module) and any(kind == "ln" for _, _, kind in norms)
    if not norms or (not vit and not any(kind == "gn" for _, _, kind in norms)):
        raise ValueError("reference statistics are for ViT targets (LayerNorms and an `encoder`) or GroupNorm CNNs")
    recorder = _Recorder()
    try:
        keys = [(recorder.input_of(n, m), f"{kind}/{n}", kind) for n, m, kind in norms]
        encoder_key = recorder.output_of("encoder", encoder) if vit else None
        attentions = [(recorder.self_attention_input(n, m), n, m) for n, m in model.named_modules()
                      if vit and isinstance(m, nn.MultiheadAttention)]
        acc: dict[str, Tensor] = {}

        def add(key: str, value: Tensor) -> None:
            acc[key] = acc[key] + value if key in acc else value

        with torch.inference_mode():
            for batch in batches:
                recorder.start()
                try:
                    model(batch)
                finally:
                    recorder.stop()
                recorder.check()
                for key, name, kind in keys:
                    x = recorder.values[key].double()
                    x = x.flatten(0, -2) if kind == "ln" else x.movedim(1, -1).reshape(-1, x.shape[1])
                    add(f"{name}/s1", x.sum(0))
                    add(f"{name}/s2", x.square().sum(0))
                    add(f"{name}/n", torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
                if encoder_key is not None:
                    cls = recorder.values[encoder_key][:, 0].double()
                    add("cls/rms_sum", _cls_rms(cls).double().sum())
                    add("cls/s1", cls.sum(0))
                    add("cls/s2", cls.square().sum(0))
                for key, name, mha in attentions:
                    entropy, diversity = _attention_terms(attention_log_probabilities(mha, recorder.values[key]))
                    add(f"attn/{name}/entropy_sum", entropy.double().sum())
                    add(f"attn/{name}/diversity_sum", diversity.double().sum())
                add("count", torch.tensor(float(batch.shape[0]), dtype=torch.float64, device=batch.device))
                recorder.values.clear()
        if not acc:
            raise ValueError("no reference batches given")
        names = list(acc)
        flat = (reduce_sum or _identity)(torch.cat([acc[k].reshape(-1) for k in names]))
        at = 0
        for k in names:
            acc[k] = flat[at : at + acc[k].numel()].view(acc[k].shape)
            at += acc[k].numel()
    finally:
        recorder.remove()

    stats: dict[str, Tensor] = {}
    for _, name, _ in keys:
        c = acc[f"{name}/n"]
        mean = acc[f"{name}/s1"] / c
        stats[f"{name}/mean"] = mean.float()
        stats[f"{name}/var"] = (acc[f"{name}/s2"] / c - mean.square()).clamp_min(0).float()
    count = acc["count"]
    if encoder_key is not None:
        cls_mean = acc["cls/s1"] / count
        stats["cls/rms"] = (acc["cls/rms_sum"] / count).float()
        stats["cls/mean"] = cls_mean.float()
        stats["cls/var"] = (acc["cls/s2"] / count - cls_mean.square()).clamp_min(0).float()
    for _, name, _ in attentions:
        for measure in ("entropy", "diversity"):
            stats[f"attn/{name}/{measure}"] = (acc[f"attn/{name}/{measure}_sum"] / count).float()
    stats["count"] = count.float()
    log.event("reference_stats_computed", images=int(count), layernorms=sum(k == "ln" for *_, k in keys),
              groupnorms=sum(k == "gn" for *_, k in keys))
    return stats
