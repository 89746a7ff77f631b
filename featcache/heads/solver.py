"""Float32 building blocks for the linear heads: a streaming scaler and a full-batch solver.

Reads and writes nothing. scikit-learn's ``LogisticRegression``/``LinearSVC`` copy their
input to float64 (2x the feature matrix); these fit the same objectives on the float32
matrix as given, without any copy of it:

- :class:`Scaler` learns per-feature mean and standard deviation in row blocks (float64
  accumulators of size D only, blocks merged by Chan et al.'s stable update). It is never
  *applied* to the matrix: :func:`fit_linear` folds it into the weights
  (``((X - mu) / sd) @ W == X @ (W / sd) - mu @ (W / sd)``).
- :func:`fit_linear` minimises ``mean(loss) + ||W||^2 / (2 C n)`` (scikit-learn's ``C``
  scaling) with full-batch L-BFGS (scipy's L-BFGS-B). Losses: multinomial cross-entropy
  (``softmax``) and one-vs-rest squared hinge (``squared_hinge``, LinearSVC's default).
  Several blocks (e.g. plain and mirrored features) are summed without concatenation.
- :class:`Preconditioner`: L-BFGS runs in whitened coordinates ``W = P(C) V`` with
  ``P = (R + alpha/c I)^(-1/2)`` (``R`` the correlation matrix of the standardized features,
  estimated from a strided sample of at most 20,000 rows; ``alpha = 1/(C n)``). The
  objective and its optimum are unchanged; only the conditioning is: on real MobileNetV2
  features 4-5x fewer iterations (docs/stage-two.md, "Preconditioned L-BFGS").
- :func:`covariance`: the (D, D) float64 covariance of standardized rows, blockwise (also
  used by the kNN and random-Fourier heads' PCA).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

BLOCK = 8192
FIT_BLOCK = 1024   # rows per step of the loss/gradient pass: X[i:i+1024] (5 MB at D=1,280)
                   # stays in cache between ``X @ W`` and ``X.T @ G`` (measured 1.4x vs 8192)
LOSSES = ("softmax", "squared_hinge")
SOLVERS = ("lbfgs", "scipy")
PRECOND_ROWS = 20_000   # rows sampled for the preconditioner's correlation matrix
# precondition="auto" below this many training rows (mirrors included) runs plain L-BFGS:
# the preconditioner's fixed cost (a D x D correlation and its eigh, seconds at D = 1,280)
# outweighs the iterations it saves. On real MobileNetV2 features, logreg at C=0.003:
# 5,000 rows 0.76 s plain vs 2.2 s preconditioned, 20,000 rows 3.8 s vs 6.4 s, same
# validation accuracy to 0.1 point; at 45,000 rows its 3-4x fewer iterations win
# (docs/stage-two.md, "Preconditioned L-BFGS").
PRECOND_MIN_ROWS = 30_000
CURVATURE = 0.25        # the loss's curvature scale: P = (R + alpha / CURVATURE)^(-1/2)


@dataclass
class Scaler:
    """Per-feature mean and standard deviation (float32), learned blockwise."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, blocks) -> "Scaler":
        """Mean and standard deviation over all rows of all blocks, in float64 per row block
        of 1,024: each block's mean and sum of squared deviations (M2), merged with Chan et
        al.'s pairwise update — numerically stable where ``E[x^2] - E[x]^2`` cancels
        (features with a large offset and a small spread)."""
        mean = m2 = None
        n = 0
        for X in blocks:
            for i in range(0, len(X), 1024):
                b = np.asarray(X[i:i + 1024], dtype=np.float64)  # a small block only
                nb = len(b)
                if nb == 0:
                    continue
                mb = b.mean(0)
                d = b - mb
                m2b = np.einsum("ij,ij->j", d, d)
                if mean is None:
                    mean, m2, n = mb, m2b, nb
                    continue
                delta = mb - mean
                tot = n + nb
                mean = mean + delta * (nb / tot)
                m2 = m2 + m2b + delta ** 2 * (n * nb / tot)
                n = tot
        var = np.maximum(m2 / n, 0.0)
        sd = np.sqrt(var)
        sd[sd < 1e-6 * max(1.0, float(sd.max()))] = 1.0  # constant features: leave as is
        return cls(mean.astype(np.float32), sd.astype(np.float32))

    @classmethod
    def identity(cls, dim: int) -> "Scaler":
        return cls(np.zeros(dim, np.float32), np.ones(dim, np.float32))


