"""Probes on synthetic activations with a planted truth direction; transfers; anomaly detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from workflow_scripts import probes
from workflow_scripts.quirky_data import generate_quirky

# Small CCS runs keep the suite fast; the planted direction is found well within them.
FAST_CCS = {"n_restarts": 3, "n_epochs": 200}


def unit(rng, d):
    v = rng.standard_normal(d)
    return v / np.linalg.norm(v)


def planted(n=600, d=48, margin=2.0, seed=0):
    """Statement activations X, contrast pairs and labels with truth along one direction `u`.

    A high-variance nuisance direction carries no label information; it is shared by both sides of a
    pair (same statement), and each side has its own constant offset (the appended answer token).
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    u = unit(rng, d)
    nuisance = unit(rng, d)
    nuisance -= (nuisance @ u) * u
    nuisance /= np.linalg.norm(nuisance)
    context = rng.standard_normal((n, d)) + 3.0 * rng.standard_normal((n, 1)) * nuisance
    signal = margin * (2 * y - 1)[:, None] * u
    X = context + signal
    X_false = context - signal + 2.0 * unit(rng, d) + 0.3 * rng.standard_normal((n, d))
    X_true = context + signal - 1.0 * unit(rng, d) + 0.3 * rng.standard_normal((n, d))
    return X, probes.make_pairs(X_false, X_true), y, u


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.mark.parametrize("method", ["logreg", "diffmean", "lda", "ccs", "crc"])
def test_probe_recovers_planted_direction(data, method):
    X, pairs, y, _ = data
    inputs = pairs if method in probes.CONTRAST_METHODS else X
    options = FAST_CCS if method == "ccs" else {}
    probe = probes.fit_probe(method, inputs[:400], y[:400], seed=0, **options)
    assert roc_auc_score(y[400:], probe.score(inputs[400:])) > 0.95


def test_crc_direction_is_the_planted_one(data):
    _, pairs, y, u = data
    probe = probes.fit_crc(pairs, y)
    assert abs(probe.weight @ u) / np.linalg.norm(probe.weight) > 0.95


def test_random_probe_is_chance(data):
    X, _, y, _ = data
    aurocs = np.array([roc_auc_score(y, probes.fit_random(X, seed=s).score(X)) for s in range(20)])
    assert abs(aurocs.mean() - 0.5) < 0.1
    # A random direction still picks up a sliver of the planted one (about 1/sqrt(D) of it); on
    # average it stays far from the planted probes' AUROC > 0.95.
    assert np.abs(aurocs - 0.5).mean() < 0.2
    np.testing.assert_array_equal(probes.fit_random(X, seed=4).weight, probes.fit_random(X, seed=4).weight)


def test_logreg_minimises_the_reference_objective(data):
    """The reference's logistic regression: mean BCE + l2_penalty * |w|^2 on raw features, intercept
    unpenalised. At the returned probe the objective's gradient (computed here with torch) vanishes."""
    X, _, y, _ = data
    X = X * np.linspace(0.1, 10.0, X.shape[1])  # unequal feature scales: standardising would change the fit
    probe = probes.fit_logreg(X, y, l2_penalty=0.01)
    w = torch.as_tensor(probe.weight, dtype=torch.float64).requires_grad_()
    b = torch.tensor(probe.bias, dtype=torch.float64, requires_grad=True)
    logits = torch.as_tensor(X) @ w + b
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.as_tensor(y, dtype=torch.float64))
    (loss + 0.01 * w.square().sum()).backward()
    assert float(w.grad.abs().max()) < 1e-4 and abs(float(b.grad)) < 1e-4


@pytest.mark.parametrize("method", ["ccs", "crc"])
def test_contrast_probes_under_swapped_pair_order(data, method):
    """Swapping the two sides of every pair (training and scoring alike):
    without labels the fit is symmetric in the sides, so every score flips sign;
    with labels the sign is re-oriented to the labels, so every score is preserved.
    """
    _, pairs, y, _ = data
    swapped = pairs[:, ::-1]
    options = FAST_CCS if method == "ccs" else {}
    unlabelled = probes.fit_probe(method, pairs, None, seed=1, **options).score(pairs)
    unlabelled_swapped = probes.fit_probe(method, swapped, None, seed=1, **options).score(swapped)
    np.testing.assert_allclose(unlabelled_swapped, -unlabelled, rtol=1e-4, atol=1e-6)
    labelled = probes.fit_probe(method, pairs, y, seed=1, **options).score(pairs)
    labelled_swapped = probes.fit_probe(method, swapped, y, seed=1, **options).score(swapped)
    np.testing.assert_allclose(labelled_swapped, labelled, rtol=1e-4, atol=1e-6)
    assert roc_auc_score(y, labelled) > 0.95


