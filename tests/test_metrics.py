"""Each metric against an independent reference: scikit-image, scipy, scikit-learn, or a closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from reid_batch.analysis import metrics
from reid_batch.errors import InputError


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _smooth_images(rng, count, height, width):
    """Structured [0, 1] images: gradients, a disc and a little noise, unlike i.i.d. noise."""
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    images = []
    for _ in range(count):
        cy, cx, radius = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        disc = ((ys - cy) ** 2 + (xs - cx) ** 2 < radius ** 2).astype(float)
        image = 0.3 * xs + 0.2 * ys + 0.4 * disc + rng.normal(0, 0.03, (height, width))
        images.append(np.clip(image, 0, 1))
    return np.stack(images)


# ------------------------------------------------------------------------------------------------ pixel entropy


def test_pixel_entropy_matches_skimage_on_uint8_images(rng):
    from skimage.measure import shannon_entropy

    images = np.stack([
        rng.integers(0, 256, (24, 24)),  # near 8 bits
        rng.integers(100, 104, (24, 24)),  # 2 bits
        np.full((24, 24), 7),  # constant: 0 bits
        (rng.beta(0.5, 3, (24, 24)) * 255).astype(int),  # skewed
    ]).astype(np.uint8)
    expected = [shannon_entropy(image, base=2) for image in images]
    np.testing.assert_allclose(metrics.pixel_entropy(images), expected, atol=1e-12)
    np.testing.assert_allclose(metrics.pixel_entropy(torch.from_numpy(images).unsqueeze(1)), expected, atol=1e-12)
    assert metrics.pixel_entropy(images)[2] == 0.0


def test_pixel_entropy_bins_floats_by_rounding_to_the_nearest_level(rng):
    levels = rng.integers(0, 256, (3, 16, 16)).astype(np.uint8)
    # Within half a level of k/255, a float belongs to level k, so it has the uint8 image's entropy.
    jitter = rng.uniform(-0.49, 0.49, levels.shape) / 255
    floats = np.clip(levels / 255.0 + jitter, 0, 1)
    np.testing.assert_allclose(metrics.pixel_entropy(floats), metrics.pixel_entropy(levels), atol=1e-12)
    # Exactly half a level rounds up; out-of-range floats clip to 0 and 255.
    two_levels = np.array([[[0.5 / 255, 1.0 / 255], [-0.2, 0.0]]])
    assert metrics.pixel_entropy(two_levels)[0] == pytest.approx(1.0)
    np.testing.assert_allclose(metrics.pixel_entropy(np.array([[[1.3, 1.0], [0.999, 255.0]]])), [0.0])


# ---------------------------------------------------------------------------------------------------- PCA kurtosis


def test_pca_kurtosis_matches_scipy_on_sklearn_scores(rng):
    from sklearn.decomposition import PCA

    reference = rng.uniform(0, 1, (60, 8, 8))
    evaluated = rng.laplace(0.5, 0.1, (40, 8, 8))
    basis = metrics.fit_pca(reference, n_components=6, fitted_on="reference")
    scores = PCA(n_components=6).fit(reference.reshape(60, -1)).transform(evaluated.reshape(40, -1))

    result = metrics.pca_kurtosis(evaluated, basis, bootstrap=0)
    expected = scipy.stats.kurtosis(scores, axis=0, fisher=True, bias=False)
    np.testing.assert_allclose(result.per_component, expected, rtol=1e-9)
    assert result.mean == pytest.approx(expected.mean())
    assert math.isnan(result.bootstrap_se) and result.bias_corrected
    moment_ratio = metrics.pca_kurtosis(evaluated, basis, bootstrap=0, bias=True).per_component
    np.testing.assert_allclose(moment_ratio, scipy.stats.kurtosis(scores, axis=0, fisher=True, bias=True), rtol=1e-9)
    assert basis.fitted_on == "reference" and basis.num_fit_images == 60


def test_pca_kurtosis_bootstrap_equals_a_plain_loop(rng):
    reference = rng.normal(0.5, 0.1, (50, 6, 6))
    evaluated = rng.normal(0.5, 0.1, (30, 6, 6))
    basis = metrics.fit_pca(reference, n_components=5)
    result = metrics.pca_kurtosis(evaluated, basis, bootstrap=50, seed=7)

    scores = basis.project(evaluated)
    picks = np.random.default_rng(7).integers(0, 30, size=(50, 30))
    replicates = np.array([scipy.stats.kurtosis(scores[p], axis=0, bias=False) for p in picks])
    assert result.bootstrap_se == pytest.approx(replicates.mean(axis=1).std(ddof=1), rel=1e-9)
    np.testing.assert_allclose(result.per_component_se, replicates.std(axis=0, ddof=1), rtol=1e-9)
    assert metrics.pca_kurtosis(evaluated, basis, bootstrap=50, seed=7).bootstrap_se == result.bootstrap_se


def test_one_common_basis_separates_gaussian_from_heavy_tailed_sets(rng):
    # The study fitted a basis per set; here both sets are scored on the reference's basis.
    axes = np.linalg.qr(rng.normal(size=(64, 3)))[0].T  # 3 orthonormal directions in 8x8 pixel space
    def images(sources):
        return np.clip(0.5 + sources @ axes * 0.05, 0, 1).reshape(-1, 8, 8)
    reference = images(rng.normal(size=(400, 3)) * [3, 2, 1])
    basis = metrics.fit_pca(reference, n_components=3)
    gaussian = metrics.pca_kurtosis(images(rng.normal(size=(2000, 3)) * [3, 2, 1]), basis, bootstrap=100)
    heavy = metrics.pca_kurtosis(images(rng.laplace(size=(2000, 3)) * [3, 2, 1]), basis, bootstrap=100)
    assert abs(gaussian.mean) < 4 * gaussian.bootstrap_se + 0.1
    assert heavy.mean == pytest.approx(3.0, abs=max(0.6, 4 * heavy.bootstrap_se))  # Laplace: excess kurtosis 3
    assert gaussian.per_component.shape == heavy.per_component.shape == (3,)


def test_fit_pca_reduces_components_to_what_the_data_allows(rng):
    basis = metrics.fit_pca(rng.uniform(size=(5, 4, 4)), n_components=50)
    assert basis.num_components == 5
    with pytest.raises(ValueError, match="fitted on 16"):
        basis.project(rng.uniform(size=(3, 5, 5)))


def test_kurtosis_curve_png_is_a_decodable_image(tmp_path):
    import matplotlib.image

    curves = {"original": np.linspace(0, 2, 10), "fine-tuned": np.linspace(1, 0, 10)}
    path = tmp_path / "kurtosis.png"
    png = metrics.kurtosis_curve_png(curves, path, standard_errors={"original": np.full(10, 0.2)})
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and path.read_bytes() == png
    assert matplotlib.image.imread(path).shape[:2] == (450, 700)


# ------------------------------------------------------------------------------------------------------------- FID


def _reference_frechet(mu1, sigma1, mu2, sigma2):
    """tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2), a symmetric PSD matrix."""
    def psd_root(matrix):
        values, vectors = np.linalg.eigh(matrix)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    root1 = psd_root(sigma1)
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def test_frechet_distance_diagonal_closed_form(rng):
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert metrics.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_full_covariance_matches_eigen_reference(rng):
    a, b = rng.normal(size=(12, 12)), rng.normal(size=(12, 12))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(12), b @ b.T + 0.1 * np.eye(12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    expected = _reference_frechet(mu1, sigma1, mu2, sigma2)
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_fid_flags_fewer_images_than_dimensions_and_stays_finite(rng):
    few_a, few_b = rng.normal(size=(10, 32)), rng.normal(0.5, 1.0, size=(10, 32))  # rank-9 covariances
    result = metrics.fid(few_a, few_b)
    assert result.underdetermined and (result.num_a, result.dims) == (10, 32)
    expected = _reference_frechet(few_a.mean(0), np.cov(few_a.T), few_b.mean(0), np.cov(few_b.T))
    assert result.value == pytest.approx(expected, rel=1e-4)
    many = metrics.fid(rng.normal(size=(200, 4)), rng.normal(size=(200, 4)))
    assert not many.underdetermined and 0 <= many.value < 0.5


def test_frechet_distance_rejects_covariances_with_no_real_root():
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


@pytest.fixture(scope="module")
def inception_checkpoint(tmp_path_factory):
    """A random torchvision inception_v3 state dict saved like a user would, with DDP prefixes."""
    from torchvision.models import inception_v3

    from reid_batch.checkpoints import save_state_dict

    torch.manual_seed(3)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    no_aux = tmp_path_factory.mktemp("inception") / "inception_no_aux.safetensors"
    save_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("AuxLogits.")}, no_aux)
    return model, path, no_aux


@pytest.mark.slow
def test_inception_features_use_the_given_weights(inception_checkpoint, rng):
    model, path, no_aux = inception_checkpoint
    images = rng.uniform(0, 1, (2, 1, 80, 80)).astype(np.float32)
    extractor = metrics.InceptionFeatures(path, image_size=None)
    features = extractor(images)
    assert extractor.trained and features.shape == (2, 2048) and np.isfinite(features).all()

    model.fc = torch.nn.Identity()
    model.eval()
    with torch.inference_mode():
        expected = model(torch.from_numpy(images).repeat(1, 3, 1, 1) * 2 - 1).double().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    # The same weights without the auxiliary head (as saved from aux_logits=False) load to the same network.
    without_aux = metrics.InceptionFeatures(no_aux, image_size=None).model.state_dict()
    assert without_aux.keys() == extractor.model.state_dict().keys()
    assert all(torch.equal(without_aux[k], v) for k, v in extractor.model.state_dict().items())


def test_untrained_inception_is_seeded_and_resizes_to_299(rng):
    images = torch.rand(1, 1, 20, 20)
    extractor = metrics.InceptionFeatures(None)
    assert not extractor.trained
    assert extractor._prepare(images).shape == (1, 3, 299, 299)
    first = metrics.InceptionFeatures(None, image_size=None).model.Conv2d_1a_3x3.conv.weight
    assert torch.equal(first, extractor.model.Conv2d_1a_3x3.conv.weight)
    with pytest.raises(ValueError, match="at least 75"):
        metrics.InceptionFeatures(None, image_size=None)(images)


def test_inception_rejects_a_checkpoint_of_another_architecture(tmp_path):
    from reid_batch.checkpoints import save_state_dict

    path = tmp_path / "resnet.safetensors"
    save_state_dict({"conv1.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(InputError, match="inception_v3"):
        metrics.InceptionFeatures(path)


# ------------------------------------------------------------------------------------------------------------ SSIM


@pytest.mark.parametrize("shape", [(32, 32), (20, 27)])
def test_ssim_matches_skimage(rng, shape):
    from skimage.metrics import structural_similarity

    noise_a, noise_b = rng.uniform(size=(2, *shape)), rng.uniform(size=(2, *shape))
    smooth = _smooth_images(rng, 3, *shape)
    shifted = np.roll(smooth, 2, axis=2)
    a = np.concatenate([noise_a, smooth, smooth[:1]])
    b = np.concatenate([noise_b, shifted, np.clip(smooth[:1] + rng.normal(0, 0.05, shape), 0, 1)])
    expected = [
        structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for x, y in zip(a, b)
    ]
    np.testing.assert_allclose(metrics.ssim(a, b), expected, atol=1e-6)
    np.testing.assert_allclose(metrics.ssim(torch.from_numpy(a).float().unsqueeze(1), torch.from_numpy(b).float()
                                            .unsqueeze(1)), expected, atol=1e-4)
    np.testing.assert_allclose(metrics.ssim(smooth, smooth), 1.0, atol=1e-12)


def test_ssim_refuses_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)))


# ---------------------------------------------------------------------------------------------- nearest neighbours


def test_nearest_neighbours_match_sklearn_across_chunks(rng):
    from sklearn.neighbors import NearestNeighbors

    references, queries = rng.normal(size=(53, 9)), rng.normal(size=(17, 9))
    distances, indices = metrics.nearest_neighbours(queries, references, k=3, chunk=7)
    expected_distances, expected_indices = NearestNeighbors(n_neighbors=3).fit(references).kneighbors(queries)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-12)
    # A query equal to a reference is at distance exactly 0 (not the expansion's rounding residue).
    exact, where = metrics.nearest_neighbours(torch.from_numpy(references[[5]] * 1000), references * 1000, k=1)
    assert exact[0, 0] == 0.0 and where[0, 0] == 5


def test_pixel_features_area_average_to_the_requested_size():
    image = np.zeros((1, 1, 64, 64), dtype=np.uint8)
    image[0, 0, 0, 0] = 255  # one bright pixel: a quarter of the top-left 2x2 block
    features = metrics.pixel_features(image, size=32)
    assert features.shape == (1, 1024) and features.dtype == np.float32
    assert features[0, 0] == pytest.approx(0.25) and features[0, 1:].sum() == 0


# --------------------------------------------------------------------------------------------- intervals and AUC


@pytest.mark.parametrize(
    "successes, n, low, high",
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score without correction).
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_published_values(successes, n, low, high):
    assert metrics.wilson_interval(successes, n) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_matches_scipy_binomtest():
    for successes, n, confidence in [(3, 7, 0.95), (12, 12, 0.9), (40, 100, 0.99), (1, 2, 0.5)]:
        expected = scipy.stats.binomtest(successes, n).proportion_ci(confidence, method="wilson")
        interval = metrics.wilson_interval(successes, n, confidence)
        assert interval == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        metrics.wilson_interval(5, 4)


def test_membership_auc_is_the_pairwise_probability_members_are_closer(rng):
    members, nonmembers = rng.normal(0.0, 1, 30).round(1), rng.normal(0.5, 1, 40).round(1)  # rounding makes ties
    pairwise = (members[:, None] < nonmembers[None, :]) + 0.5 * (members[:, None] == nonmembers[None, :])
    assert metrics.membership_auc(members, nonmembers) == pytest.approx(pairwise.mean(), abs=1e-12)
    assert metrics.membership_auc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert metrics.membership_auc([0.3, 0.4], [0.1, 0.2]) == 0.0


# -------------------------------------------------------------------------------------------------- demographics


def test_demographic_errors_by_hand():
    result = metrics.demographic_errors(
        pred_age=[50.0, 40.0, 30.0, 61.0], pred_sex_prob=[0.9, 0.2, 0.5, 0.4],
        true_age=[38.0, 44.0, np.nan, 60.0], true_sex=["M", "M", "F", "F"],
    )
    errors = np.array([12.0, 4.0, 1.0])
    assert result["age_mae"] == pytest.approx(errors.mean()) and result["age_n"] == 3 and result["n"] == 4
    t_low, t_high = scipy.stats.t.interval(0.95, 2, loc=errors.mean(), scale=scipy.stats.sem(errors))
    assert result["age_mae_ci"] == pytest.approx((max(0.0, t_low), t_high))
    # 0.5 counts as male: correct, wrong, wrong, correct.
    assert result["sex_accuracy"] == 0.5 and result["sex_n"] == 4
    assert result["sex_accuracy_ci"] == pytest.approx(metrics.wilson_interval(2, 4))
    numeric = metrics.demographic_errors([50.0], [0.9], [38.0], [1])
    assert numeric["sex_accuracy"] == 1.0 and all(math.isnan(v) for v in numeric["age_mae_ci"])


# ----------------------------------------------------------------------------------------------- re-identification


def test_reidentification_finds_the_training_patient_behind_each_sample(rng):
    train, control = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    train_ids = [f"p{i // 2}" for i in range(40)]  # two images per patient
    control_ids = [f"c{i}" for i in range(40)]
    memorised = train[[3, 10, 11, 25]] + rng.normal(0, 0.01, (4, 6))
    result = metrics.reidentification(memorised, train, train_ids, control, control_ids)
    assert list(result.table["train_patient"]) == ["p1", "p5", "p5", "p12"]
    assert result.rate == 1.0 and result.distinct_train_patients == 3
    assert result.rate_ci == pytest.approx(metrics.wilson_interval(4, 4))
    assert result.p_value == pytest.approx(0.5 ** 4)

    # Each row agrees with a brute-force search.
    d_train = np.linalg.norm(memorised[:, None] - train[None], axis=2)
    d_control = np.linalg.norm(memorised[:, None] - control[None], axis=2)
    np.testing.assert_allclose(result.table["train_distance"], d_train.min(1))
    np.testing.assert_array_equal(result.table["control_index"], d_control.argmin(1))
    # An absolute threshold below the memorised distances re-identifies no one, though they stay closer.
    strict = metrics.reidentification(memorised, train, train_ids, control, control_ids, threshold=1e-6)
    assert strict.rate == 0.0 and strict.table["member_closer"].all()


def test_reidentification_rate_is_near_chance_for_unrelated_samples(rng):
    # Samples that share fixed training/control sets are correlated (neighbouring samples get the same
    # answer), so chance behaviour is checked over many independent worlds, few samples each.
    closer = []
    for _ in range(40):
        train, control = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
        unrelated = rng.normal(size=(10, 4))
        result = metrics.reidentification(unrelated, train, np.arange(200), control, np.arange(200))
        closer.extend(result.table["member_closer"])
    low, high = metrics.wilson_interval(int(np.sum(closer)), len(closer), confidence=0.999)
    assert low < 0.5 < high


def test_mean_shift_interval_covers_the_true_shift_and_zero_under_the_null():
    from reid_batch.analysis.metrics import mean_shift

    rng = np.random.default_rng(0)
    null = rng.normal(50, 10, 2000)
    shifted = mean_shift(rng.normal(53, 10, 2000), null, bootstrap=500, seed=1)
    assert shifted["ci"][0] > 2.0 and shifted["ci"][1] < 4.0
    same = mean_shift(rng.normal(50, 10, 2000), null, bootstrap=500, seed=1)
    assert same["ci"][0] < 0 < same["ci"][1]


@pytest.mark.parametrize("chunk_pixels", [1, 3 * 64, 10**9])
def test_the_gpu_histogram_path_equals_bincount_in_any_chunking(rng, chunk_pixels):
    """The device path of pixel entropy (scatter_add_, chunked so its int64 indices exist for one chunk only), run on
    the CPU: one image per chunk, chunks that do not divide the batch, and the whole batch at once."""
    levels = torch.from_numpy(rng.integers(0, 256, size=(7, 64), dtype=np.uint8))
    levels[2] = 17  # a constant image: one full bin
    expected = torch.stack([torch.bincount(row, minlength=256) for row in levels]).double()
    assert torch.equal(metrics.scatter_histograms(levels, chunk_pixels), expected)


# ------------------------------------------------------------------------------------------------ utility intervals


@pytest.mark.parametrize("outputs", [1, 2, 4])
def test_resampled_classifier_metrics_match_classifier_metrics_on_each_resample(outputs):
    """The vectorised resamples (padded ranks, K one-vs-rest AUCs) against sklearn's on the same rows."""
    from reid_batch.analysis.metrics import classifier_metrics, resampled_classifier_metrics

    rng = np.random.default_rng(outputs)
    labels = torch.from_numpy(rng.integers(0, max(outputs, 2), 48))
    signal = torch.nn.functional.one_hot(labels, outputs).float() if outputs > 1 else labels[:, None].float()
    logits = torch.from_numpy(rng.normal(size=(48, outputs))).float() + signal
    patients = [f"p{i // 3}" for i in range(48)]  # clusters of 3 images: resamples differ in length
    rows, accuracy, auc = resampled_classifier_metrics(logits, labels, patients, 40, seed=3)
    assert len({len(r) for r in rows}) == 1  # equal clusters: equal lengths
    rows2, accuracy2, auc2 = resampled_classifier_metrics(logits, labels, None, 40, seed=3)
    checked = 0
    for r, a, u in list(zip(rows, accuracy, auc)) + list(zip(rows2, accuracy2, auc2)):
        expected = classifier_metrics(logits[r], labels[r])
        assert a == pytest.approx(expected["accuracy"])
        if np.isfinite(expected["auc"]):
            assert u == pytest.approx(expected["auc"], abs=1e-9)
            checked += 1
        else:
            assert not np.isfinite(u)
    assert checked >= 40


