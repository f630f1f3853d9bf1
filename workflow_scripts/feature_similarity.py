"""How alike two sparse autoencoders' features are: each feature's largest Pearson correlation with any
feature of the other SAE over the same tokens (MPPC, the mean of those maxima), computed from sparse
latents in token chunks.

A TopK SAE has k active latents of n per token, so the cross-products of two SAEs' latents over a chunk
cost chunk * k^2 as a sparse product; only the running sums, sums of squares and the (n_a, n_b)
cross-product matrix are kept, never the (tokens, n) latent matrices.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

THRESHOLDS = (0.5, 0.7)


def sparse_rows(indices: np.ndarray, values: np.ndarray, n_latents: int) -> sp.csr_matrix:
    """(N, k) top-k indices and values as an (N, n_latents) sparse matrix."""
    n, k = indices.shape
    return sp.csr_matrix(
        (values.astype(np.float64).ravel(), indices.ravel().astype(np.int64), np.arange(0, n * k + 1, k)),
        shape=(n, n_latents),
    )


def max_correlations(latents_a, latents_b, n_a: int, n_b: int, chunk_tokens: int = 4096):
    """Each feature's maximum Pearson correlation with any feature of the other side, both ways.

    latents_a, latents_b: (indices, values) pairs of (N, k) arrays over the same N tokens (row i of
    one is the token of row i of the other). Returns (max_a, max_b): (n_a,) and (n_b,) float arrays,
    NaN for a feature that never varies over these tokens (a dead latent has no correlation)."""
    (index_a, value_a), (index_b, value_b) = latents_a, latents_b
    n_tokens = len(index_a)
    if len(index_b) != n_tokens:
        raise ValueError(f"the two sides have {n_tokens} and {len(index_b)} tokens: they must be the same tokens")
    sum_a, sum_b = np.zeros(n_a), np.zeros(n_b)
    square_a, square_b = np.zeros(n_a), np.zeros(n_b)
    cross = np.zeros((n_a, n_b))
    for start in range(0, n_tokens, chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        a = sparse_rows(index_a[rows], value_a[rows], n_a)
        b = sparse_rows(index_b[rows], value_b[rows], n_b)
        sum_a += np.asarray(a.sum(axis=0)).ravel()
        sum_b += np.asarray(b.sum(axis=0)).ravel()
        square_a += np.asarray(a.multiply(a).sum(axis=0)).ravel()
        square_b += np.asarray(b.multiply(b).sum(axis=0)).ravel()
        cross += (a.T @ b).toarray()
    # n^2 * covariance and n^2 * variance, from the sums (float64)
    covariance = n_tokens * cross - np.outer(sum_a, sum_b)
    variance_a = n_tokens * square_a - sum_a**2
    variance_b = n_tokens * square_b - sum_b**2
    # A feature whose variance is at rounding level of its square sum does not vary: no correlation.
    live_a = variance_a > 1e-9 * np.maximum(n_tokens * square_a, 1e-300)
    live_b = variance_b > 1e-9 * np.maximum(n_tokens * square_b, 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        correlation = covariance / np.sqrt(np.outer(variance_a, variance_b))
    correlation[~live_a, :] = np.nan
    correlation[:, ~live_b] = np.nan
    return _nanmax(correlation, axis=1), _nanmax(correlation, axis=0)


def _nanmax(matrix: np.ndarray, axis: int) -> np.ndarray:
    """Maximum along `axis` ignoring NaN; NaN where a whole line is NaN (without numpy's warning)."""
    filled = np.where(np.isnan(matrix), -np.inf, matrix).max(axis=axis)
    return np.where(np.isfinite(filled), filled, np.nan)


def summarise(maxima: np.ndarray) -> dict:
    """MPPC (mean of the live features' maxima), the share of live features above each threshold,
    and how many features were live (varied over the tokens)."""
    live = maxima[~np.isnan(maxima)]
    summary = {"mppc": float(live.mean()) if len(live) else float("nan"), "live_features": int(len(live))}
    for threshold in THRESHOLDS:
        summary[f"share_above_{threshold}"] = float((live > threshold).mean()) if len(live) else float("nan")
    return summary


def shifted_rows(tokens_a: pd.DataFrame, tokens_b: pd.DataFrame, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (rows_a, rows_b) pairing token (example, position) of side a with token (example,
    position + shift) of side b, for every token of a whose partner exists. Both tables have the
    columns example_index, position and token_id; at shift 0 their token ids must agree (the same
    tokens), which is checked."""
    a = tokens_a[["example_index", "position", "token_id"]].reset_index(drop=True).rename_axis("row_a").reset_index()
    b = tokens_b[["example_index", "position", "token_id"]].reset_index(drop=True).rename_axis("row_b").reset_index()
    if shift == 0:
        same = a.merge(b, on=["example_index", "position"], how="outer", suffixes=("_a", "_b"), indicator=True)
        if (same["_merge"] != "both").any() or (same["token_id_a"] != same["token_id_b"]).any():
            raise ValueError("the two activation files do not hold the same tokens: same tokenizer and token set?")
    b = b.assign(position=b["position"] - shift)
    paired = a.merge(b, on=["example_index", "position"], how="inner").sort_values("row_a")
    return paired["row_a"].to_numpy(), paired["row_b"].to_numpy()