def test_ccs_loss_is_symmetric_in_the_pair():
    rng = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 3, generator=rng), torch.randn(50, 3, generator=rng)
    assert torch.equal(probes.ccs_loss(a, b), probes.ccs_loss(b, a))
    assert probes.ccs_loss(a, b).shape == (3,)


def test_fit_probe_rejects_bad_inputs(data):
    X, pairs, y, _ = data
    with pytest.raises(ValueError, match="unknown probe method 'svm'"):
        probes.fit_probe("svm", X, y)
    with pytest.raises(ValueError, match="'lda' is supervised"):
        probes.fit_probe("lda", X)
    with pytest.raises(ValueError, match=r"\(N, 2, D\) contrast-pair array, got shape \(600, 48\)"):
        probes.fit_probe("crc", X, y)
    with pytest.raises(ValueError, match="got 10 labels for 600 examples"):
        probes.fit_probe("logreg", X, y[:10])
    with pytest.raises(ValueError, match="X has 5 features"):
        probes.fit_diffmean(X, y).score(X[:, :5])


# ----- AUROC ------------------------------------------------------------------------------------


def test_auroc_with_ci_matches_sklearn_and_a_plain_bootstrap():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(labels + rng.standard_normal(300), 1)  # rounding makes ties
    auroc, lo, hi = probes.auroc_with_ci(scores, labels, n_boot=1000, seed=0)
    assert auroc == pytest.approx(roc_auc_score(labels, scores))
    assert lo < auroc < hi
    plain = []
    for _ in range(1000):
        i = rng.integers(0, 300, 300)
        plain.append(roc_auc_score(labels[i], scores[i]))
    assert np.quantile(plain, 0.025) == pytest.approx(lo, abs=0.02)
    assert np.quantile(plain, 0.975) == pytest.approx(hi, abs=0.02)
    assert probes.auroc_with_ci(scores, labels, n_boot=200, seed=3) == probes.auroc_with_ci(
        scores, labels, n_boot=200, seed=3
    )


