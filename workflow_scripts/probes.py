"""Truth probes on activations, their transfers, and anomaly detection (Mallen et al., section 3).

Inputs. A "statement" activation is the last-token activation of the prompt
"{a} + {b} = {c}. {character}:", an (N, D) array. CCS and CRC instead read contrast pairs: the same
prompt with " False" and with " True" appended, last-token activation of each, stacked as an
(N, 2, D) array indexed by answer (pairs[:, 0] = " False", pairs[:, 1] = " True"; `make_pairs`
builds it), matching ANSWERS in quirky_data. All other probes read statement activations.

Every probe is linear and exposes `score(X) -> (N,)`, higher = "true". As in Mallen et al.'s reference
code (elk-generalization):
  logreg      logistic regression, mean BCE + 0.001 |w|^2 on the raw features; score = its log-odds.
  diffmean    w = mean(true) - mean(false), threshold at the midpoint of the two means.
  lda         w = pinv(S_w) (mean(true) - mean(false)), S_w the within-class covariance pooled by
              class size, no shrinkage, torch's float32 pinv cutoff (the reference's LdaReporter.fit).
  ccs         Burns et al. contrast-consistent search on LEACE-normalised pairs (the concept "which
              answer was appended" erased, `concept-erasure`), L-BFGS with L2 penalty from several
              restarts, the lowest loss kept; score = (logit(" True") - logit(" False")).
  crc         contrastive representation clustering: top principal component of the LEACE-normalised
              pair differences; score = projection of the pair difference on it.
  random      random directions, each oriented by its training AUROC (the reference's baseline);
              evaluate_transfers reports the mean over many and their 2.5-97.5% spread.
CCS and CRC are unsupervised; labels, when given, only pick the sign by Platt scaling (a scale and bias
fitted by L-BFGS to the labels, the sign of the scale kept), as the reference's resolve_sign.

Transfers fit on the fit split of a source subset and test on the test split of a target subset; the
metric is always AUROC against `truth_label`, whatever the probe was fitted to. The reported layer of
each (method, transfer) is chosen on another split of the source subset (see evaluate_transfers), never
on the rows its AUROC is reported on unless the settings ask for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from concept_erasure import LeaceFitter
from scipy.stats import rankdata
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from workflow_scripts.quirky_data import CHARACTERS, DIFFICULTY_BUCKETS

ALICE, BOB = CHARACTERS
EASY, HARD = DIFFICULTY_BUCKETS[0], DIFFICULTY_BUCKETS[-1]

# name -> (source subset, target subset); a subset is (character or None for both, bucket or None).
TRANSFERS = {
    "A_easy->B_hard": ((ALICE, EASY), (BOB, HARD)),
    "A->A": ((ALICE, None), (ALICE, None)),
    "A->B": ((ALICE, None), (BOB, None)),
    "B->A": ((BOB, None), (ALICE, None)),
    "all->B_hard": ((None, None), (BOB, HARD)),
}


# ----- probes ----------------------------------------------------------------------------------


@dataclass
class LinearProbe:
    """score(X) = X @ weight + bias on statement activations (N, D)."""

    method: str
    weight: np.ndarray
    bias: float
    input_kind = "statement"

    def score(self, X) -> np.ndarray:
        X = _as_matrix(X, "X")
        if X.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"X has {X.shape[1]} features, the {self.method} probe was fitted on {self.weight.shape[0]}"
            )
        return X @ self.weight + self.bias


@dataclass
class ContrastProbe:
    """score(pairs) = (x_true - x_false) @ weight on (N, 2, D) pairs.

    The weight already contains the pair normalisation: LEACE's eraser is affine, so its offset cancels
    in the difference of the two sides and only its linear part is folded into the weight.
    """

    method: str
    weight: np.ndarray
    input_kind = "contrast_pair"

    def score(self, pairs) -> np.ndarray:
        pairs = _as_pairs(pairs, "pairs")
        if pairs.shape[2] != self.weight.shape[0]:
            raise ValueError(
                f"pairs have {pairs.shape[2]} features, the {self.method} probe was fitted on {self.weight.shape[0]}"
            )
        return (pairs[:, 1] - pairs[:, 0]) @ self.weight


def make_pairs(X_false, X_true) -> np.ndarray:
    """Stack the " False"- and " True"-appended activations into the (N, 2, D) contrast-pair array."""
    X_false, X_true = _as_matrix(X_false, "X_false"), _as_matrix(X_true, "X_true")
    if X_false.shape != X_true.shape:
        raise ValueError(f"X_false {X_false.shape} and X_true {X_true.shape} differ in shape")
    return np.stack([X_false, X_true], axis=1)


def fit_logreg(X, y, l2_penalty: float = 0.001, max_iter: int = 10_000) -> LinearProbe:
    """As the reference (its LogisticRegression classifier): minimise mean BCE + l2_penalty * |w|^2 on the
    raw features, intercept unpenalised. That is sklearn's objective with C = 1 / (2 N l2_penalty)."""
    X, y = _as_matrix(X, "X"), _as_labels(y, len(X))
    model = LogisticRegression(C=1.0 / (2 * len(X) * l2_penalty), max_iter=max_iter).fit(X, y)
    return LinearProbe("logreg", model.coef_[0].astype(float), float(model.intercept_[0]))