def test_resampled_classifier_metrics_with_unequal_clusters():
    from reid_batch.analysis.metrics import classifier_metrics, resampled_classifier_metrics

    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 2, 30))
    logits = torch.from_numpy(rng.normal(size=(30, 1))).float() + labels[:, None].float()
    patients = [f"p{min(i, 20) // 2}" for i in range(30)]  # the last patient has 11 images
    rows, accuracy, auc = resampled_classifier_metrics(logits, labels, patients, 30, seed=1)
    assert len({len(r) for r in rows}) > 1
    for r, a, u in zip(rows, accuracy, auc):
        expected = classifier_metrics(logits[r], labels[r])
        assert a == pytest.approx(expected["accuracy"])
        assert u == pytest.approx(expected["auc"], abs=1e-9) if np.isfinite(expected["auc"]) else not np.isfinite(u)


def test_classifier_intervals_resample_patients_not_their_copies():
    """Five copies of each patient's image: resampling images pretends to 5x the patients and narrows the interval;
    resampling patients gives the width of the patients alone (the positive control for the clustering)."""
    from reid_batch.analysis.metrics import classifier_intervals

    rng = np.random.default_rng(7)
    labels = torch.from_numpy(rng.integers(0, 2, 30))
    logits = torch.from_numpy(rng.normal(size=(30, 1))).float() + labels[:, None].float()
    copies = torch.arange(30).repeat_interleave(5)
    alone = classifier_intervals(logits, labels, None, bootstrap=400, seed=0)
    as_images = classifier_intervals(logits[copies], labels[copies], None, bootstrap=400, seed=0)
    as_patients = classifier_intervals(logits[copies], labels[copies], [str(int(i)) for i in copies], 400, 0)
    width = {name: r["auc_ci"][1] - r["auc_ci"][0] for name, r in
             (("alone", alone), ("images", as_images), ("patients", as_patients))}
    assert width["images"] < 0.6 * width["patients"]
    assert width["patients"] == pytest.approx(width["alone"], rel=0.25)
    assert as_patients["resampled"] == "patients" and alone["resampled"] == "images"
    low, high = alone["accuracy_ci"]
    assert low <= float(((logits[:, 0] > 0).long() == labels).float().mean()) <= high


def test_classifier_intervals_do_not_collapse_when_every_image_is_right():
    """40 of 40 right: the percentile bootstrap would say [1, 1]; Wilson's interval says how little 40 images prove."""
    from reid_batch.analysis.metrics import classifier_intervals, wilson_interval

    labels = torch.arange(40) % 4
    logits = torch.nn.functional.one_hot(labels, 4).float() * 5
    by_images = classifier_intervals(logits, labels, None, bootstrap=100)
    assert by_images["accuracy_ci"] == pytest.approx(list(wilson_interval(40, 40)))
    assert by_images["accuracy_ci"][0] < 0.95
    by_patients = classifier_intervals(logits, labels, [str(i // 4) for i in range(40)], bootstrap=100)
    assert by_patients["accuracy_ci"] == pytest.approx(list(wilson_interval(10, 10)))  # 10 patients, all right
