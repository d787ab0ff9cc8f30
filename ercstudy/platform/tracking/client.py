"""MLflow: one parent run per study, one nested child run per trial (or one run per `ercstudy train`).

All writes come from one place per run: the study driver (a Tune callback) or the Ray Train
controller of a single trial (callbacks.py), never from the workers, so a local SQLite
store sees one writer. The tracking URI is resolved to an absolute one (Ray's processes run in
other working directories) and checked before any trial starts.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ercstudy.trainables import reports

DEFAULT_DB = "mlflow.db"
STATUS_TAG = "ercstudy.status"  # completed | stopped_early | stopped_nonfinite | failed | running
TRIAL_TAG = "ercstudy.trial_id"
STUDY_TAG = "ercstudy.study"
PARENT_TAG = "mlflow.parentRunId"
VERSION_TAG = "ercstudy.version"
COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own: the UI shows it as the run's source version
DIRTY_TAG = "ercstudy.git_dirty"  # "true" when the checkout had uncommitted changes to tracked files
HARNESS_TAG = "ercstudy.harness"  # a trial run's lm-eval state: evaluated at step N | failed at step N: why | not evaluated: why


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, refused URI)."""


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI to use: the given one, else MLFLOW_TRACKING_URI, else ./mlflow.db (SQLite), made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    elif "://" not in uri or uri.startswith("file:"):
        raise TrackingError(
            f"tracking URI {uri!r}: MLflow 3.17 refuses plain file stores; use sqlite:///PATH.db or http://HOST:5000"
        )
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before any trial starts when a tracking server does not answer (SQLite: the directory must exist)."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {resp.status}")
        except (urllib.error.URLError, OSError) as err:
            raise TrackingError(f"MLflow tracking server {uri} cannot be reached: {getattr(err, 'reason', err)}") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        if not parent.is_dir():
            raise TrackingError(f"tracking URI {uri}: directory {parent} does not exist")


# MLflow's HTTP client retries a failing call for about four minutes by default (7 retries, backoff 2 s x 2^n), for
# servers that rate-limit; ercstudy's own server is either there or not, and the study driver buffers what it
# cannot write (outbox.py): a failed call should cost seconds. Names and types: mlflow/environment_variables.py.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def fail_fast() -> None:
    """Short MLflow HTTP retries in this process (about 2 s for a refused connection, at most ~17 s for a server that
    hangs), unless the user set them."""
    for key, value in FAIL_FAST.items():
        os.environ.setdefault(key, value)
    # urllib3 warns at each retry; the driver says it once (outbox.py)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def unavailable(err: BaseException) -> bool:
    """Whether `err` says the tracking server is not answering (refused, timed out, 5xx): worth buffering and
    retrying later, unlike a request the server refuses (4xx), which would be refused again."""
    import requests

    if isinstance(err, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout)):
        return True
    if isinstance(err, requests.HTTPError):
        return err.response is not None and err.response.status_code >= 500
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(err, RestException):
        return err.get_http_status_code() >= 500
    # what MLflow's http_request raises once its retries are spent (refused, timeout, too many 5xx answers)
    return isinstance(err, MlflowException) and str(err).startswith("API request to ") and " failed with " in str(err)


def client(uri: str) -> Any:
    # a resumed trial's eval table is read back before it is appended to: no download progress bar on the terminal
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # nor a "View run ... at: URL" line on stdout for each run a tracking server's client ends
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.tracking import MlflowClient

    # a new SQLite store announces its schema migration at INFO ("Creating initial MLflow database tables"):
    # not a line for the researcher's terminal; its warnings and errors stay
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=uri)


# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, prompts); ours are
# training runs, compared in the "Model training" view's run table and charts.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(c: Any, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, tags=EXPERIMENT_KIND)
    if "mlflow.experimentKind" not in exp.tags:  # made by hand or by an older ercstudy: a user's own choice stays
        for k, v in EXPERIMENT_KIND.items():
            c.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


