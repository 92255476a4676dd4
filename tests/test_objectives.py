"""The stage-1/stage-2 objective: each term against an independent computation, gradients, hooks, global batches."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reid_batch.errors import InputError
from reid_batch.models.targets import TargetInput, build_target, to_target_input
from reid_batch.attack.objectives import (
    CNN_TERMS,
    FEATURE_STD_EPS,
    VIT_TERMS,
    TargetObjective,
    _attention_terms,
    assign_classes,
    attention_log_probabilities,
    attention_probabilities,
    compute_reference_stats,
    total_variation,
)

SIZE = 32
TINY_VIT = dict(patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
SPEC = TargetInput(size=SIZE, channels=3)
ALL_CNN = {t: 1.0 for t in CNN_TERMS}
ALL_VIT = {t: 1.0 for t in VIT_TERMS}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _freeze(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def _cnn(num_classes: int = 1) -> nn.Module:
    model = build_target("resnet18", num_classes, SIZE)
    # Fresh BatchNorms normalise with mean 0, var 1 and identity affine; random statistics and affine make each
    # layer's output statistics differ from its input's, so a hook on the wrong side would be caught.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.3)
    return _freeze(model)


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    """One binary ResNet-18 for the tests that only read it (building one takes most of a test's time)."""
    torch.manual_seed(1)
    return _cnn()


def _vit(num_classes: int = 1) -> nn.Module:
    model = build_target("vit_custom", num_classes, SIZE, **TINY_VIT)
    # torchvision zero-initialises the head, which would make the logits constant.
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return _freeze(model)


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE)


def _inputs(images01: torch.Tensor) -> torch.Tensor:
    return to_target_input(images01, SPEC)


def _reference(model: nn.Module) -> dict:
    return compute_reference_stats(model, [_inputs(_images(5)), _inputs(_images(3))])


class _Record:
    """The test's own hooks: inputs or outputs of named modules, independent of the objective's."""

    def __init__(self, model: nn.Module, names: list[str], side: str):
        self.seen: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = []
        for name in names:
            if side == "input":
                hook = lambda _m, args, name=name: self.seen.__setitem__(name, args[0].detach())
                self.handles.append(modules[name].register_forward_pre_hook(hook))
            else:
                hook = lambda _m, _a, out, name=name: self.seen.__setitem__(name, out.detach())
                self.handles.append(modules[name].register_forward_hook(hook))

    def close(self):
        for h in self.handles:
            h.remove()


def _bn_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def _bn_by_hand(model, recorded: dict, multiplier: float, per_sample: bool) -> torch.Tensor:
    modules = dict(model.named_modules())
    total = 0
    for i, name in enumerate(_bn_names(model)):
        x, bn = recorded[name], modules[name]
        dims = (2, 3) if per_sample else (0, 2, 3)
        mu, var = x.mean(dims), x.var(dims, unbiased=False)
        layer = torch.linalg.vector_norm(mu - bn.running_mean, dim=-1) + torch.linalg.vector_norm(
            var - bn.running_var, dim=-1
        )
        total = total + (multiplier if i == 0 else 1.0) * layer
    return total


# ------------------------------------------------------------------------------------------------ CNN terms


def test_bn_stats_reads_batchnorm_inputs_not_outputs(cnn):
    model = cnn
    x = _inputs(_images())
    names = _bn_names(model)
    inputs, outputs = _Record(model, names, "input"), _Record(model, names, "output")
    with TargetObjective(model, {"bn_stats": 1.0}, {"first_bn_multiplier": 3.0}) as objective:
        result = objective(x)
    inputs.close(), outputs.close()
    expected = _bn_by_hand(model, inputs.seen, 3.0, per_sample=False)
    wrong_side = _bn_by_hand(model, outputs.seen, 3.0, per_sample=False)
    assert torch.allclose(result.terms["bn_stats"], expected, rtol=1e-4)
    assert not torch.allclose(result.terms["bn_stats"], wrong_side, rtol=1e-2)
    per_sample = _bn_by_hand(model, inputs.seen, 3.0, per_sample=True)
    assert torch.allclose(result.per_sample["bn_stats"], per_sample, rtol=1e-4)


