"""Linear probes of the class label from block features (scikit-learn, on the host).

A probe is a multinomial logistic regression on standardised features, scored by stratified
k-fold cross-validation with a fixed seed, so that two runs probed on the same features get the
same folds.
"""

import warnings

import numpy as np
from jaxtyping import Float, Int

from ._errors import AnalysisError


def probe_accuracy(
    features: Float[np.ndarray, "n feature"],
    labels: Int[np.ndarray, " n"],
    *,
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 1000,
) -> tuple[float, float]:
    """Cross-validated accuracy of a linear probe of `labels` from `features`.

    **Arguments:**

    - `features`: one row per example (e.g. a block's representation pooled over tokens).
    - `labels`: integer class labels.
    - `folds`: stratified folds (shuffled with `seed`); at most the size of the smallest class.
    - `seed`: the folds' random state.
    - `max_iter`: iterations of the L-BFGS solver.

    **Returns:** `(mean, std)` of the held-out accuracy over the folds.

    **Raises:** `AnalysisError` when a class has fewer examples than `folds` or there is one class.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    check_probe_labels(labels, folds)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # One BLAS thread: these problems are small, and BLAS threads contending with XLA's thread pool
    # made each probe ~10x slower (measured on a 2-core machine).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(probe, features, labels, cv=cv)
    return float(np.mean(scores)), float(np.std(scores))


def check_probe_labels(labels: Int[np.ndarray, " n"], folds: int) -> None:
    """Raise `AnalysisError` unless `labels` allow `folds`-fold stratified probes."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    if counts.size < 2:
        raise AnalysisError("the linear probes need at least two classes in the examples")
    if counts.min() < folds:
        raise AnalysisError(
            f"the smallest class has {counts.min()} examples, fewer than folds={folds}; "
            "use more examples or fewer folds"
        )


__all__ = ["check_probe_labels", "probe_accuracy"]