def covariance(blocks, mean: np.ndarray, scale: np.ndarray | None = None, *,
               max_rows: int | None = None) -> np.ndarray:
    """``E[z z^T]`` (float64, (D, D)) of ``z = (x - mean) / scale`` over the rows of all
    blocks, computed in float32 blocks of 4,096 rows; with ``max_rows``, over an evenly
    strided sample of about that many rows (deterministic)."""
    n_all = sum(len(b) for b in blocks)
    step = 1 if not max_rows or n_all <= max_rows else -(-n_all // max_rows)
    D = blocks[0].shape[1]
    cov = np.zeros((D, D), np.float64)
    n = 0
    for X in blocks:
        X = X[::step] if step > 1 else X
        for i in range(0, len(X), 4096):
            z = np.asarray(X[i:i + 4096], dtype=np.float32) - mean
            if scale is not None:
                z /= scale
            cov += z.T @ z
            n += len(z)
    return cov / max(n, 1)


@dataclass
class Preconditioner:
    """Eigen-decomposition of the correlation matrix ``R`` of the standardized features:
    ``matrix(alpha)`` is ``P = (R + alpha/c I)^(-1/2)``, which makes the Hessian of the
    regularised loss (about ``c R + alpha I``) close to a multiple of the identity."""

    vectors: np.ndarray
    values: np.ndarray

    @classmethod
    def fit(cls, blocks, scaler: Scaler, max_rows: int = PRECOND_ROWS) -> "Preconditioner":
        R = covariance(blocks, scaler.mean, scaler.scale, max_rows=max_rows)
        w, U = np.linalg.eigh(R)
        return cls(U, np.maximum(w, 0.0))

    def matrix(self, alpha: float, power: float = -0.5) -> np.ndarray:
        d = (self.values + alpha / CURVATURE) ** power
        return (self.vectors * d) @ self.vectors.T


def folded(scaler: Scaler, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights on raw features equivalent to ``W, b`` on standardized ones."""
    W_eff = (W / scaler.scale[:, None]).astype(np.float32)
    b_eff = (b - scaler.mean @ W_eff).astype(np.float32)
    return W_eff, b_eff


def decision(X: np.ndarray, W_eff: np.ndarray, b_eff: np.ndarray) -> np.ndarray:
    out = np.empty((len(X), W_eff.shape[1]), np.float32)
    for i in range(0, len(X), BLOCK):
        np.matmul(X[i:i + BLOCK], W_eff, out=out[i:i + BLOCK])
    out += b_eff
    return out


def softmax(S: np.ndarray) -> np.ndarray:
    S = S - S.max(axis=1, keepdims=True)
    np.exp(S, out=S)
    S /= S.sum(axis=1, keepdims=True)
    return S


def _loss_grad(S: np.ndarray, y: np.ndarray, loss: str) -> tuple[float, np.ndarray]:
    """Summed loss and its gradient w.r.t. the scores ``S`` (float32, same shape)."""
    n = len(S)
    if loss == "softmax":
        Z = S - S.max(axis=1, keepdims=True)
        lse = np.log(np.exp(Z).sum(axis=1))
        value = float(np.sum(lse.astype(np.float64) - Z[np.arange(n), y]))
        G = np.exp(Z - lse[:, None])
        G[np.arange(n), y] -= 1.0
        return value, G
    Ypm = np.full(S.shape, -1.0, np.float32)
    Ypm[np.arange(n), y] = 1.0
    m = np.maximum(1.0 - Ypm * S, 0.0)
    value = float(np.sum(m.astype(np.float64) ** 2))
    return value, (-2.0 * Ypm * m).astype(np.float32)


def objective(blocks, y: np.ndarray, n_classes: int, *, scaler: Scaler, C: float,
              loss: str):
    """``fun(theta) -> (value, gradient)`` of :func:`fit_linear`'s objective (float64
    ``theta`` = W.ravel() then b; the passes over the float32 rows are float32)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}")
    D = blocks[0].shape[1]
    K = n_classes
    n_total = sum(len(X) for X in blocks)
    mu, sd = scaler.mean, scaler.scale
    alpha = 1.0 / (C * n_total)

    def fun(theta):
        W = theta[:D * K].reshape(D, K).astype(np.float32)
        b = theta[D * K:].astype(np.float32)
        W_eff, b_eff = folded(scaler, W, b)
        value = 0.0
        gW = np.zeros((D, K), np.float64)
        gb = np.zeros(K, np.float64)
        for X in blocks:
            for i in range(0, len(X), FIT_BLOCK):
                Xb = X[i:i + FIT_BLOCK]
                S = Xb @ W_eff
                S += b_eff
                v, G = _loss_grad(S, y[i:i + FIT_BLOCK], loss)
                value += v
                gW += Xb.T @ G
                gb += G.sum(0)
        gW -= np.outer(mu, gb)
        gW /= sd[:, None]
        Wd = W.astype(np.float64)
        value = value / n_total + 0.5 * alpha * float(np.sum(Wd * Wd))
        grad = np.concatenate([(gW / n_total + alpha * Wd).ravel(), gb / n_total])
        return value, grad

    return fun