def test_first_bn_multiplier_weighs_only_the_stem(cnn):
    model = cnn
    x = _inputs(_images())
    with TargetObjective(model, {"bn_stats": 1.0}, {"first_bn_multiplier": 1.0}) as objective:
        base = objective(x).terms["bn_stats"]
    with TargetObjective(model, {"bn_stats": 1.0}, {"first_bn_multiplier": 5.0}) as objective:
        boosted = objective(x).terms["bn_stats"]
    record = _Record(model, ["bn1"], "input")
    model(x)
    record.close()
    stem = record.seen["bn1"]
    stem_term = torch.linalg.vector_norm(stem.mean((0, 2, 3)) - model.bn1.running_mean) + torch.linalg.vector_norm(
        stem.var((0, 2, 3), unbiased=False) - model.bn1.running_var
    )
    assert torch.allclose(boosted - base, 4.0 * stem_term, rtol=1e-4)


@pytest.mark.parametrize("layer", ["layer4.1.conv2", "layer3.0.conv1"])
def test_feature_stats_against_hand_computation(layer, cnn):
    model = cnn
    x = _inputs(_images())
    options = {"feature_layer": layer, "feature_target": {"source": "fixed", "mean": 0.2, "std": 0.7}}
    record = _Record(model, [layer], "output")
    with TargetObjective(model, {"feature_stats": 1.0}, options) as objective:
        result = objective(x)
    record.close()
    out = record.seen[layer]
    for dims, got in (((0, 2, 3), result.terms["feature_stats"]), ((2, 3), result.per_sample["feature_stats"])):
        mu, sigma = out.mean(dims), (out.var(dims, unbiased=False) + FEATURE_STD_EPS).sqrt()
        expected = ((mu - 0.2) ** 2).mean(-1) + ((sigma - 0.7) ** 2).mean(-1)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert result.per_sample["feature_stats"].shape == (6,)


def test_feature_stats_target_comes_from_the_following_batchnorm_and_agrees_with_bn_stats(cnn):
    """feature_stats reads layer4.1.conv2's output, the input of layer4.1.bn2. With the model's own target (bn2's
    running statistics) both terms are at their minimum where that layer's batch statistics equal the running
    ones; the old fixed target (mean 0, std 1) still pulled away from there, fighting bn_stats."""
    model = copy.deepcopy(cnn)
    x = _inputs(_images())
    record = _Record(model, ["layer4.1.conv2"], "output")
    model(x)
    record.close()
    out = record.seen["layer4.1.conv2"]
    model.layer4[1].bn2.running_mean.copy_(out.mean((0, 2, 3)))
    model.layer4[1].bn2.running_var.copy_(out.var((0, 2, 3), unbiased=False))
    options = {"feature_layer": "layer4.1.conv2"}
    with TargetObjective(model, {"feature_stats": 1.0}, options) as objective:
        assert objective.feature_target_from == "running statistics of layer4.1.bn2"
        at_running = objective(x).terms["feature_stats"]
    with TargetObjective(model, {"bn_stats": 1.0}) as objective:
        bn = objective(x)
    record = _Record(model, ["layer4.1.bn2"], "input")
    model(x)
    record.close()
    assert torch.allclose(record.seen["layer4.1.bn2"].mean((0, 2, 3)), model.layer4[1].bn2.running_mean, atol=1e-5)
    assert at_running < 1e-6  # the minimum, where bn_stats' bn2 share is zero too
    fixed = {"feature_layer": "layer4.1.conv2", "feature_target": {"source": "fixed", "mean": 0.0, "std": 1.0}}
    with TargetObjective(model, {"feature_stats": 1.0}, fixed) as objective:
        assert objective(x).terms["feature_stats"] > 100 * at_running + 1e-3
    assert torch.isfinite(bn.terms["bn_stats"])
    # A layer no normalisation reads: the model gives no target, so the manifest must state one.
    with pytest.raises(InputError, match="feature_target.source"):
        TargetObjective(model, {"feature_stats": 1.0}, {"feature_layer": "layer4"})
    TargetObjective(model, {"feature_stats": 1.0}, {"feature_layer": "layer4", "feature_target": {"source": "fixed"}}
                    ).close()