def fit_diffmean(X, y) -> LinearProbe:
    X, y = _as_matrix(X, "X"), _as_labels(y, len(X))
    mean_true, mean_false = X[y == 1].mean(axis=0), X[y == 0].mean(axis=0)
    weight = mean_true - mean_false
    return LinearProbe("diffmean", weight, float(-weight @ (mean_true + mean_false) / 2))


def fit_lda(X, y) -> LinearProbe:
    """As the reference: w = pinv(S_w) @ (mean(true) - mean(false)), S_w = class-size-weighted average of
    the two classes' (unbiased) covariances. pinv (with the reference's cutoff), not shrinkage, handles D
    close to or above N."""
    X, y = _as_matrix(X, "X"), _as_labels(y, len(X))
    false, true = X[y == 0], X[y == 1]
    if min(len(false), len(true)) < 2:
        raise ValueError(f"lda needs at least 2 rows of each class, got {len(false)} false and {len(true)} true")
    mean_false, mean_true = false.mean(axis=0), true.mean(axis=0)
    within = (len(false) * np.cov(false, rowvar=False) + len(true) * np.cov(true, rowvar=False)) / len(X)
    # The reference runs torch.linalg.pinv in float32, whose default cutoff drops singular values below
    # D * eps(float32) times the largest: the same cutoff here (in float64), as it acts as regularisation.
    cutoff = within.shape[0] * np.finfo(np.float32).eps
    weight = np.linalg.pinv(np.atleast_2d(within), rcond=cutoff, hermitian=True) @ (mean_true - mean_false)
    return LinearProbe("lda", weight, float(-weight @ (mean_true + mean_false) / 2))


def fit_random(X, y=None, seed: int = 0) -> LinearProbe:
    """One random unit direction through the training mean, oriented by its training AUROC when labels
    are given (the single-probe form; evaluate_transfers reports many, see random_direction_aurocs)."""
    X = _as_matrix(X, "X")
    weight = np.random.default_rng(seed).standard_normal(X.shape[1])
    weight /= np.linalg.norm(weight)
    if y is not None:
        y = _as_labels(y, len(X))
        _require_both_classes(y, "labels for orienting the random probe")
        weight *= 1.0 if roc_auc_score(y, X @ weight) >= 0.5 else -1.0
    return LinearProbe("random", weight, float(-X.mean(axis=0) @ weight))