def test_auroc_with_ci_edge_cases():
    assert probes.auroc_with_ci([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], n_boot=200) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="needs both classes"):
        probes.auroc_with_ci([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="got 2 labels for 3 examples"):
        probes.auroc_with_ci([0.1, 0.2, 0.3], [0, 1])


# ----- transfers and anomaly detection ---------------------------------------------------------


def layered_activations(metadata, signals, d=12, margin=2.0, seed=0):
    """(N, L, D) statement activations and (N, L, 2, D) pairs; layer l encodes metadata[signals[l]]."""
    rng = np.random.default_rng(seed)
    n = len(metadata)
    statements = np.empty((n, len(signals), d))
    pairs = np.empty((n, len(signals), 2, d))
    for layer, column in enumerate(signals):
        direction = unit(rng, d)
        signal = margin * (2 * metadata[column].to_numpy() - 1)[:, None] * direction
        context = rng.standard_normal((n, d))
        statements[:, layer] = context + signal
        # Each appended answer moves the activation by its own large offset, as a token does.
        pairs[:, layer, 0] = context - signal + 5.0 * unit(rng, d) + 0.3 * rng.standard_normal((n, d))
        pairs[:, layer, 1] = context + signal + 5.0 * unit(rng, d) + 0.3 * rng.standard_normal((n, d))
    return statements, pairs


@pytest.fixture(scope="module")
def quirky_metadata():
    return generate_quirky("addition", n_problems=1000, seed=0)


def test_transfers_score_truth_on_the_right_rows(quirky_metadata):
    metadata = quirky_metadata
    # Layer 0 knows the truth in every context; layer 1 knows only what the character will say.
    statements, pairs = layered_activations(metadata, ["truth_label", "label"])
    result = probes.evaluate_transfers(metadata, statements, pairs, n_boot=100, probe_options={"ccs": FAST_CCS})
    assert len(result) == 2 * len(probes.METHODS) * len(probes.TRANSFERS)
    assert result[["layer", "method", "transfer"]].drop_duplicates().shape[0] == len(result)

    row = result.query("layer == 0 and method == 'logreg' and transfer == 'A_easy->B_hard'").iloc[0]
    count = metadata.groupby(["character", "difficulty_bucket", "split"]).size()
    assert row["n_train"] == count[("Alice", "easy", "train")]
    assert row["n_test"] == count[("Bob", "hard", "test")]
    assert row["auroc_lo"] <= row["auroc"] <= row["auroc_hi"]
    # A->A, A->B, B->A are scored, as the reference, only where Alice's and Bob's labels differ.
    same = result.query("layer == 0 and method == 'logreg'").set_index("transfer")["n_test"]
    disagree = metadata[(metadata.split == "test") & (metadata.claim_kind != "distractor")]
    assert same["A->A"] == (disagree.character == "Alice").sum() == same["B->A"]
    assert same["A->B"] == (disagree.character == "Bob").sum()

    # Probes learn (or, unsupervised, take their sign from) each context's own label by default, as the
    # reference: from Bob's contexts a truth-encoding layer is learned reversed, so B->A falls below
    # chance; everything else finds the truth.
    truth_layer = (
        result[(result["layer"] == 0) & (result["method"] != "random")].set_index(["method", "transfer"]).sort_index()
    )
    supervised_b_to_a = truth_layer.loc[(slice(None), "B->A"), "auroc"]
    assert (supervised_b_to_a < 0.05).all(), supervised_b_to_a
    rest = truth_layer.drop(index=supervised_b_to_a.index)["auroc"]
    assert (rest > 0.95).all(), rest[rest <= 0.95]
    # At the "what the character says" layer a probe trained on Alice tracks Bob's labels, which
    # disagree with the truth: scored against the truth it falls below chance on Bob, not on Alice.
    says_layer = result[(result["layer"] == 1) & (result["method"] == "logreg")].set_index("transfer")["auroc"]
    assert says_layer["A->A"] > 0.95
    assert says_layer["A->B"] < 0.4


def test_transfers_can_train_on_the_truth(quirky_metadata):
    # Trained on the truth in Bob's contexts too, a truth-encoding layer transfers from Bob to Alice.
    statements, _ = layered_activations(quirky_metadata, ["truth_label"])
    by_truth = probes.evaluate_transfers(
        quirky_metadata, statements.astype(np.float32), methods=["diffmean"], train_label_column="truth_label", n_boot=0
    ).set_index("transfer")["auroc"]
    assert by_truth["B->A"] > 0.95
    assert by_truth["A->B"] > 0.95


def test_transfers_reject_bad_requests(quirky_metadata):
    statements, pairs = layered_activations(quirky_metadata, ["truth_label"])
    with pytest.raises(ValueError, match="'ccs' reads contrast pairs"):
        probes.evaluate_transfers(quirky_metadata, statements, methods=["ccs"])
    with pytest.raises(ValueError, match="unknown transfer 'B->B'"):
        probes.evaluate_transfers(quirky_metadata, statements, methods=["diffmean"], transfers=["B->B"])
    with pytest.raises(ValueError, match=r"activations must be \(N=2000, L, D\)"):
        probes.evaluate_transfers(quirky_metadata, statements[:10], methods=["diffmean"])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['truth_label'\]"):
        probes.evaluate_transfers(quirky_metadata.drop(columns="truth_label"), statements, methods=["diffmean"])


def test_anomaly_detection_separates_planted_anomaly(quirky_metadata):
    # Early layers encode the truth, late layers what the character says: in Bob's contexts the
    # two disagree, which Alice-easy examples never show.
    quirky, _ = layered_activations(quirky_metadata, ["truth_label"] * 3 + ["label"] * 3)
    result = probes.anomaly_detection_auroc(quirky_metadata, quirky, methods=["logreg", "diffmean"], n_boot=200)
    assert set(result["method"]) == {"logreg", "diffmean"}
    # Only Bob's rows whose claim is the truth or Bob's answer (half of them) make the layers disagree;
    # distractors are false for both characters. Perfect detection of that half caps AUROC near 0.75.
    assert (result["auroc"] > 0.66).all(), result
    assert (result["n_normal"] > 20).all() and (result["n_anomalous"] > 20).all()

    # Control: every layer encodes the truth, Bob's contexts look like Alice's.
    plain, _ = layered_activations(quirky_metadata, ["truth_label"] * 6)
    control = probes.anomaly_detection_auroc(quirky_metadata, plain, methods=["logreg"], n_boot=200)
    assert 0.35 < control["auroc"].iloc[0] < 0.6, control


# ----- reference fidelity: random baseline, LDA, pair normalisation, layer choice ----------------


def test_random_baseline_orients_each_direction_by_its_training_auroc():
    """Against a loop over directions written here with sklearn: flip each direction whose AUROC on the
    training rows is below 0.5, then score the test rows."""
    rng = np.random.default_rng(1)
    X_train, X_test = rng.standard_normal((120, 6)), rng.standard_normal((80, 6))
    y_train, y_test = rng.integers(0, 2, 120), rng.integers(0, 2, 80)
    X_train[:, 0] += y_train  # a weak signal so orientation matters on test
    X_test[:, 0] += y_test
    got = probes.random_direction_aurocs(X_train, y_train, X_test, y_test, n_directions=50, seed=3)
    directions = np.random.default_rng(3).standard_normal((50, 6))
    expected = []
    for z in directions:
        sign = 1.0 if roc_auc_score(y_train, X_train @ z) >= 0.5 else -1.0
        expected.append(roc_auc_score(y_test, X_test @ (sign * z)))
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert np.mean(got) > 0.5  # oriented directions pick up the signal on average


def test_random_baseline_in_transfers_reports_mean_and_spread(quirky_metadata):
    statements, _ = layered_activations(quirky_metadata, ["truth_label"])
    result = probes.evaluate_transfers(
        quirky_metadata, statements, methods=["random"], transfers=["A->A"], n_random_directions=200, n_boot=0
    ).iloc[0]
    fit = probes._subset(quirky_metadata, ("Alice", None), "train")
    test = (
        probes._subset(quirky_metadata, ("Alice", None), "test")
        & (quirky_metadata.claim_kind != "distractor").to_numpy()
    )
    aurocs = probes.random_direction_aurocs(
        statements[fit, 0], quirky_metadata["label"][fit],
        statements[test, 0], quirky_metadata["truth_label"][test], 200, 0,
    )
    assert result["auroc"] == pytest.approx(aurocs.mean())
    assert (result["auroc_lo"], result["auroc_hi"]) == pytest.approx(tuple(np.quantile(aurocs, [0.025, 0.975])))
    assert result["interval"].startswith("random directions")
    # Oriented on training labels, random directions in a layer that encodes the truth beat chance.
    assert result["auroc"] > 0.55


def test_lda_is_the_pooled_covariance_pseudo_inverse_direction():
    """The reference's LDA: pinv(class-size-weighted unbiased covariances) @ mean difference, no
    shrinkage; with D close to N shrinkage would pull the direction towards the mean difference."""
    rng = np.random.default_rng(2)
    n, d = 60, 40
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + np.outer(y, rng.standard_normal(d))
    probe = probes.fit_lda(X, y)
    false, true = X[y == 0], X[y == 1]
    pooled = (len(false) * np.cov(false.T) + len(true) * np.cov(true.T)) / n
    # torch.linalg.pinv's default cutoff in float32, as the reference computes it: D * eps32 * largest.
    expected = np.linalg.pinv(pooled, rcond=d * np.finfo(np.float32).eps) @ (true.mean(axis=0) - false.mean(axis=0))
    np.testing.assert_allclose(probe.weight, expected, rtol=1e-6, atol=1e-8)


def test_pair_normalisation_is_leace_erasing_the_appended_answer(data):
    """The contrast probes' normalisation equals concept-erasure's LEACE eraser fitted on both sides of
    the pairs with the side as the concept, applied to each side (the reference's norm="leace")."""
    from concept_erasure import LeaceEraser

    _, pairs, _, _ = data
    n, _, d = pairs.shape
    flat = torch.as_tensor(pairs.reshape(2 * n, d))
    eraser = LeaceEraser.fit(flat, torch.as_tensor(np.tile([0.0, 1.0], n)[:, None]))
    erased = eraser(flat).numpy().reshape(n, 2, d)
    matrix, offset = probes._side_eraser(pairs)
    np.testing.assert_allclose(pairs.reshape(2 * n, d) @ matrix + offset, erased.reshape(2 * n, d), atol=1e-8)
    np.testing.assert_allclose((pairs[:, 1] - pairs[:, 0]) @ matrix, erased[:, 1] - erased[:, 0], atol=1e-8)
    # After erasure no linear direction separates the two sides on average.
    np.testing.assert_allclose(erased[:, 1].mean(axis=0), erased[:, 0].mean(axis=0), atol=1e-8)


def test_ccs_reaches_a_stationary_point_of_the_penalised_loss(data):
    """L-BFGS runs to convergence, unlike a fixed number of Adam steps: the gradient of the reference's
    penalised CCS objective at the kept restart is ~0 (checked on the LEACE-normalised inputs)."""
    _, pairs, y, _ = data
    probe = probes.fit_ccs(pairs[:300], None, seed=0, n_restarts=2, n_epochs=1000)
    matrix, offset = probes._side_eraser(pairs[:300])
    # Recover the raw weight w (probe.weight = M @ w) in the erased space: least squares on M.
    weight = np.linalg.lstsq(matrix, probe.weight, rcond=None)[0]
    x_false = torch.as_tensor(pairs[:300, 0] @ matrix + offset, dtype=torch.float64)
    x_true = torch.as_tensor(pairs[:300, 1] @ matrix + offset, dtype=torch.float64)
    w = torch.as_tensor(weight, dtype=torch.float64).requires_grad_()
    # The bias is not returned; minimise over it alone (1-D), then check the gradient in w.
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([b], line_search_fn="strong_wolfe", max_iter=200)

    def objective():
        p_false, p_true = torch.sigmoid(x_false @ w + b), torch.sigmoid(x_true @ w + b)
        loss = ((p_true + p_false - 1) ** 2).mean() + (torch.minimum(p_true, p_false) ** 2).mean()
        return loss + 0.01 * (w.square().sum() + b.square().sum()) / 2

    def closure():
        optimizer.zero_grad()
        value = objective()
        value.backward()
        return value

    optimizer.step(closure)
    w.grad = None
    objective().backward()
    at_fit = float(w.grad.norm())
    # w is recovered only up to the direction LEACE erases, and L-BFGS ran in float32: a small residual.
    with torch.no_grad():
        w.mul_(0.5)
    w.grad = None
    objective().backward()
    assert at_fit < 0.01 and at_fit < 0.1 * float(w.grad.norm()), (at_fit, float(w.grad.norm()))


def test_layer_is_chosen_on_the_selection_split_not_on_test(quirky_metadata):
    """Layer 0 encodes the truth weakly on every row; layer 1 strongly on train and test rows but not on
    validation rows. Chosen on validation, the reported layer is 0; the test AUROC would pick 1."""
    metadata = quirky_metadata
    rng = np.random.default_rng(5)
    n, d = len(metadata), 8
    truth = 2 * metadata["truth_label"].to_numpy() - 1
    weak = rng.standard_normal((n, d))
    weak[:, 0] += 0.8 * truth
    strong = rng.standard_normal((n, d))
    not_validation = (metadata["split"] != "validation").to_numpy()
    strong[not_validation, 1] += 3.0 * truth[not_validation]
    statements = np.stack([weak, strong], axis=1)
    for rule in ("best", "earliest_informative"):
        result = probes.evaluate_transfers(
            metadata, statements, methods=["diffmean"], transfers=["A->A"], n_boot=0, layer_selection=rule
        )
        chosen = result[result["selected"]]
        assert chosen["layer"].tolist() == [0], rule
        assert result.set_index("layer").loc[1, "auroc"] > result.set_index("layer").loc[0, "auroc"]


@pytest.mark.parametrize(
    ("aurocs", "rule", "expected"),
    [
        ([0.6, 0.9, 0.95, 0.8], "best", 2),
        ([0.6, 0.93, 0.95, 0.8], "earliest_informative", 1),  # 0.43 >= 0.95 * 0.45
        ([0.6, 0.92, 0.95, 0.8], "earliest_informative", 2),  # 0.42 < 0.4275
        ([0.4, 0.5, 0.45], "earliest_informative", 1),  # nothing above chance: the middle layer
    ],
)
def test_select_layer_rules(aurocs, rule, expected):
    assert probes.select_layer(aurocs, rule) == expected


def test_anomaly_gaussian_uses_the_empirical_covariance_by_default():
    rng = np.random.default_rng(4)
    reference = rng.standard_normal((200, 5)) @ rng.standard_normal((5, 5))
    x = rng.standard_normal((30, 5))
    centred = x - reference.mean(axis=0)
    inverse = np.linalg.inv(np.cov(reference.T))
    expected = np.array([row @ inverse @ row for row in centred])
    np.testing.assert_allclose(probes._mahalanobis(reference, x, "empirical"), expected, rtol=1e-8)
    assert not np.allclose(
        probes._mahalanobis(reference[:20], x, "ledoit_wolf"), probes._mahalanobis(reference[:20], x, "empirical")
    )
