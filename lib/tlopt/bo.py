"""GPyOpt, and nothing else: the random initial design, a suggestion, its files, its surrogate.

This is the only module that imports GPyOpt. We do not call GPyOpt's `run_optimization`:
it writes its report and evaluation files only when a run ends, catches
`np.linalg.linalg.LinAlgError` (an AttributeError under numpy 2), and keeps its state in
memory. `tlopt.optimize` drives an ask-and-tell loop instead, and asks here for each
suggestion: a pure function of the evaluations so far and a seed, made by GPyOpt's own
`BayesianOptimization` with the library's defaults (docs/method.md section 4).
"""

from __future__ import annotations

import contextlib
import io
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from tlopt.files import atomic_path
from tlopt.params import BayesianOptimization
from tlopt.space import SearchSpace


def _gpyopt():
    """GPyOpt imports pkg_resources; the pin setuptools<82 keeps that import alive."""
    import GPyOpt
    from GPyOpt.core.task.space import Design_space
    from GPyOpt.experiment_design import initial_design

    return GPyOpt, Design_space, initial_design


def step_seed(seed: int, label: str, step: str, index: int = 0) -> int:
    """A seed for one draw of one step, stable across processes (unlike hash())."""
    return (zlib.crc32(f"{label}/{step}".encode()) + 7919 * seed + 104729 * index) % 2**32


def initial_points(space: SearchSpace, count: int, seed: int) -> np.ndarray:
    """GPyOpt's random initial design, seeded."""
    _, Design_space, initial_design = _gpyopt()
    np.random.seed(seed)
    return initial_design("random", Design_space(space.domain), count)


@contextmanager
def _gp_context() -> Iterator[None]:
    """One BLAS thread for GP algebra on tiny matrices, and no GPy overflow chatter.

    With two threads (and TensorFlow's pools busy in the same process) each 15x15
    Cholesky took milliseconds of thread hand-off: a suggestion took 4 s instead of
    0.3 s here. The overflow warnings come from GPy's kernel hyperparameter search trying
    extreme values, which it handles itself.
    """
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _bayesian_optimization(space: SearchSpace, X: np.ndarray, Y: np.ndarray, bo: BayesianOptimization,
                           de_duplication: bool = False):
    """A GPyOpt BayesianOptimization over the evaluations so far (library defaults)."""
    GPyOpt, _, _ = _gpyopt()
    return GPyOpt.methods.BayesianOptimization(
        f=None,
        domain=space.domain,
        X=X,
        Y=Y,
        acquisition_type=bo.acquisition,
        normalize_Y=True,
        initial_design_numdata=bo.initial_points,
        model_update_interval=1,
        de_duplication=de_duplication,
    )


class DomainExhausted(Exception):
    """Every point of a discrete domain has been evaluated or is running: nothing new to suggest."""


def constant_lie(Y: np.ndarray) -> float:
    """The value each running trial's point gets while it runs: the worst score among `Y`.

    `Y` holds negated scores, so the worst is the largest (a failed trial's 0 included);
    docs/decisions.md says why the pessimistic lie.
    """
    return float(np.max(Y))


def suggest(space: SearchSpace, X: np.ndarray, Y: np.ndarray, bo: BayesianOptimization, seed: int,
            pending: np.ndarray | None = None) -> np.ndarray:
    """The next point: GP + acquisition (method `bayesian`) or uniform random (`random`).

    `Y` holds the negated scores (GPyOpt minimizes). Raises `np.linalg.LinAlgError` when
    the GP cannot be fitted. `pending` (rows of trials still running; given, even empty, in
    parallel steps) makes it a constant liar (docs/method.md section 4.1): the pending rows
    join X with `constant_lie(Y)`, and GPyOpt's de-duplication keeps the new point off every
    row of X; `DomainExhausted` when no point is left.
    """
    if bo.method == "random":
        return initial_points(space, 1, seed)
    np.random.seed(seed)
    if pending is None:
        with _gp_context():
            return _bayesian_optimization(space, X, Y, bo).suggest_next_locations()
    pending = np.asarray(pending, dtype=float).reshape(-1, X.shape[1])
    lies = np.full((len(pending), 1), constant_lie(Y))
    from GPyOpt.core.errors import FullyExploredOptimizationDomainError

    # GPyOpt prints (not logs) a warning when few candidates are left; a notebook need not show it.
    with _gp_context(), contextlib.redirect_stdout(io.StringIO()):
        try:
            return _bayesian_optimization(space, np.vstack([X, pending]), np.vstack([Y, lies]), bo,
                                          de_duplication=True).suggest_next_locations()
        except FullyExploredOptimizationDomainError as error:
            raise DomainExhausted(str(error)) from None