def fit_linear(blocks, y: np.ndarray, n_classes: int, *, scaler: Scaler, C: float,
               loss: str, init: tuple[np.ndarray, np.ndarray] | None = None,
               max_iter: int = 300, tol: float = 1e-4, solver: str = "scipy",
               precondition: Preconditioner | None = None
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Minimise ``mean(loss(X_std @ W + b, y)) + ||W||^2 / (2 C n)`` over all blocks.

    ``blocks`` is a list of float32 (n, D) arrays that share the labels ``y`` (plain and
    mirrored features). Returns ``(W, b, iterations)`` on the *standardized* scale.
    ``solver``: ``"scipy"`` (the default: ``scipy.optimize.minimize(method="L-BFGS-B")``
    on this float32 loss/gradient) or ``"lbfgs"`` (the hand-written :func:`lbfgs`, kept for
    the comparison in ``benchmarks/stage2_parts.py``: same iterations and evaluations, not
    measurably faster, so not the default; docs/stage-two.md). With ``precondition`` the
    solver works on ``V`` with ``W = P V`` (:class:`Preconditioner`): the same objective
    and optimum; ``tol`` then bounds the gradient in those coordinates.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}")
    D = blocks[0].shape[1]
    K = n_classes
    fun = objective(blocks, y, n_classes, scaler=scaler, C=C, loss=loss)
    theta0 = np.zeros(D * K + K)
    if init is not None:
        theta0[:D * K] = init[0].ravel()
        theta0[D * K:] = init[1]
    P = None
    if precondition is not None:
        alpha = 1.0 / (C * sum(len(X) for X in blocks))
        P = precondition.matrix(alpha)
        theta0[:D * K] = (precondition.matrix(alpha, 0.5) @ theta0[:D * K].reshape(D, K)).ravel()
        fun = _in_coordinates(fun, P, D, K)
    # One BLAS thread: these products are memory-bound (K columns) and the optimizer's
    # vector ops tiny; multi-threaded OpenBLAS spin-waits and runs several times slower
    # whenever the cores are shared (measured: 13.8 s -> 1.8 s for 20 iterations).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        if solver == "scipy":
            theta, nit = scipy_lbfgs(fun, theta0, max_iter=max_iter, tol=tol)
        else:
            theta, nit = lbfgs(fun, theta0, max_iter=max_iter, tol=tol)
    if nit >= max_iter:
        log.debug("L-BFGS stopped at max_iter=%d (C=%g, %s)", max_iter, C, loss)
    if P is not None:
        theta = np.concatenate([(P @ theta[:D * K].reshape(D, K)).ravel(), theta[D * K:]])
    W = theta[:D * K].reshape(D, K).astype(np.float32)
    b = theta[D * K:].astype(np.float32)
    return W, b, nit