def column_aurocs(labels, scores) -> np.ndarray:
    """AUROC of every column of scores (N, K) against 0/1 labels (N,), ties counting one half (the
    Mann-Whitney statistic from average ranks)."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes; got {n_pos} positive and {n_neg} negative rows")
    ranks = rankdata(np.asarray(scores, dtype=float), axis=0)
    return (ranks[labels].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def random_direction_aurocs(X_train, y_train, X_test, y_test, n_directions: int = 1000, seed: int = 0) -> np.ndarray:
    """Test AUROCs of n_directions Gaussian random directions, each flipped so that its AUROC on the
    training rows is >= 0.5 (the reference's random baseline). Returns an (n_directions,) array."""
    directions = oriented_random_directions(X_train, y_train, n_directions, seed)
    X_test = _as_matrix(X_test, "X_test")
    return column_aurocs(_as_labels(y_test, len(X_test)), X_test @ directions.T)


def oriented_random_directions(X_train, y_train, n_directions: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_directions, D) seeded Gaussian directions, each flipped so that its training AUROC is >= 0.5."""
    X_train = _as_matrix(X_train, "X_train")
    y_train = _as_labels(y_train, len(X_train))
    directions = np.random.default_rng(seed).standard_normal((n_directions, X_train.shape[1]))
    signs = np.where(column_aurocs(y_train, X_train @ directions.T) >= 0.5, 1.0, -1.0)
    return directions * signs[:, None]


def _side_eraser(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The LEACE eraser that removes "which answer was appended" from both sides of the pairs (fitted
    on the pairs themselves, as the reference), as its linear part M (D, D) and offset c (D,):
    erased(x) = x @ M + c, so erased(x_true) - erased(x_false) = (x_true - x_false) @ M."""
    n, _, d = pairs.shape
    flat = torch.as_tensor(pairs.reshape(2 * n, d), dtype=torch.float64)
    side = torch.as_tensor(np.tile([0.0, 1.0], n)[:, None], dtype=torch.float64)
    eraser = LeaceFitter.fit(flat, side).eraser
    basis = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)])
    erased = eraser(basis).numpy()
    return erased[1:] - erased[0], erased[0]