def runs_page(experiment_id: str, metric: str, mode: str) -> str:
    """The MLflow UI's page of an experiment's runs, sorted by `metric` best first: the UI reads its sort from the
    page's address (orderByKey / orderByAsc, the keys it writes there itself). MLflow has no setting that names a
    run's or an experiment's primary metric; a study's link opens on its objective this way."""
    import urllib.parse

    query = urllib.parse.urlencode({"orderByKey": f"metrics.`{metric}`", "orderByAsc": str(mode == "min").lower()})
    return f"#/experiments/{experiment_id}/runs?{query}"


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in result.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in reports.NOT_METRICS and math.isfinite(float(v))
    }


def filter_value(value: str) -> str:
    """`value` as a string literal of an MLflow filter: in single quotes, or double quotes when it holds a
    single quote (MLflow's filter grammar has no escape for a quote inside a literal)."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"{value!r}: MLflow filters cannot match a value holding both quote characters")


def tag_filter(**tags: str) -> str:
    """An MLflow filter matching runs with all these tags (keys as given, e.g. ercstudy.trial_id)."""
    return " and ".join(f"tags.`{key}` = {filter_value(value)}" for key, value in tags.items())


def last_logged_step(c: Any, run_id: str) -> int:
    """The last training step a run holds in MLflow (-1 for none): where a resumed trial's logging picks up."""
    return max((m.step for m in c.get_metric_history(run_id, "lm_loss")), default=-1)


def log_result(c: Any, run_id: str, result: dict[str, Any], *, timestamp_ms: int | None = None) -> None:
    """One reported result as metrics at its training step (one batch call).

    timestamp_ms: the metrics' time (default now); a call written again with the same one adds nothing twice
    (MLflow drops a metric identical in key, value, step and time)."""
    from mlflow.entities import Metric

    step = int(result.get(reports.STEP, 0))
    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    metrics = [Metric(k.replace("@", "_"), v, now, step) for k, v in numeric_metrics(result).items() if k != "step"]
    for i in range(0, len(metrics), 900):  # MLflow's batch limit is 1000 metrics
        c.log_batch(run_id, metrics=metrics[i : i + 900], synchronous=True)
    log_harness(c, run_id, result)


def log_harness(c: Any, run_id: str, result: dict[str, Any]) -> None:
    """A report's eval.harness evaluation beside its metrics: lm-eval's results JSON as the artifact
    harness/results_step<N>.json, and the tag HARNESS_TAG (a failure's reason in it)."""


    step = int(result.get(reports.STEP, 0))
    if isinstance(result.get(reports.HARNESS_RESULTS), str):
        c.log_text(run_id, result[reports.HARNESS_RESULTS], f"harness/results_step{step}.json")
        c.set_tag(run_id, HARNESS_TAG, f"evaluated at step {step}")
    elif isinstance(result.get(reports.HARNESS_ERROR), str):
        c.set_tag(run_id, HARNESS_TAG, f"failed at step {step}: {result[reports.HARNESS_ERROR]}"[:4000])