def _in_coordinates(fun, P: np.ndarray, D: int, K: int):
    """``fun`` of ``theta = (W, b)`` as a function of ``(V, b)`` with ``W = P V`` (P
    symmetric): value unchanged, gradient ``P grad_W``."""
    def funV(phi):
        theta = np.concatenate([(P @ phi[:D * K].reshape(D, K)).ravel(), phi[D * K:]])
        value, g = fun(theta)
        return value, np.concatenate([(P @ g[:D * K].reshape(D, K)).ravel(), g[D * K:]])
    return funV


def scipy_lbfgs(fun, x0: np.ndarray, *, max_iter: int = 300, tol: float = 1e-4,
                memory: int = 10, rtol: float = 1e-9) -> tuple[np.ndarray, int]:
    """The same minimisation with scipy's L-BFGS-B (no bounds): same memory, the same
    gradient max-norm ``tol`` and relative-decrease ``rtol`` stopping rules."""
    from scipy.optimize import minimize

    res = minimize(fun, np.asarray(x0, dtype=np.float64), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": tol, "ftol": rtol,
                            "maxcor": memory})
    return res.x, int(res.nit)


def lbfgs(fun, x0: np.ndarray, *, max_iter: int = 300, tol: float = 1e-4, memory: int = 10,
          rtol: float = 1e-9) -> tuple[np.ndarray, int]:
    """Minimise a smooth convex ``fun(x) -> (value, gradient)``: L-BFGS two-loop recursion
    with Armijo backtracking (no longer the default: scipy's L-BFGS-B took the same number
    of iterations and evaluations and was not slower). Stops when the gradient's max-norm is below
    ``tol`` or the value stops improving (relative ``rtol``)."""
    x = np.asarray(x0, dtype=np.float64).copy()
    f, g = fun(x)
    S, Y, RHO = [], [], []
    it = 0
    for it in range(1, max_iter + 1):
        if np.max(np.abs(g)) < tol:
            return x, it - 1
        S_before = len(S)
        q = g.copy()
        alphas = []
        for s, y, rho in zip(reversed(S), reversed(Y), reversed(RHO)):
            a = rho * (s @ q)
            q -= a * y
            alphas.append(a)
        if S:
            q *= (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1])
        else:
            q /= max(1.0, np.linalg.norm(q))
        for (s, y, rho), a in zip(zip(S, Y, RHO), reversed(alphas)):
            q += s * (a - rho * (y @ q))
        d = -q
        slope = g @ d
        if slope >= 0:                      # not a descent direction: restart
            S, Y, RHO = [], [], []
            S_before = 0
            d, slope = -g, -(g @ g)
        step = 1.0
        while True:
            x_new = x + step * d
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s, y = x_new - x, g_new - g
        sy = s @ y
        if sy > 1e-12:
            S.append(s), Y.append(y), RHO.append(1.0 / sy)
            if len(S) > memory:
                S.pop(0), Y.pop(0), RHO.pop(0)
        # No stalling test on a steepest-descent step (first iteration, restart): from a
        # warm start its unit-length step may change f very little without being converged.
        done = bool(S_before) and abs(f - f_new) <= rtol * max(1.0, abs(f))
        x, f, g = x_new, f_new, g_new
        if done:
            break
    return x, it
