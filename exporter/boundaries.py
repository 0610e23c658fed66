"""Fit one bounded region per class on standardized ID features (numpy / scikit-learn).

Two kinds, both with the paper's nu (fraction of ID points allowed outside, default 0.1):
- ``rbf``: a one-class SVM with an RBF kernel, which for this kernel is the SVDD ball in
  feature space. Kept: support vectors, their weights and the offset rho.
- ``ball``: a plain ball in input space: class centre and radius = the (1 - nu) quantile of
  the distances of the class's points to it. Tiny and cheap, for small devices.
- ``consistency``: not a region of one layer but a per-class linear prediction of one layer
  from an earlier one; how far an input's later features lie from what its earlier ones
  predict for the predicted class.
The scoring of these regions lives in ``detectors/uniform.py``; these are only the fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RBFRegion:
    """``decision(x) = sum_i alpha_i exp(-gamma ||x - sv_i||^2) - rho`` (>= 0 inside)."""

    support_vectors: np.ndarray  # [M, D]
    alpha: np.ndarray            # [M], > 0
    rho: float
    gamma: float


@dataclass
class BallRegion:
    """``||x - center|| <= radius`` inside."""

    center: np.ndarray  # [D]
    radius: float


def resolve_gamma(gamma: float | str, dim: int) -> float:
    """``"scale"`` is scikit-learn's ``1 / (D * Var)`` with Var = 1 after standardization."""
    if gamma == "scale":
        return 1.0 / dim
    return float(gamma)


def fit_rbf(x: np.ndarray, nu: float, gamma: float) -> RBFRegion:
    """Fit a one-class SVM (RBF kernel) to the points ``x`` [N, D]."""
    from sklearn.svm import OneClassSVM

    svm = OneClassSVM(kernel="rbf", nu=nu, gamma=gamma, tol=1e-4, cache_size=200)
    svm.fit(x.astype(np.float64))
    alpha = svm.dual_coef_.ravel().astype(np.float64)
    keep = alpha > 0
    return RBFRegion(
        support_vectors=svm.support_vectors_[keep].astype(np.float64),
        alpha=alpha[keep],
        rho=float(np.ravel(svm.offset_)[0]),  # decision_function = score_samples - offset_
        gamma=gamma,
    )


def fit_ball(x: np.ndarray, nu: float) -> BallRegion:
    """Centre = mean of ``x``; radius = (1 - nu) quantile of the distances to it."""
    center = x.mean(axis=0)
    dist = np.linalg.norm(x - center, axis=1)
    return BallRegion(center=center, radius=max(float(np.quantile(dist, 1.0 - nu)), 1e-6))


@dataclass
class ConsistencyFit:
    """Per class, the ridge regression of a later layer's standardized features on an earlier
    layer's: ``residual_c(a, b) = b * dst_scale - (a @ weight[c] + bias[c])``, in the earlier
    and later layers' raw (reduced, unmapped) features. ``raw = ||residual||^2`` (>= 0)."""

    weight: np.ndarray     # [C, D_src, D_dst]
    bias: np.ndarray       # [C, D_dst]
    dst_scale: np.ndarray  # [D_dst]


def _standardizers(src: list[np.ndarray], dst: list[np.ndarray]):
    """Pooled mean and spread of all classes' points at both layers (float64)."""
    a_all, b_all = np.concatenate(src).astype(np.float64), np.concatenate(dst).astype(np.float64)
    return a_all.mean(0), a_all.std(0) + 1e-6, b_all.mean(0), b_all.std(0) + 1e-6


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Coefficients ``[D_x + 1, D_y]`` (the intercept last, penalised alike: a class with few
    points keeps a prediction near the pooled mean)."""
    x1 = np.c_[x, np.ones(len(x))]
    return np.linalg.solve(x1.T @ x1 + alpha * np.eye(x1.shape[1]), x1.T @ y)


def fit_consistency(src: list[np.ndarray], dst: list[np.ndarray], alpha: float = 1.0) -> ConsistencyFit:
    """Fit ``ConsistencyFit`` on each class's points (``src[c]`` [N_c, D_src], ``dst[c]``
    [N_c, D_dst], the same points at both layers). Both layers are standardized with the
    pooled mean and spread of all classes' points; ``alpha`` is the ridge penalty on that
    standardized scale."""
    a_mean, a_std, b_mean, b_std = _standardizers(src, dst)
    d = len(a_mean)
    weight, bias = [], []
    for a, b in zip(src, dst):
        coef = _ridge((a - a_mean) / a_std, (b - b_mean) / b_std, alpha)
        # fold the standardizations: b/s_b - ((a - m_a)/s_a @ W + w0 + m_b/s_b)
        w = coef[:d] / a_std[:, None]
        weight.append(w)
        bias.append(coef[d] - a_mean @ w + b_mean / b_std)
    return ConsistencyFit(np.stack(weight), np.stack(bias), 1.0 / b_std)


def consistency_cross_raw(src: list[np.ndarray], dst: list[np.ndarray], alpha: float = 1.0,
                          folds: int = 5) -> list[np.ndarray]:
    """Out-of-fold raw ``||residual||^2`` of every class's own points (``fit_consistency``'s
    math, each fold predicted by a regression fitted on the others): what raw looks like on ID
    points the regression did not see, when no held-out points are left. In-sample residuals
    are smaller (the regression fits its own points), and a score layer matched on them
    would flag too much ID data."""
    a_mean, a_std, b_mean, b_std = _standardizers(src, dst)
    out = []
    for a, b in zip(src, dst):
        x, y = (a - a_mean) / a_std, (b - b_mean) / b_std
        raw = np.empty(len(x))
        fold = np.arange(len(x)) % max(2, min(folds, len(x)))
        for k in np.unique(fold):
            coef = _ridge(x[fold != k], y[fold != k], alpha)
            r = y[fold == k] - np.c_[x[fold == k], np.ones((fold == k).sum())] @ coef
            raw[fold == k] = (r * r).sum(1)
        out.append(raw)
    return out


def codebook(points: list[np.ndarray], size: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Shared prototypes for many classes' support vectors: k-means (``size`` centres at most)
    of all of ``points`` (one ``[M_c, D]`` array per class). Returns the prototypes ``[K, D]``
    and, per class, the prototype index of each of its points."""
    allp = np.concatenate(points)
    k = int(min(size, len(allp)))
    if k == len(allp):            # no fewer prototypes than points: the points themselves
        book = allp.astype(np.float64)
    else:
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1, batch_size=4096,
                             max_iter=50).fit(allp)
        book = km.cluster_centers_.astype(np.float64)
    # nearest prototype of every point, by ||p||^2 - 2 x.p (chunked: C x M points can be many)
    sq = (book ** 2).sum(1)
    nearest = np.concatenate([np.argmin(sq - 2.0 * allp[i:i + 8192] @ book.T, axis=1)
                              for i in range(0, len(allp), 8192)])
    bounds = np.cumsum([0] + [len(p) for p in points])
    return book, [nearest[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
