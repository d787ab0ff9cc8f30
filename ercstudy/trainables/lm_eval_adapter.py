"""lm-evaluation-harness in the data plane: the `eval.harness` section, the model adapter, and the
evaluation a trial runs on its own workers (the optional extra `evals`: pip install 'ercstudy[evals]').

`ErcstudyLM` is an lm-eval model (registered as `ercstudy`): lm-eval's TemplateLM tokenizes
(context, continuation) pairs the way it does for Hugging Face models, and the scoring is
evals.continuation_logprobs, the batched scorer the in-training evaluations use. Rolling
log-likelihoods cut a document into lm-eval's disjoint windows of the model's context. It wraps a
checkpoint loaded from disk (`ercstudy eval`, platform/report/checkpoint_eval.py) or the live model of a trial.

In a trial (`TrialHarness`, called by worker.train at `eval.harness.at` steps) the tasks run on the
trial's devices: on rank 0 alone, or, under expert parallelism (ep_size > 1, where a forward is a
collective over the expert-parallel group), on every rank with the same requests in the same order.
Its metrics (`harness/<task>/<metric>`) join the step's report; lm-eval's results JSON rides along
under reports.HARNESS_RESULTS (the driver makes it an artifact of the trial's MLflow run, never a metric); a
failure is that evaluation's, not the trial's: `harness/failed` 1 and its reason under reports.HARNESS_ERROR.

Tasks from local files (an lm-eval task YAML whose `dataset_path: json` points at a local JSONL
file, evals/tasks/) are found through `include_path`, their relative data files under `data_dir`:
nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from ercstudy.trainables import reports
from ercstudy.trainables.lm_eval_config import HarnessConfig, with_absolute_paths  # noqa: F401  (the section lives beside evals' EvalConfig)
from ercstudy.trainables.validation import ConfigError

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'ercstudy[evals]'"
FAILED_METRIC = "harness/failed"  # 1.0 when the evaluation at this step failed, else 0.0
LOCAL_LOADERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' packaged loaders of local data_files


class HarnessError(RuntimeError):
    """The evaluation cannot run as asked: one line that says why."""


# ---------------------------------------------------------------------------------------------
# lm-eval's tasks


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise HarnessError(INSTALL_HINT) from None
    return TemplateLM


def task_manager(tasks: list[str] | tuple[str, ...], include_path: str | None) -> Any:
    """lm-eval's TaskManager that knows `tasks`: the local task YAMLs alone when they hold them all (indexing
    lm-eval's thousands of built-in YAMLs costs many seconds of CPU), else built-ins and local ones."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        print("indexing lm-eval's built-in tasks (up to a minute)", file=sys.stderr, flush=True)
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor under include_path {include_path})" if include_path else " (give include_path: a directory of local task YAMLs)"
        raise HarnessError(f"unknown lm-eval task(s): {', '.join(unknown)}: not in lm-eval's registry{where}")
    return manager


def leaf_configs(manager: Any, name: str) -> list[dict[str, Any]]:
    """The task configs (YAML, includes resolved) that the task, group or tag `name` runs."""
    entry = manager.task_index.get(name)
    if entry is None:
        return []
    kind = entry.kind.name
    if kind == "TAG":
        return [c for t in sorted(entry.tags) for c in leaf_configs(manager, t)]
    cfg = dict(entry.cfg or {})
    if kind == "GROUP":
        out = []
        for member in cfg.get("task") or []:
            if isinstance(member, str):
                out.extend(leaf_configs(manager, member))
            elif isinstance(member, dict) and "task" in member:
                out.extend(leaf_configs(manager, member["task"]) or [member])
        return out
    return [{**cfg, "_yaml_path": str(entry.yaml_path) if entry.yaml_path else None}]


def data_files(cfg: dict[str, Any]) -> list[str]:
    """The local data files a task config reads (datasets' packaged loaders: json, csv, parquet, ...)."""
    if cfg.get("dataset_path") not in LOCAL_LOADERS:
        return []
    files = ((cfg.get("dataset_kwargs") or {}).get("data_files")) or []
    flat: list[str] = []
    for v in files.values() if isinstance(files, dict) else [files]:
        flat.extend(v if isinstance(v, list) else [v])
    return [str(f) for f in flat]