def write_files(step_dir: Path, space: SearchSpace, X: np.ndarray, Y: np.ndarray, bo: BayesianOptimization,
                seconds: float) -> None:
    """GPyOpt's own report and evaluation files, written atomically (we rewrite them after every trial)."""
    optimizer = _bayesian_optimization(space, X, Y, bo)
    optimizer.num_acquisitions = max(0, len(X) - bo.initial_points)
    optimizer.max_iter = bo.iterations
    optimizer.eps = bo.eps
    optimizer.cum_time = seconds
    for name, write in (("evaluations.txt", optimizer.save_evaluations), ("report.txt", optimizer.save_report)):
        with atomic_path(step_dir / name) as temporary:
            write(str(temporary))


def surrogate_surface(space: SearchSpace, X: np.ndarray, Y: np.ndarray, bo: BayesianOptimization) -> dict | None:
    """The GP's prediction and the acquisition on a grid, for domains of 1 or 2 variables.

    Values are turned back into scores (the objective's value, or exp(-loss); GPyOpt models
    the normalized, negated score). None for larger domains. `plots.acquisition_figure` draws it.
    """
    variables = space.variables
    numeric = [v for v in variables if not hasattr(v, "options")]
    choices = [v for v in variables if hasattr(v, "options")]
    if len(variables) > 2 or not numeric or len(choices) > 1:
        return None
    optimizer = _bayesian_optimization(space, X, Y, bo)
    with _gp_context():
        optimizer._update_model(optimizer.normalization_type)
    Y = np.asarray(Y, dtype=float)
    y_mean, y_std = Y.mean(), (Y.std() if Y.std() > 0 else 1.0)

    def predict(zipped: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        unzipped = optimizer.space.unzip_inputs(zipped)
        mean, std = optimizer.model.predict(unzipped)
        acquisition = -optimizer.acquisition.acquisition_function(unzipped)
        return -(mean.ravel() * y_std + y_mean), std.ravel() * y_std, acquisition.ravel()

    def grid(variable) -> np.ndarray:
        low, high = variable.domain()["domain"][0], variable.domain()["domain"][-1]
        if variable.domain()["type"] == "discrete":
            return np.array(variable.domain()["domain"], dtype=float)
        return np.linspace(low, high, 200)

    def label(variable) -> str:
        return f"log10 {variable.name}" if getattr(variable, "scale", None) == "log" else variable.name

    if len(numeric) == 2:
        gx, gy = grid(numeric[0])[:60], grid(numeric[1])[:60]
        mesh_x, mesh_y = np.meshgrid(np.linspace(gx[0], gx[-1], 60), np.linspace(gy[0], gy[-1], 60))
        zipped = np.column_stack([mesh_x.ravel(), mesh_y.ravel()])
        mean, std, acquisition = predict(zipped)
        return {
            "kind": "grid2d", "mean": mean.reshape(mesh_x.shape), "std": std.reshape(mesh_x.shape),
            "acquisition": acquisition.reshape(mesh_x.shape), "points": np.asarray(X, dtype=float),
            "x_range": (gx[0], gx[-1]), "y_range": (gy[0], gy[-1]),
            "x_label": label(numeric[0]), "y_label": label(numeric[1]),
        }

    variable = numeric[0]
    column = variables.index(variable)
    categories = [(None, "")] if not choices else [
        (index, name) for index, name in enumerate(choices[0].options)
    ]
    curves = []
    for category, name in categories:
        values = grid(variable)
        zipped = np.zeros((len(values), len(variables)))
        zipped[:, column] = values
        observed = np.ones(len(X), dtype=bool)
        if category is not None:
            choice_column = variables.index(choices[0])
            zipped[:, choice_column] = category
            observed = np.asarray(X)[:, choice_column] == category
        mean, std, acquisition = predict(zipped)
        curves.append({
            "label": name, "grid": values, "mean": mean, "std": std, "acquisition": acquisition,
            "points_x": np.asarray(X)[observed, column], "points_y": -np.asarray(Y)[observed, 0],
        })
    return {"kind": "curves", "curves": curves, "x_label": label(variable)}