def _platt_sign(raw_false: np.ndarray, raw_true: np.ndarray, y) -> float:
    """+1 or -1: the sign of the Platt scale a * raw + b fitted by L-BFGS so that each side's logit
    predicts whether that side is the right answer (the reference's resolve_sign)."""
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    raw = torch.as_tensor(np.stack([raw_false, raw_true], axis=1), dtype=torch.float64)
    raw = raw / (raw.std() + 1e-12)  # the scale's sign is all that is kept; this only helps L-BFGS
    target = torch.stack([1.0 - y, y], dim=1)
    scale, bias = (
        torch.ones(1, dtype=torch.float64, requires_grad=True), torch.zeros(1, dtype=torch.float64, requires_grad=True)
    )
    optimizer = torch.optim.LBFGS([scale, bias], line_search_fn="strong_wolfe", max_iter=100)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(raw * scale + bias, target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return 1.0 if float(scale.detach()) >= 0 else -1.0


def _orient_pairs(probe: ContrastProbe, pairs: np.ndarray, y) -> ContrastProbe:
    """Flip an unsupervised probe by the Platt sign of its per-side outputs (only when labels are given)."""
    if y is None:
        return probe
    y = _as_labels(y, len(pairs))
    _require_both_classes(y, f"labels for orienting the {probe.method} probe")
    probe.weight = probe.weight * _platt_sign(pairs[:, 0] @ probe.weight, pairs[:, 1] @ probe.weight, y)
    return probe


def fit_crc(pairs, y=None) -> ContrastProbe:
    """Top principal component of the centred, LEACE-normalised pair differences.

    Without labels the sign is fixed by making the component's largest-magnitude entry positive;
    the axis is the same for swapped pairs, so swapping the pair order negates every score.
    """
    pairs = _as_pairs(pairs, "pairs")
    erase, _ = _side_eraser(pairs)
    diffs = (pairs[:, 1] - pairs[:, 0]) @ erase
    _, _, vt = np.linalg.svd(diffs - diffs.mean(axis=0), full_matrices=False)
    component = vt[0] * np.sign(vt[0][np.argmax(np.abs(vt[0]))])
    return _orient_pairs(ContrastProbe("crc", erase @ component), pairs, y)


def ccs_loss(logits_false: torch.Tensor, logits_true: torch.Tensor) -> torch.Tensor:
    """Burns et al.: consistency (p+ = 1 - p-) plus confidence (not both near 0.5), each a mean.

    Symmetric in its two arguments, so the loss does not depend on which side of the pair is which.
    Logits are (N,) or (N, R) for R restarts; the loss is averaged over N, one value per restart.
    """
    p_false, p_true = torch.sigmoid(logits_false), torch.sigmoid(logits_true)
    consistency = (p_true + p_false - 1.0) ** 2
    confidence = torch.minimum(p_true, p_false) ** 2
    return (consistency + confidence).mean(dim=0)


def fit_ccs(
    pairs,
    y=None,
    seed: int = 0,
    n_restarts: int = 10,
    n_epochs: int = 1000,
    weight_decay: float = 0.01,
    torch_threads: int | None = 1,
) -> ContrastProbe:
    """Contrast-consistent search as the reference (CcsConfig of its transfer script): LEACE
    normalisation, a linear logit with bias from PyTorch's default initialisation, L-BFGS (strong Wolfe
    line search, n_epochs iterations at most) on the CCS loss plus weight_decay * |params|^2 / 2,
    n_restarts seeded restarts, the lowest unpenalised loss kept; sign by Platt scaling when y is given.

    torch_threads: torch's thread count while training (restored afterwards); one thread is fastest
    for these small matrices, where thread hand-offs cost more than the arithmetic.
    """
    pairs = _as_pairs(pairs, "pairs")
    erase, offset = _side_eraser(pairs)
    # Trained on the erased activations themselves (offset included: the bias is penalised, so where the
    # data sits matters); scored on the difference of the two sides, where the offset cancels.
    x_false = torch.as_tensor(pairs[:, 0] @ erase + offset, dtype=torch.float32)
    x_true = torch.as_tensor(pairs[:, 1] @ erase + offset, dtype=torch.float32)
    n_features = pairs.shape[2]
    generator = torch.Generator().manual_seed(seed)
    eps = torch.finfo(torch.float32).eps
    bound = 1.0 / np.sqrt(n_features)  # nn.Linear's default: uniform in +-1/sqrt(fan_in)

    previous_threads = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    best_loss, best_weight = float("inf"), None
    try:
        for _ in range(n_restarts):
            weight = ((torch.rand(n_features, generator=generator) * 2 - 1) * bound).requires_grad_()
            bias = ((torch.rand(1, generator=generator) * 2 - 1) * bound).requires_grad_()
            optimizer = torch.optim.LBFGS(
                [weight, bias], line_search_fn="strong_wolfe", max_iter=n_epochs,
                tolerance_change=eps, tolerance_grad=eps,
            )
            loss = torch.tensor(float("inf"))

            def closure():
                nonlocal loss
                optimizer.zero_grad()
                loss = ccs_loss(x_false @ weight + bias, x_true @ weight + bias)
                penalised = loss + weight_decay * (weight.square().sum() + bias.square().sum()) / 2
                penalised.backward()
                return penalised

            optimizer.step(closure)
            if float(loss.detach()) < best_loss:
                best_loss, best_weight = float(loss.detach()), weight.detach().numpy().astype(float)
    finally:
        torch.set_num_threads(previous_threads)
    if best_weight is None or not np.isfinite(best_loss):
        raise RuntimeError(f"CCS: no restart reached a finite loss ({n_restarts} restarts)")
    return _orient_pairs(ContrastProbe("ccs", erase @ best_weight), pairs, y)


@dataclass(frozen=True)
class ProbeMethod:
    fit: Callable  # fit(X, y, **options) -> probe; with seed= when `seeded`
    reads: str  # "statements" (N, D) or "pairs" (N, 2, D): each statement with " False" and " True"
    supervised: bool  # fitted on the labels; the others use them for the sign only (they may be None)
    seeded: bool


# A new probe is one fit function and one line here.
PROBES = {
    "logreg": ProbeMethod(fit_logreg, reads="statements", supervised=True, seeded=False),
    "diffmean": ProbeMethod(fit_diffmean, reads="statements", supervised=True, seeded=False),
    "lda": ProbeMethod(fit_lda, reads="statements", supervised=True, seeded=False),
    "ccs": ProbeMethod(fit_ccs, reads="pairs", supervised=False, seeded=True),
    "crc": ProbeMethod(fit_crc, reads="pairs", supervised=False, seeded=False),
    "random": ProbeMethod(fit_random, reads="statements", supervised=False, seeded=True),
}
METHODS = tuple(PROBES)
STATEMENT_METHODS = tuple(name for name, probe in PROBES.items() if probe.reads == "statements")
CONTRAST_METHODS = tuple(name for name, probe in PROBES.items() if probe.reads == "pairs")


def fit_probe(method: str, X, y=None, seed: int = 0, **options) -> LinearProbe | ContrastProbe:
    """Fit `method` (a name in PROBES) on X: (N, D) statements, or (N, 2, D) pairs for the methods
    that read pairs. y is required by the supervised methods; the others take their sign from it."""
    if method not in PROBES:
        raise ValueError(f"unknown probe method {method!r}; allowed: {', '.join(METHODS)}")
    probe = PROBES[method]
    if probe.supervised and y is None:
        raise ValueError(f"probe method {method!r} is supervised: pass labels y")
    return probe.fit(X, y, seed=seed, **options) if probe.seeded else probe.fit(X, y, **options)


# ----- metrics ---------------------------------------------------------------------------------


def auroc_with_ci(
    scores, labels, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """AUROC and its percentile-bootstrap (1 - alpha) interval, resampling examples with replacement.

    Resamples that lose one class are dropped. Ties count one half, as in roc_auc_score.
    alpha: 0.05 gives the 95% interval. n_boot <= 0 skips the bootstrap (lo and hi are NaN).
    """
    scores = np.asarray(scores, dtype=float).ravel()
    labels = _as_labels(labels, len(scores))
    if len(np.unique(labels)) < 2:
        raise ValueError(f"AUROC needs both classes; labels are all {labels[0] if len(labels) else 'missing'}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    auroc = float(roc_auc_score(labels, scores))
    if n_boot <= 0:
        return auroc, float("nan"), float("nan")

    # Sort once; a positive beats every negative in a lower tie group and half of those in its own.
    order = np.argsort(scores, kind="stable")
    sorted_scores, is_positive = scores[order], labels[order].astype(float)
    group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    n = len(scores)
    rng = np.random.default_rng(seed)
    boots = []
    for start in range(0, n_boot, 256):  # chunks bound the (chunk, N) count matrix
        size = min(256, n_boot - start)
        draws = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
        counts = np.bincount(draws.ravel(), minlength=size * n).reshape(size, n)[:, order]
        pos = np.add.reduceat(counts * is_positive, group_starts, axis=1)
        neg = np.add.reduceat(counts * (1.0 - is_positive), group_starts, axis=1)
        neg_below = np.cumsum(neg, axis=1) - neg
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        valid = (n_pos > 0) & (n_neg > 0)  # resamples that lost a class are dropped
        wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
        boots.append(wins[valid] / (n_pos[valid] * n_neg[valid]))
    boots = np.concatenate(boots)
    if len(boots) == 0:  # only possible with a handful of examples
        return auroc, float("nan"), float("nan")
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return auroc, float(lo), float(hi)


# ----- transfers and anomaly detection ---------------------------------------------------------


LAYER_SELECTIONS = ("earliest_informative", "best")
# Transfers that the reference scores only on rows where Alice's and Bob's labels differ (its
# filter_by="disagree"): on a distractor both characters say False, so those rows cannot tell a probe
# of the truth from a probe of what the context's character says.
DISAGREEMENT_TRANSFERS = ("A->A", "A->B", "B->A")


def evaluate_transfers(
    metadata: pd.DataFrame,
    activations,
    contrast_activations=None,
    methods=None,
    transfers=None,
    train_label_column: str = "label",
    n_boot: int = 1000,
    seed: int = 0,
    probe_options: dict[str, dict] | None = None,
    fit_split: str = "train",
    selection_split: str = "validation",
    layer_selection: str = "earliest_informative",
    informative_fraction: float = 0.95,
    n_random_directions: int = 1000,
) -> pd.DataFrame:
    """AUROC against the truth for every layer x probe method x transfer, and the layer reported for each.

    metadata: one row per example with columns character, difficulty_bucket, split, truth_label and
        `train_label_column`, aligned with the activations' first axis.
    activations: (N, L, D) last-token statement activations per layer.
    contrast_activations: (N, L, 2, D) contrast pairs (index 0 = " False", 1 = " True"), needed for
        ccs and crc only.
    methods: subset of METHODS; default every method the given arrays allow.
    transfers: subset of TRANSFERS' names; default all.
    train_label_column: what the probes learn. "label" (default, as the reference) is each context's own
        label (Bob's labels in Bob's contexts); "truth_label" the truth everywhere. Alice's labels are the
        truth, so the choice matters only for sources with Bob. As the reference, the unsupervised methods
        (ccs, crc) and the random baseline take their sign from the truth on a source that mixes both
        characters.
    probe_options: per-method keyword arguments for the fit functions, e.g. {"ccs": {"n_epochs": 200}}.
    fit_split / selection_split: the probes are fitted on the source's `fit_split` rows; each layer's
        selection AUROC is measured on the source's `selection_split` rows against the labels the probe
        learned (the reference picks its layer on the source distribution, against source labels).
    layer_selection: "earliest_informative" (the reference: the first layer whose selection AUROC - 0.5
        reaches informative_fraction of the best layer's) or "best" (the highest selection AUROC).
    n_random_directions: directions in the random baseline; its auroc is their mean test AUROC and
        auroc_lo / auroc_hi their 2.5% and 97.5% quantiles (spread over directions, not a bootstrap).

    Each probe is fitted once per (layer, method, source subset) and scored on the target's test-split
    rows; for DISAGREEMENT_TRANSFERS only on those whose claim is the truth or Bob's answer. Returns
    one row per (layer, method, transfer) with n_train, n_test, auroc, auroc_lo, auroc_hi
    (for every method but random a percentile-bootstrap 95% interval), interval, selection_auroc and
    selected (True on the one reported layer of each method and transfer).
    """
    activations, contrast_activations = _check_activations(metadata, activations, contrast_activations)
    methods = _check_methods(methods, contrast_activations is not None)
    options = _check_probe_options(probe_options)
    transfers = list(TRANSFERS) if transfers is None else list(transfers)
    for name in transfers:
        if name not in TRANSFERS:
            raise ValueError(f"unknown transfer {name!r}; allowed: {', '.join(TRANSFERS)}")
    if layer_selection not in LAYER_SELECTIONS:
        raise ValueError(f"layer_selection={layer_selection!r}; allowed: {', '.join(LAYER_SELECTIONS)}")
    _check_metadata(
        metadata, train_label_column, ("claim_kind",) if set(transfers) & set(DISAGREEMENT_TRANSFERS) else ()
    )
    own_labels = metadata[train_label_column].to_numpy().astype(int)
    truth = metadata["truth_label"].to_numpy().astype(int)

    def labels_for(method: str, source) -> np.ndarray:
        mixed = source[0] is None
        return truth if mixed and not PROBES[method].supervised else own_labels

    rows = []
    for layer in range(activations.shape[1]):
        for method in methods:
            inputs = contrast_activations[:, layer] if method in CONTRAST_METHODS else activations[:, layer]
            fitted: dict[tuple, LinearProbe | ContrastProbe] = {}
            for name in transfers:
                source, target = TRANSFERS[name]
                labels = labels_for(method, source)
                fit_rows = _subset(metadata, source, fit_split)
                select_rows = _subset(metadata, source, selection_split)
                test = _subset(metadata, target, "test")
                if name in DISAGREEMENT_TRANSFERS:
                    test = test & (metadata["claim_kind"] != "distractor").to_numpy()
                _require_both_classes(labels[fit_rows], f"{name}: {fit_split} rows of source {source}")
                _require_both_classes(labels[select_rows], f"{name}: {selection_split} rows of source {source}")
                _require_both_classes(truth[test], f"{name}: test rows of target {target}")
                if method == "random":
                    # One draw of directions, oriented on the fit rows, scored on both sets.
                    directions = oriented_random_directions(
                        inputs[fit_rows], labels[fit_rows], n_random_directions, seed
                    )
                    select_aurocs = column_aurocs(labels[select_rows], inputs[select_rows] @ directions.T)
                    test_aurocs = column_aurocs(truth[test], inputs[test] @ directions.T)
                    auroc, (lo, hi) = float(test_aurocs.mean()), np.quantile(test_aurocs, [0.025, 0.975])
                    selection, interval = float(select_aurocs.mean()), "random directions 2.5-97.5%"
                else:
                    if source not in fitted:
                        fitted[source] = fit_probe(
                            method, inputs[fit_rows], labels[fit_rows], seed=seed, **options.get(method, {})
                        )
                    selection = float(roc_auc_score(labels[select_rows], fitted[source].score(inputs[select_rows])))
                    auroc, lo, hi = auroc_with_ci(
                        fitted[source].score(inputs[test]), truth[test], n_boot=n_boot, seed=seed
                    )
                    interval = "bootstrap 95%"
                rows.append(
                    {"layer": layer, "method": method, "transfer": name, "n_train": int(fit_rows.sum()),
                     "n_test": int(test.sum()), "auroc": auroc, "auroc_lo": float(lo), "auroc_hi": float(hi),
                     "interval": interval, "selection_auroc": selection}
                )  # fmt: skip
    table = pd.DataFrame(rows)
    table["selected"] = False
    for _, group in table.groupby(["method", "transfer"]):
        chosen = select_layer(group["selection_auroc"].to_numpy(), layer_selection, informative_fraction)
        table.loc[group.index[chosen], "selected"] = True
    return table


def select_layer(selection_aurocs, rule: str = "earliest_informative", informative_fraction: float = 0.95) -> int:
    """Position of the reported layer among per-layer selection AUROCs. "best": the highest;
    "earliest_informative" (Mallen et al.): the first whose AUROC - 0.5 reaches informative_fraction of
    the highest AUROC - 0.5, or the middle layer when no layer is above chance."""
    aurocs = np.asarray(selection_aurocs, dtype=float)
    if rule == "best":
        return int(np.argmax(aurocs))
    if rule != "earliest_informative":
        raise ValueError(f"layer_selection={rule!r}; allowed: {', '.join(LAYER_SELECTIONS)}")
    top = aurocs.max()
    if top <= 0.5:
        return len(aurocs) // 2
    return int(np.flatnonzero(aurocs - 0.5 >= informative_fraction * (top - 0.5))[0])


def anomaly_detection_auroc(
    metadata: pd.DataFrame,
    activations,
    contrast_activations=None,
    methods=("logreg",),
    train_label_column: str = "truth_label",
    probe_split: str = "train",
    gaussian_split: str = "validation",
    test_split: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
    probe_options: dict[str, dict] | None = None,
    covariance: str = "empirical",
) -> pd.DataFrame:
    """Detect Bob's contexts from how the per-layer probe outputs hang together.

    For each method: fit one probe per layer on Alice-easy rows of `probe_split`; the per-layer scores
    of an example are its feature vector; fit a Gaussian on Alice-easy rows of `gaussian_split` (a split
    other than the probes', as in-sample scores are over-confident and would make the Gaussian too
    narrow; the reference fits probes on validation and the Gaussian on Alice-easy test rows); score
    `test_split` rows by Mahalanobis distance, Alice-hard as normal (0) and Bob-hard as anomalous (1).
    covariance: "empirical" (the reference's; a pseudo-inverse where it is singular) or "ledoit_wolf"
    (shrinkage, steadier when neighbouring layers' scores are nearly collinear and rows are few).
    probe_options: as in evaluate_transfers. Returns one row per method with auroc, auroc_lo, auroc_hi
    and the row counts.
    """
    if covariance not in ANOMALY_COVARIANCES:
        raise ValueError(f"covariance={covariance!r}; allowed: {', '.join(ANOMALY_COVARIANCES)}")
    activations, contrast_activations = _check_activations(metadata, activations, contrast_activations)
    methods = _check_methods(methods, contrast_activations is not None)
    options = _check_probe_options(probe_options)
    _check_metadata(metadata, train_label_column)
    train_labels = metadata[train_label_column].to_numpy().astype(int)
    probe_rows = _subset(metadata, (ALICE, EASY), probe_split)
    gaussian_rows = _subset(metadata, (ALICE, EASY), gaussian_split)
    normal = _subset(metadata, (ALICE, HARD), test_split)
    anomalous = _subset(metadata, (BOB, HARD), test_split)
    _require_both_classes(train_labels[probe_rows], f"Alice-easy rows of split {probe_split!r}")
    n_layers = activations.shape[1]
    if gaussian_rows.sum() < 2:
        raise ValueError(
            f"gaussian_split={gaussian_split!r} has {gaussian_rows.sum()} Alice-easy rows; need at least 2"
        )
    if not normal.any() or not anomalous.any():
        raise ValueError(
            f"test_split={test_split!r} has {normal.sum()} Alice-hard and {anomalous.sum()} Bob-hard rows; need both"
        )

    rows = []
    for method in methods:
        features = np.empty((len(metadata), n_layers))
        for layer in range(n_layers):
            inputs = contrast_activations[:, layer] if method in CONTRAST_METHODS else activations[:, layer]
            probe = fit_probe(
                method, inputs[probe_rows], train_labels[probe_rows], seed=seed, **options.get(method, {})
            )
            features[:, layer] = probe.score(inputs)
        test = normal | anomalous
        distance = _mahalanobis(features[gaussian_rows], features[test], covariance)
        auroc, lo, hi = auroc_with_ci(distance, anomalous[test].astype(int), n_boot=n_boot, seed=seed)
        rows.append(
            {"method": method, "n_gaussian": int(gaussian_rows.sum()), "n_normal": int(normal.sum()),
             "n_anomalous": int(anomalous.sum()), "auroc": auroc, "auroc_lo": lo, "auroc_hi": hi}
        )  # fmt: skip
    return pd.DataFrame(rows)


ANOMALY_COVARIANCES = ("empirical", "ledoit_wolf")


def _mahalanobis(reference: np.ndarray, x: np.ndarray, covariance: str) -> np.ndarray:
    """Squared Mahalanobis distance of each row of x from the Gaussian of `reference`'s rows (monotone
    in the Gaussian's negative log-density, so the AUROC is the reference's)."""
    if covariance == "ledoit_wolf":
        return LedoitWolf().fit(reference).mahalanobis(x)
    centred = x - reference.mean(axis=0)
    precision = np.linalg.pinv(np.atleast_2d(np.cov(reference, rowvar=False)), hermitian=True)
    return np.einsum("nd,de,ne->n", centred, precision, centred)


# ----- helpers ---------------------------------------------------------------------------------


def _as_matrix(X, name: str) -> np.ndarray:
    X = np.asarray(X, dtype=float)
    if X.ndim != 2 or len(X) == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {X.shape}")
    return X


def _as_pairs(pairs, name: str) -> np.ndarray:
    pairs = np.asarray(pairs, dtype=float)
    if pairs.ndim != 3 or pairs.shape[1] != 2 or len(pairs) == 0:
        raise ValueError(f"{name} must be a non-empty (N, 2, D) contrast-pair array, got shape {pairs.shape}")
    return pairs


def _as_labels(y, n: int) -> np.ndarray:
    y = np.asarray(y).ravel()
    if len(y) != n:
        raise ValueError(f"got {len(y)} labels for {n} examples")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {np.unique(y)[:5].tolist()}")
    return y.astype(int)


def _require_both_classes(y: np.ndarray, what: str) -> None:
    if len(np.unique(y)) < 2:
        raise ValueError(f"{what}: need both classes, got {len(y)} rows with labels {np.unique(y).tolist()}")


def _check_activations(metadata, activations, contrast_activations):
    # Kept in their stored dtype (often float16/32): only the per-layer slices a probe sees are
    # converted, so the (N, L, D) array is never copied whole.
    activations = np.asarray(activations)
    if activations.ndim != 3 or activations.shape[0] != len(metadata):
        raise ValueError(f"activations must be (N={len(metadata)}, L, D), got shape {activations.shape}")
    if contrast_activations is not None:
        contrast_activations = np.asarray(contrast_activations)
        expected = (len(metadata), activations.shape[1], 2)
        if contrast_activations.ndim != 4 or contrast_activations.shape[:3] != expected:
            raise ValueError(
                f"contrast_activations must be (N={expected[0]}, L={expected[1]}, 2, D), got shape "
                f"{contrast_activations.shape}"
            )
    return activations, contrast_activations


def _check_methods(methods, have_pairs: bool) -> list[str]:
    if methods is None:
        return list(METHODS) if have_pairs else list(STATEMENT_METHODS)
    methods = [methods] if isinstance(methods, str) else list(methods)
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown probe method {method!r}; allowed: {', '.join(METHODS)}")
        if method in CONTRAST_METHODS and not have_pairs:
            raise ValueError(f"probe method {method!r} reads contrast pairs: pass contrast_activations")
    return methods


def _check_probe_options(probe_options) -> dict[str, dict]:
    options = dict(probe_options or {})
    for method in options:
        if method not in METHODS:
            raise ValueError(f"probe_options names unknown method {method!r}; allowed: {', '.join(METHODS)}")
    return options


def _check_metadata(metadata: pd.DataFrame, train_label_column: str, extra: tuple = ()) -> None:
    needed = {"character", "difficulty_bucket", "split", "truth_label", train_label_column, *extra}
    missing = sorted(needed - set(metadata.columns))
    if missing:
        raise ValueError(
            f"metadata lacks column(s) {missing}"
            + (f" (train_label_column={train_label_column!r})" * (train_label_column in missing))
        )


def _subset(metadata: pd.DataFrame, subset: tuple[str | None, str | None], split: str) -> np.ndarray:
    """Boolean mask of rows in `split` matching (character, difficulty bucket); None matches any."""
    character, bucket = subset
    mask = metadata["split"] == split
    if character is not None:
        mask = mask & (metadata["character"] == character)
    if bucket is not None:
        mask = mask & (metadata["difficulty_bucket"] == bucket)
    return mask.to_numpy(dtype=bool)