@functools.cache
def provenance() -> dict[str, str]:
    """The code a run ran, as tags: ercstudy's version and, where ercstudy runs from a git checkout (an editable
    install, a cluster's working_dir copy of one), its commit (MLflow's own source tag) and whether it had changes."""
    import subprocess

    import ercstudy

    tags = {VERSION_TAG: ercstudy.__version__}
    root = Path(ercstudy.__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:  # a repository around an installed copy
            return tags
        tags[COMMIT_TAG] = git("rev-parse", "HEAD")
        tags[DIRTY_TAG] = str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def start_trial_run(c: Any, exp_id: str, *, name: str, config: dict[str, Any], params: dict[str, Any] | None = None,
                    parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """A run for one trial: the resolved config as params (and the searched ones as `search.*`), config YAML artifact."""
    all_tags = {STATUS_TAG: "running", **provenance(), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = c.create_run(exp_id, run_name=name, tags=all_tags)
    log_trial_config(c, run.info.run_id, config, params)
    return run.info.run_id


def log_trial_config(c: Any, run_id: str, config: dict[str, Any], params: dict[str, Any] | None = None) -> None:
    """A trial run's params and its trial_config.yaml (again: the same values, nothing twice)."""
    import yaml
    from mlflow.entities import Param

    flat = flat_params(config)
    flat.update({f"search.{k}": str(v) for k, v in (params or {}).items()})
    items = [Param(k, v) for k, v in flat.items()]
    for i in range(0, len(items), 90):
        c.log_batch(run_id, params=items[i : i + 90], synchronous=True)
    c.log_text(run_id, yaml.safe_dump(config, sort_keys=False), "trial_config.yaml")


def trial_status(final: dict[str, Any] | None, total_steps: int | None, *, error: bool = False) -> str:
    if error:
        return "failed"
    if final and final.get(reports.STOP_REASON):
        return "stopped_nonfinite"
    if final and total_steps and int(final.get(reports.STEP, 0)) < total_steps:
        return "stopped_early"
    return "completed"


# MLflow's status of a trial's run by how it ended: a trial the scheduler stopped early ended as planned (FINISHED,
# as Optuna's MLflow integration records pruned trials; `ercstudy.status` and `ercstudy.note` say how and why), one
# that diverged FAILED; KILLED is left for runs a person or a crash ended.
RUN_STATUS = {"completed": "FINISHED", "stopped_early": "FINISHED", "stopped_nonfinite": "FAILED", "failed": "FAILED"}


def finish_trial_run(c: Any, run_id: str, status: str, final: dict[str, Any] | None, *, note: str = "") -> None:
    """Attach the run's plots and tables, then mark it (ercstudy.status tag last: it says the run is whole)."""
    if note:
        c.set_tag(run_id, "ercstudy.note", note[:4000])
    try:
        log_trial_artifacts(c, run_id, final or {})
    except Exception as err:  # plots are a convenience: never fail a study on them
        if unavailable(err):  # the server, not the plots: the caller buffers the whole call (outbox.py)
            raise
        c.set_tag(run_id, "ercstudy.artifact_error", f"{type(err).__name__}: {err}"[:500])
    c.set_terminated(run_id, status=RUN_STATUS.get(status, "KILLED"))
    c.set_tag(run_id, STATUS_TAG, status)


def metric_curves(c: Any, run_id: str, keys: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    out = {}
    for key in keys:
        hist = sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)
        if hist:
            out[key] = ([m.step for m in hist], [m.value for m in hist])
    return out


def log_trial_artifacts(c: Any, run_id: str, final: dict[str, Any]) -> None:
    """Specialization curves per layer, the final coupling matrices M per layer, the eval table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = c.get_run(run_id)
    keys = list(run.data.metrics)
    panels = [("eps_mean", "ERC noise bound eps (mean)"), ("alpha_star", "coupling alpha*"), ("domain_nmi", "routing-domain NMI"),
              ("lm_loss", "LM loss"), ("router_cos", "router row |cos|"), ("load_entropy", "load entropy")]
    panels = [(k, t) for k, t in panels if k in keys]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels):
            layer_keys = sorted(k for k in keys if k.startswith(key + "/layer"))
            for k, (x, y) in metric_curves(c, run_id, layer_keys or [key]).items():
                ax.plot(x, y, label=k.split("/")[-1])
            ax.set_title(title)
            ax.set_xlabel("step")
            if layer_keys:
                ax.legend(fontsize=7)
        fig.tight_layout()
        c.log_figure(run_id, fig, "plots/specialization.png")
        plt.close(fig)
    m = final.get(reports.COUPLING_MATRIX)
    if m:
        L = len(m)
        fig, axes = plt.subplots(1, L, figsize=(3.6 * L, 3.2), squeeze=False)
        for i, (ax, layer) in enumerate(zip(axes[0], m)):
            im = ax.imshow(layer, cmap="viridis")
            ax.set_title(f"M, MoE layer {i}")
            ax.set_xlabel("expert (gate)")
            ax.set_ylabel("router row")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        c.log_figure(run_id, fig, "plots/coupling_matrices.png")
        plt.close(fig)
        c.log_text(run_id, json.dumps(m), "coupling_matrices.json")
    evals = {k: v for k, v in final.items() if k.startswith("eval/") and isinstance(v, (int, float))}
    if evals:
        c.log_table(run_id, {"metric": list(evals), "value": list(evals.values())}, "eval_table.json")