def metric_names(manager: Any, tasks: tuple[str, ...]) -> set[str]:
    """The `harness/<task>/<metric>[/<filter>]` names these tasks report (flat_metrics' keys)."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    out = set()
    for name in tasks:
        entry = manager.task_index.get(name)
        if entry is not None and entry.kind.name == "GROUP":
            for m in (entry.cfg or {}).get("aggregate_metric_list") or []:
                out.add(f"harness/{name}/{m['metric']}")
        for cfg in leaf_configs(manager, name):
            metrics = [m["metric"] for m in cfg.get("metric_list") or [] if isinstance(m.get("metric"), str)]
            metrics = metrics or list(DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type", "generate_until"), []))
            filters = [f["name"] for f in cfg.get("filter_list") or [] if f.get("name")] or ["none"]
            out.update(f"harness/{cfg['task']}/{m}" + ("" if f == "none" else f"/{f}") for m in metrics for f in filters)
    return out


def check(cfg: Any) -> set[str]:
    """A trial's eval.harness checked before anything starts (ConfigError: one line): lm-eval installed, every task
    known (lm-eval's registry or include_path), every local data file present, a text tokenizer beside the data.
    Returns the metric names the tasks report."""
    from ercstudy.trainables.shards import TOKENIZER_FILE

    hc: HarnessConfig = cfg.eval.harness
    if not hc.enabled:
        return set()
    where = "eval.harness.tasks"
    if cfg.data.kind == "parquet" and cfg.data.path and "://" not in cfg.data.path and not (Path(cfg.data.path) / TOKENIZER_FILE).is_file():
        raise ConfigError(where, f"lm-eval tasks need a text tokenizer, and {cfg.data.path} has no {TOKENIZER_FILE} "
                                 "(shards written by `ercstudy prepare-data` carry one)")
    if hc.include_path is not None and "://" not in hc.include_path and not Path(hc.include_path).is_dir():
        raise ConfigError("eval.harness.include_path", f"{hc.include_path}: no such directory of task YAMLs")
    try:
        manager = task_manager(hc.tasks, hc.include_path)
    except HarnessError as err:
        raise ConfigError(where, str(err)) from None
    data_dir = Path(hc.data_dir or ".")
    for name in hc.tasks:
        for task in leaf_configs(manager, name):
            for f in data_files(task):
                path = data_dir / f
                if "://" not in f and not path.is_file():
                    raise ConfigError(where, f"{task['task']}: its data file {path} does not exist (data_files of "
                                             f"{task.get('_yaml_path') or 'the task'}, read from data_dir {data_dir}); "
                                             "write the local copy with the command in that YAML")
    return metric_names(manager, hc.tasks)


# ---------------------------------------------------------------------------------------------
# The model adapter


def model_class():
    """ErcstudyLM, defined once lm_eval is importable (it subclasses lm-eval's TemplateLM)."""
    global _MODEL_CLASS
    if _MODEL_CLASS is not None:
        return _MODEL_CLASS
    TemplateLM = _lm_eval()
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from ercstudy.trainables import checkpoint as ckpt_lib
    from ercstudy.trainables.evals import continuation_logprobs
    from ercstudy.trainables.shards import DataError, end_of_text_id

    class ErcstudyLM(TemplateLM):
        """An ercstudy model as an lm-eval model: loglikelihood, loglikelihood_rolling, greedy generate_until.

        `checkpoint`: a checkpoint directory, or a LoadedCheckpoint (also the live model of a trial)."""

        def __init__(self, checkpoint: str | Path | ckpt_lib.LoadedCheckpoint, config: str | None = None,
                     batch_size: int | str = 16, device: str | torch.device = "cpu", max_gen_toks: int = 64, **_: Any):
            super().__init__()
            loaded = checkpoint if isinstance(checkpoint, ckpt_lib.LoadedCheckpoint) else ckpt_lib.load(checkpoint, config=config, device=device)
            if loaded.tokenizer is None:
                raise HarnessError(f"{loaded.path}: trained on the {loaded.cfg.data.kind} corpus, which has no text tokenizer; "
                                   "lm-eval tasks need a model trained on text shards (ercstudy prepare-data)")
            self.checkpoint, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
            self._device = torch.device(device)
            self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
            self.max_length = loaded.cfg.model.seq_len  # tokens the model attends to
            self.max_gen_toks = int(max_gen_toks)
            try:  # the token that ended every document of the shards, never a silent id 0
                self._eot = end_of_text_id(self.tokenizer, loaded.cfg.data.path)
            except DataError as err:
                raise HarnessError(f"{loaded.path}: {err}") from None

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> ErcstudyLM:
            from lm_eval.utils import simple_parse_args_string

            args = simple_parse_args_string(arg_string)
            args.update({k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size", "device")})
            return cls(**args)

        def get_model_info(self) -> dict[str, Any]:  # lm-eval adds it to results["config"]
            cfg = self.checkpoint.cfg
            return {"checkpoint": str(self.checkpoint.path), "step": self.checkpoint.step, "model_num_parameters": cfg.num_params(),
                    "num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k, "erc_alpha": cfg.erc.alpha if cfg.erc.enabled else None}

        @property
        def eot_token_id(self) -> int:
            return self._eot

        @property
        def tokenizer_name(self) -> str:
            return str(self.checkpoint.path / "tokenizer.json")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return self.tokenizer.encode(string).ids

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
            if not requests:
                return []
            pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
            logprob, greedy = continuation_logprobs(self.model, pairs, seq_len=self.max_length,
                                                    batch_size=self.batch_size, device=self._device)
            out = list(zip(logprob.tolist(), greedy.tolist()))
            for (key, _, _), answer in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owner = [], []
            for i, req in enumerate(requests):
                (text,) = req.args
                for window in get_rolling_token_windows(self.tok_encode(text), prefix_token=self.eot_token_id,
                                                        max_seq_len=self.max_length, context_len=1):
                    windows.append((None, *make_disjoint_window(window)))
                    owner.append(i)
            scores = self._loglikelihood_tokens(windows)
            totals = [0.0] * len(requests)
            for i, (lp, _) in zip(owner, scores):
                totals[i] += lp
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
            return totals

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in requests:
                context, gen_kwargs = req.args
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
                tokens = self.tok_encode(context) or [self.eot_token_id]
                new: list[int] = []
                text = ""
                for _ in range(max_new):
                    window = torch.tensor([(tokens + new)[-self.max_length:]], device=self._device)
                    nxt = int(self.model(window).logits[0, -1].argmax())
                    if nxt == self.eot_token_id:
                        break
                    new.append(nxt)
                    text = self.tokenizer.decode(new)
                    if any(stop in text for stop in until):
                        break
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return out

    register_model("ercstudy")(ErcstudyLM)
    _MODEL_CLASS = ErcstudyLM
    return ErcstudyLM


_MODEL_CLASS = None


def run_tasks(lm: Any, tasks: list[str] | tuple[str, ...], *, include_path: str | None = None, data_dir: str | None = None,
              limit: float | None = None, num_fewshot: int | None = None, seed: int = 0) -> dict[str, Any]:
    """lm-eval's simple_evaluate of an ErcstudyLM on `tasks`; returns its results dict (`results`, `configs`, ...).
    Relative data_files of local task YAMLs are read from `data_dir` (default: the working directory)."""
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include_path)
    with contextlib.chdir(data_dir) if data_dir else contextlib.nullcontext():
        results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, bootstrap_iters=0)
    if results is None:
        raise HarnessError("lm-eval returned no results")
    return results


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """`harness/<task>/<metric>[/<filter>]` -> value, for MLflow (lm-eval keys read `acc,none`)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            metric, filt = key.split(",", 1)
            out[f"harness/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return out


# ---------------------------------------------------------------------------------------------
# In training


class TrialHarness:
    """A trial's eval.harness on its live model, on the trial's devices (see the module docstring)."""

    def __init__(self, cfg: Any, *, rank: int, device: torch.device):
        self.cfg, self.hc, self.device = cfg, cfg.eval.harness, device
        # a forward under expert parallelism is a collective: then every rank runs the same requests
        self.runs_here = rank == 0 or cfg.resources.ep_size > 1
        self._tokenizer: Any = None

    def due(self, step: int) -> bool:
        return self.hc.due(step, self.cfg.steps)

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            from ercstudy.trainables.shards import TOKENIZER_FILE, read_file

            raw = read_file(self.cfg.data.path, TOKENIZER_FILE) if self.cfg.data.kind == "parquet" else None
            if raw is None:
                raise HarnessError(f"no {TOKENIZER_FILE} beside the data ({self.cfg.data.path}): lm-eval tasks need a text tokenizer")
            self._tokenizer = Tokenizer.from_str(raw.decode())
        return self._tokenizer

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """The step's harness metrics (rank 0's reach Tune); {} on ranks that do not run it. Never raises."""
        if not self.runs_here:
            return {}
        import os

        from ercstudy.trainables.checkpoint import LoadedCheckpoint

        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only (as `ercstudy eval`): never wait on the network

        was_training = model.training
        model.eval()
        try:
            live = LoadedCheckpoint(Path(f"step{step}"), self.cfg, model, step, self.tokenizer())
            lm = model_class()(live, batch_size=self.hc.batch_size, device=self.device)
            results = run_tasks(lm, self.hc.tasks, include_path=self.hc.include_path, data_dir=self.hc.data_dir,
                                limit=self.hc.limit, num_fewshot=self.hc.num_fewshot, seed=self.cfg.train.seed)
        except Exception as err:  # the evaluation fails, not the trial: the reason goes to the trial's run
            reason = f"{type(err).__name__}: {err}".strip().splitlines()[0][:500]
            print(f"harness evaluation at step {step} failed: {reason}", file=sys.stderr, flush=True)
            return {FAILED_METRIC: 1.0, reports.HARNESS_ERROR: reason}
        finally:
            model.train(was_training)
        return {**flat_metrics(results), FAILED_METRIC: 0.0, reports.HARNESS_RESULTS: json.dumps(results, default=str)}