def test_logits_binary_and_multiclass():
    for num_classes in (1, 3):
        model = _cnn(num_classes)
        x = _inputs(_images(6))
        classes = assign_classes(6, num_classes)
        with TargetObjective(model, {"logits": 1.0}) as objective:
            result = objective(x, classes=classes)
            predicted = objective(x)
        logits = model(x)
        if num_classes == 1:
            expected = F.binary_cross_entropy_with_logits(logits[:, 0], classes.float(), reduction="none")
            own = (logits[:, 0] > 0).long()
        else:
            expected = F.cross_entropy(logits, classes, reduction="none")
            own = logits.argmax(1)
        assert torch.allclose(result.per_sample["logits"], expected, rtol=1e-5)
        assert torch.allclose(result.terms["logits"], result.per_sample["logits"].mean(), rtol=1e-6)
        assert torch.equal(result.logits, logits)
        assert torch.equal(predicted.classes, own)
        # The predicted class is the most likely one, so its loss is at most that of any other assignment.
        assert (predicted.per_sample["logits"] <= result.per_sample["logits"] + 1e-6).all()


def test_assign_classes_alternates_and_continues_across_shards():
    assert assign_classes(6, 1).tolist() == [0, 1, 0, 1, 0, 1]
    assert assign_classes(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    full = assign_classes(16, 3)
    assert torch.equal(torch.cat([assign_classes(8, 3), assign_classes(8, 3, offset=8)]), full)


def test_tv_is_anisotropic_l1_on_the_image(cnn):
    image = torch.zeros(2, 1, 4, 4)
    image[0, :, :, 2:] = 1.0  # one vertical edge: 4 of the 12 horizontal differences are 1
    image[1] = torch.arange(16.0).view(4, 4) / 15
    expected_ramp = (4 / 15) + (1 / 15)
    assert torch.allclose(total_variation(image), torch.tensor([4 / 12, expected_ramp]))
    model = cnn
    images = _images(4)
    with TargetObjective(model, {"tv": 1.0}) as objective:
        result = objective(_inputs(images), images)
    assert torch.allclose(result.per_sample["tv"], total_variation(images))
    assert torch.allclose(result.terms["tv"], total_variation(images).mean())


def test_features_are_last_batchnorm_input_means(cnn):
    model = cnn
    x = _inputs(_images())
    record = _Record(model, ["layer4.1.bn2"], "input")
    with TargetObjective(model, {"logits": 1.0}) as objective:
        result = objective(x)
        mean, var = objective.feature_prior()
    record.close()
    assert torch.allclose(result.features, record.seen["layer4.1.bn2"].mean((2, 3)))
    assert torch.equal(mean, model.layer4[1].bn2.running_mean)
    assert torch.equal(var, model.layer4[1].bn2.running_var)


# ------------------------------------------------------------------------------------------------ ViT terms


def test_recomputed_attention_equals_multihead_attention_weights():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    x = torch.randn(3, 7, 16)
    _, reference = mha(x, x, x, need_weights=True, average_attn_weights=False)
    assert torch.allclose(attention_probabilities(mha, x), reference, atol=1e-6)
    seq_first = nn.MultiheadAttention(16, 4).eval()
    y = x.transpose(0, 1)
    _, reference = seq_first(y, y, y, need_weights=True, average_attn_weights=False)
    assert torch.allclose(attention_probabilities(seq_first, y), reference, atol=1e-6)


def test_vit_attention_terms_from_the_blocks_own_inputs_relative_to_the_reference():
    model = _vit()
    x = _inputs(_images(4))
    reference = _reference(model)
    block_names = [f"encoder.layers.encoder_layer_{i}" for i in range(2)]
    record = _Record(model, [f"{b}.ln_1" for b in block_names], "output")
    untouched = model(x)
    with TargetObjective(model, {"attn_entropy": 1.0, "attn_diversity": 1.0}, reference_stats=reference) as objective:
        result = objective(x)
        # "all" means each block's attention once, not the block and its self_attention child twice.
        assert len(objective._attn_keys) == TINY_VIT["num_layers"]
    record.close()
    assert torch.equal(result.logits, untouched)
    modules = dict(model.named_modules())
    entropies, similarities = [], []
    for b in block_names:
        h = record.seen[f"{b}.ln_1"]
        _, p = modules[b].self_attention(h, h, h, need_weights=True, average_attn_weights=False)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean((1, 2))
        flat = p.flatten(2)
        similarity = F.cosine_similarity(flat[:, 0], flat[:, 1], dim=-1)
        assert 0 < float(reference[f"{b}.self_attention".replace(b, "attn/" + b) + "/entropy"]) <= math.log(
            (SIZE // 8) ** 2 + 1) + 1e-5
        entropies.append((entropy / reference[f"attn/{b}.self_attention/entropy"] - 1).square())
        similarities.append((similarity / reference[f"attn/{b}.self_attention/diversity"] - 1).square())
    assert torch.allclose(result.per_sample["attn_entropy"], torch.stack(entropies).mean(0), atol=1e-5)
    assert torch.allclose(result.per_sample["attn_diversity"], torch.stack(similarities).mean(0), atol=1e-5)


def test_attention_terms_are_at_their_minimum_at_the_reference_level_not_at_one_hot_attention():
    """The raw terms were minimised by one-hot, orthogonal attention no real image produces; relative to the
    reference, the images the reference was measured on sit at (about) the minimum."""
    model = _vit()
    x = _inputs(_images(6))
    reference = compute_reference_stats(model, [x])
    with TargetObjective(model, {"attn_entropy": 1.0, "attn_diversity": 1.0}, reference_stats=reference) as objective:
        at_reference = objective(x).terms
        elsewhere = objective(_inputs(_images(6) ** 4)).terms
    for term in ("attn_entropy", "attn_diversity"):
        # At the reference images only their spread around the reference level remains.
        assert at_reference[term] < 0.01 and at_reference[term] < elsewhere[term]
    # What the raw terms rewarded most, fully focused attention (entropy 0), is now as far as it gets: (0 - 1)^2.
    level = float(reference["attn/encoder.layers.encoder_layer_0.self_attention/entropy"])
    focused = torch.eye(5).expand(1, 2, 5, 5).clamp_min(1e-12).log()
    assert (_attention_terms(focused)[0] / level - 1).square().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="reference_stats"):
        TargetObjective(model, {"attn_entropy": 1.0})


def test_attention_terms_signs_reward_focus_and_diversity():
    t = 5
    uniform = torch.full((1, 2, t, t), 1 / t).log()
    focused = torch.eye(t).expand(1, 2, t, t).clamp_min(1e-12).log()
    shifted = torch.stack([torch.eye(t), torch.roll(torch.eye(t), 1, 0)]).unsqueeze(0).clamp_min(1e-12).log()
    e_uniform, d_uniform = _attention_terms(uniform)
    e_focused, d_same = _attention_terms(focused)
    _, d_distinct = _attention_terms(shifted)
    assert torch.allclose(e_uniform, torch.tensor([math.log(t)]))
    assert e_focused.item() < 1e-6 < e_uniform.item()
    assert torch.allclose(d_same, torch.ones(1)) and d_distinct.item() < 1e-6


def test_ln_stats_and_reference_by_hand():
    model = _vit()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert names == [
        "encoder.layers.encoder_layer_0.ln_1",
        "encoder.layers.encoder_layer_0.ln_2",
        "encoder.layers.encoder_layer_1.ln_1",
        "encoder.layers.encoder_layer_1.ln_2",
        "encoder.ln",
    ]
    ref_batches = [_inputs(_images(5)), _inputs(_images(3))]
    record = _Record(model, names + ["encoder"], "input")
    outputs = _Record(model, ["encoder"], "output")
    seen_in, seen_out = [], []
    for batch in ref_batches:
        model(batch)
        seen_in.append(dict(record.seen))
        seen_out.append(outputs.seen["encoder"])
    reference = compute_reference_stats(model, ref_batches)
    for name in names:
        tokens = torch.cat([s[name] for s in seen_in]).flatten(0, 1)
        assert torch.allclose(reference[f"ln/{name}/mean"], tokens.mean(0), atol=1e-5)
        assert torch.allclose(reference[f"ln/{name}/var"], tokens.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
    cls = torch.cat(seen_out)[:, 0]
    assert torch.allclose(reference["cls/rms"], cls.square().mean(1).sqrt().mean(), rtol=1e-5)
    assert reference["count"].item() == 8

    x = _inputs(_images(4))
    chosen = ["encoder.layers.encoder_layer_1.ln_2", "encoder.ln"]
    record.seen.clear(), outputs.seen.clear()
    terms = {"ln_stats": 1.0, "cls_magnitude": 1.0}
    with TargetObjective(model, terms, {"layernorm_layers": chosen}, reference) as objective:
        result = objective(x)
    record.close(), outputs.close()
    batch_expected, sample_expected = 0, 0
    for name in chosen:
        h = record.seen[name]
        mean, var = reference[f"ln/{name}/mean"], reference[f"ln/{name}/var"]
        flat = h.flatten(0, 1)
        batch_expected += torch.linalg.vector_norm(flat.mean(0) - mean) + torch.linalg.vector_norm(
            flat.var(0, unbiased=False) - var
        )
        sample_expected += torch.linalg.vector_norm(h.mean(1) - mean, dim=1) + torch.linalg.vector_norm(
            h.var(1, unbiased=False) - var, dim=1
        )
    assert torch.allclose(result.terms["ln_stats"], batch_expected, rtol=1e-4)
    assert torch.allclose(result.per_sample["ln_stats"], sample_expected, rtol=1e-4)
    cls = outputs.seen["encoder"][:, 0]
    expected_cls = (cls.square().mean(1).sqrt() / reference["cls/rms"] - 1) ** 2
    assert torch.allclose(result.per_sample["cls_magnitude"], expected_cls, rtol=1e-4, atol=1e-8)
    assert torch.allclose(result.features, cls)
    with TargetObjective(model, {"logits": 1.0}, None, reference) as objective:
        mean, var = objective.feature_prior()
    assert torch.equal(mean, reference["cls/mean"]) and torch.equal(var, reference["cls/var"])


# ------------------------------------------------------------------------------------------- gradients


class _TinyGenerator(nn.Module):
    def __init__(self, latent: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent, 4 * 8 * 8),
            nn.Unflatten(1, (4, 8, 8)),
            nn.Upsample(scale_factor=4),
            nn.Conv2d(4, 1, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z):
        return self.net(z)


@pytest.mark.parametrize("arch_terms", ["cnn", "vit"])
def test_every_term_alone_trains_the_generator(arch_terms, cnn):
    model = cnn if arch_terms == "cnn" else _vit()
    reference = _reference(model) if arch_terms == "vit" else None
    names = CNN_TERMS if arch_terms == "cnn" else VIT_TERMS
    z = torch.randn(6, 8)
    for term in names:
        generator = _TinyGenerator()
        with TargetObjective(model, {term: 1.0}, None, reference) as objective:
            images = generator(z)
            result = objective(_inputs(images), images, classes=assign_classes(6, 1))
            result.total.backward()
        grad = torch.sqrt(sum(p.grad.square().sum() for p in generator.parameters() if p.grad is not None))
        assert result.total.item() > 0, term
        assert grad.item() > 0 and math.isfinite(grad.item()), term
    assert all(p.grad is None for p in model.parameters())


def test_total_and_scoring_weights(cnn):
    model = cnn
    images = _images(4)
    weights = {"bn_stats": 0.5, "feature_stats": 2.0, "logits": 3.0, "tv": 10.0}
    with TargetObjective(model, weights) as objective:
        result = objective(_inputs(images), images, assign_classes(4, 1))
    assert list(result.terms) == list(CNN_TERMS)
    expected = sum(weights[t] * result.terms[t] for t in weights)
    assert torch.allclose(result.total, expected)
    scored = sum(weights[t] * result.per_sample[t] for t in ("bn_stats", "feature_stats", "logits"))
    assert torch.allclose(result.per_sample_total, scored)


def test_zero_weight_terms_are_skipped(cnn):
    model = cnn
    # feature_layer is wrong, but feature_stats is off: nothing needs it.
    with TargetObjective(model, {"bn_stats": 1.0, "feature_stats": 0.0}, {"feature_layer": "nope"}) as objective:
        result = objective(_inputs(_images(2)))
    assert list(result.terms) == ["bn_stats"]


# ----------------------------------------------------------------------------------------- per sample


@pytest.mark.parametrize("arch_terms", ["cnn", "vit"])
def test_per_sample_shapes_and_inference_mode(arch_terms, cnn):
    model = cnn if arch_terms == "cnn" else _vit()
    reference = _reference(model) if arch_terms == "vit" else None
    terms = ALL_CNN if arch_terms == "cnn" else ALL_VIT
    images = _images(5)
    classes = assign_classes(5, 1)
    with TargetObjective(model, terms, None, reference) as objective:
        with_grad = objective(_inputs(images), images, classes)
        with torch.inference_mode():
            scored = objective(_inputs(images), images, classes)
    assert set(scored.per_sample) == set(terms)
    for term, values in scored.per_sample.items():
        assert values.shape == (5,), term
        assert not values.requires_grad
        assert torch.allclose(values, with_grad.per_sample[term].detach(), rtol=1e-5, atol=1e-7), term
    for term in ("logits", "tv") + (("cls_magnitude", "attn_entropy", "attn_diversity") if arch_terms == "vit" else ()):
        assert torch.allclose(scored.per_sample[term].mean(), scored.terms[term], rtol=1e-5), term
    assert scored.per_sample_total.shape == (5,)
    assert scored.features.shape == (5, 512 if arch_terms == "cnn" else TINY_VIT["hidden_dim"])


# ------------------------------------------------------------------------------------------ global batch


def _shard_result(objective, x, images, classes, other_sums):
    """One 'process': its own sums plus the other process's, as an all-reduce would deliver them."""
    return objective(x, images, classes, reduce_sum=lambda v: v + other_sums)


def _local_sums(objective, x, images, classes):
    seen = []

    def capture(v):
        seen.append(v.detach())
        return v

    with torch.no_grad():
        objective(x, images, classes, reduce_sum=capture)
    assert len(seen) == 1  # one reduction per forward pass
    return seen[0]


@pytest.mark.parametrize("arch_terms", ["cnn", "vit"])
def test_two_processes_of_eight_equal_one_of_sixteen(arch_terms, cnn):
    model = cnn if arch_terms == "cnn" else _vit()
    reference = _reference(model) if arch_terms == "vit" else None
    terms = ALL_CNN if arch_terms == "cnn" else ALL_VIT
    images = _images(16).requires_grad_(True)
    classes = assign_classes(16, 1)
    with TargetObjective(model, terms, None, reference) as objective:
        full = objective(_inputs(images), images, classes)
        (full_grad,) = torch.autograd.grad(full.total, images)

        first = images[:8].detach().requires_grad_(True)
        second = images[8:].detach()
        second_sums = _local_sums(objective, _inputs(second), second, assign_classes(8, 1, offset=8))
        shard = _shard_result(objective, _inputs(first), first, assign_classes(8, 1, offset=0), second_sums)
        (shard_grad,) = torch.autograd.grad(shard.total, first)
    for term in terms:
        assert torch.allclose(shard.terms[term], full.terms[term], rtol=1e-4, atol=1e-6), term
    assert torch.allclose(shard.total, full.total, rtol=1e-5)
    # The shard's gradient is the global loss's gradient with respect to its own images.
    assert torch.allclose(shard_grad, full_grad[:8], rtol=1e-3, atol=1e-7)
    # Statistics over 8 images alone differ: the test would catch a per-process loss.
    with TargetObjective(model, terms, None, reference) as objective_alone:
        alone = objective_alone(_inputs(first), first, assign_classes(8, 1))
    stat = "bn_stats" if arch_terms == "cnn" else "ln_stats"
    assert not torch.allclose(alone.terms[stat], full.terms[stat], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_feature_layer_names_the_field_and_close_matches(cnn):
    with pytest.raises(InputError) as info:
        TargetObjective(cnn, {"feature_stats": 1.0}, {"feature_layer": "layer4.1.conv9"})
    assert info.value.where == "targets[0].objective.feature_layer"
    assert "layer4.1.conv2" in str(info.value)


def test_vit_paths_that_do_not_exist_are_rejected_with_suggestions():
    model = _vit()
    reference = _reference(model)
    with pytest.raises(InputError) as info:
        TargetObjective(
            model,
            {"ln_stats": 1.0},
            {"layernorm_layers": ["encoder.ln", "encoder.layers.1.ln_1"]},
            reference,
            field_prefix="targets[2].objective",
        )
    assert info.value.where == "targets[2].objective.layernorm_layers[1]"
    assert "encoder.layers.encoder_layer_1.ln_1" in str(info.value)
    with pytest.raises(InputError) as info:
        TargetObjective(model, {"attn_entropy": 1.0}, {"attention_blocks": ["blocks.0.attn"]})
    assert info.value.where == "targets[0].objective.attention_blocks[0]"
    assert "encoder.layers.encoder_layer_0" in str(info.value)
    with pytest.raises(InputError, match="not a LayerNorm"):
        TargetObjective(model, {"ln_stats": 1.0}, {"layernorm_layers": ["encoder.layers.encoder_layer_0.mlp"]}, reference)


def test_terms_and_reference_are_checked(cnn):
    with pytest.raises(InputError) as info:
        TargetObjective(cnn, {"ln_stats": 1.0})
    assert info.value.where == "targets[0].objective.terms"
    with pytest.raises(ValueError, match="reference_stats"):
        TargetObjective(_vit(), {"ln_stats": 1.0})
    other = build_target("vit_custom", 1, SIZE, **{**TINY_VIT, "hidden_dim": 16})
    with pytest.raises(InputError, match="shape"):
        TargetObjective(_vit(), {"ln_stats": 1.0}, None, _reference(_freeze(other)))
    one_head = _freeze(build_target("vit_custom", 1, SIZE, **{**TINY_VIT, "num_heads": 1}))
    with pytest.raises(InputError, match="heads"):
        TargetObjective(one_head, {"attn_diversity": 1.0})


class _SkipsALayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.unused_bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_a_hook_that_never_fires_is_an_error():
    model = _freeze(_SkipsALayer())
    with TargetObjective(model, {"bn_stats": 1.0}, family="cnn") as objective:
        with pytest.raises(RuntimeError, match="unused_bn"):
            objective(_inputs(_images(2)))


def test_hooks_are_inert_outside_and_removed_after(cnn):
    model = cnn
    objective = TargetObjective(model, ALL_CNN)
    model(_inputs(_images(2)))
    assert not objective._recorder.values
    objective.close()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_target_in_train_mode_is_refused(cnn):
    model = cnn
    with TargetObjective(model, {"logits": 1.0}) as objective:
        model.train()
        try:
            with pytest.raises(ValueError, match="eval mode"):
                objective(_inputs(_images(2)))
        finally:
            model.eval()


def test_densenet_hooks_every_batchnorm_and_needs_its_own_feature_layer():
    import torchvision

    model = _freeze(torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=1))
    with pytest.raises(InputError) as info:
        TargetObjective(model, ALL_CNN)
    assert info.value.where == "targets[0].objective.feature_layer"
    images = _images(3)
    record = _Record(model, ["features.norm5"], "input")
    with TargetObjective(model, ALL_CNN, {"feature_layer": "features.denseblock2"}) as objective:
        result = objective(_inputs(images), images)
        mean, _ = objective.feature_prior()
    record.close()
    assert set(result.terms) == set(CNN_TERMS)
    assert torch.allclose(result.features, record.seen["features.norm5"].mean((2, 3)))
    assert torch.equal(mean, model.features.norm5.running_mean)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_condition_latents_writes_the_class_into_z0_and_keeps_the_prior(num_classes):
    from scipy.stats import kstest

    from reid_batch.attack.objectives import assign_classes, condition_latents

    k = 2 if num_classes == 1 else num_classes
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(6000, 8, generator=generator)
    classes = assign_classes(6000, num_classes)
    conditioned = condition_latents(latents, classes, num_classes)
    # z_0 alone tells the class: it lies in the class's equal-probability bin of N(0, 1).
    bins = torch.floor(torch.special.ndtr(conditioned[:, 0].double()) * k).long()
    assert torch.equal(bins, classes)
    # Only z_0 changes; inside each class the order of z_0 is kept (a monotone map).
    assert torch.equal(conditioned[:, 1:], latents[:, 1:])
    for c in range(k):
        chosen = classes == c
        assert torch.equal(torch.argsort(conditioned[chosen, 0]), torch.argsort(latents[chosen, 0]))
    # Over balanced classes z_0 is still standard normal: the generator's input distribution is unchanged.
    assert kstest(conditioned[:, 0].numpy(), "norm").pvalue > 0.01


def test_attention_scores_and_head_similarity_stay_float32_under_autocast():
    """The attention terms' matmuls were cast to float32, but autocast recast them to bf16 (scores, softmax and the
    head Gram matrix off by up to 3e-3 on CPU); they run outside autocast now."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_p = attention_log_probabilities(mha, x)
        entropy, similarity = _attention_terms(log_p)
    assert log_p.dtype == entropy.dtype == similarity.dtype == torch.float32
    # Outside autocast, from the same log-probabilities: the same numbers to float32 precision.
    plain_entropy, plain_similarity = _attention_terms(log_p)
    torch.testing.assert_close(similarity, plain_similarity, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(entropy, plain_entropy, atol=1e-6, rtol=1e-6)


def test_reference_statistics_reach_the_device_once_not_once_per_forward(monkeypatch):
    """ln_stats and cls_magnitude moved every reference tensor to the activations' device in every forward (about 50
    host-to-device copies per ViT batch on a GPU); now each is copied once and reused. Counted here as calls of
    Tensor.to on reference tensors, on the CPU."""
    model = _vit()
    x = _inputs(_images(3))
    reference = _reference(model)
    with TargetObjective(model, {"ln_stats": 1.0, "cls_magnitude": 1.0}, reference_stats=reference) as objective:
        moved = []
        original = torch.Tensor.to

        def counting_to(self, *args, **kwargs):
            if any(self is value for value in objective._reference.values()):
                moved.append(1)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", counting_to)
        first = objective(x)
        after_first = len(moved)
        second = objective(x)
    assert after_first == len(objective._device_reference) > 0 and len(moved) == after_first
    torch.testing.assert_close(first.total, second.total)


def test_classes_are_checked_without_reading_device_values():
    """The logits term's classes were checked with int(classes.min()) and int(classes.max()): two waits for the
    GPU in every fine-tuning step. On a device they are now checked by a device-side assertion; a meta tensor
    stands in for a GPU's here (its values cannot be read at all). CPU classes still give a ValueError."""
    from reid_batch.attack.objectives import check_classes

    check_classes(torch.zeros(4, dtype=torch.long, device="meta"), 4, 2)  # no read: int() would raise here
    with pytest.raises(ValueError, match="got \\(3,\\)"):
        check_classes(torch.zeros(3, dtype=torch.long, device="meta"), 4, 2)
    check_classes(torch.tensor([0, 1, 1, 0]), 4, 2)
    with pytest.raises(ValueError, match=r"in \[0, 2\), got values from 0 to 2"):
        check_classes(torch.tensor([0, 1, 2, 0]), 4, 2)
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        check_classes(torch.tensor([-1, 0]), 2, 3)
