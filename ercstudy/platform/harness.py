"""lm-evaluation-harness on ercstudy checkpoints (the optional extra `evals`: pip install 'ercstudy[evals]').

`ErcstudyLM` is an lm-eval model (registered as `ercstudy`): lm-eval's TemplateLM tokenizes
(context, continuation) pairs the way it does for Hugging Face models, and the scoring is
evals.continuation_logprobs, the batched scorer the in-training evaluations use. Rolling
log-likelihoods cut a document into lm-eval's disjoint windows of the model's context.

`run_harness` evaluates tasks by name; tasks from local files (an lm-eval task YAML whose
`dataset_path: json` points at a local JSON/JSONL file) are found through `include_path`,
so nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ercstudy.trainables import checkpoint as ckpt_lib
from ercstudy.trainables.evals import continuation_logprobs
from ercstudy.trainables.shards import EOD_TOKEN

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'ercstudy[evals]'"


class HarnessError(RuntimeError):
    """The evaluation cannot run as asked: one line that says why."""


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise HarnessError(INSTALL_HINT) from None
    return TemplateLM


def model_class():
    """ErcstudyLM, defined once lm_eval is importable (it subclasses lm-eval's TemplateLM)."""
    global _MODEL_CLASS
    if _MODEL_CLASS is not None:
        return _MODEL_CLASS
    TemplateLM = _lm_eval()
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class ErcstudyLM(TemplateLM):
        """An ercstudy checkpoint as an lm-eval model: loglikelihood, loglikelihood_rolling, greedy generate_until."""

        def __init__(self, checkpoint: str | Path | ckpt_lib.LoadedCheckpoint, config: str | None = None,
                     batch_size: int | str = 16, device: str = "cpu", max_gen_toks: int = 64, **_: Any):
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
            eot = self.tokenizer.token_to_id(EOD_TOKEN)
            self._eot = eot if eot is not None else 0

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


def run_harness(checkpoint: str | Path, tasks: list[str], *, include_path: str | None = None, config: str | None = None,
                limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 16, device: str = "cpu",
                seed: int = 0) -> dict[str, Any]:
    """lm-eval's simple_evaluate on a checkpoint; returns its results dict (`results`, `configs`, ...)."""
    cls = model_class()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = cls(checkpoint, config=config, batch_size=batch_size, device=device)  # a bad checkpoint fails first, in a second
    # indexing lm-eval's thousands of built-in task YAMLs costs a minute or more of CPU: local tasks first
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        print("indexing lm-eval's built-in tasks (a minute or more)", file=sys.stderr, flush=True)
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (local task YAMLs: {include_path})" if include_path else " (pass --include-path DIR for local task YAMLs)"
        raise HarnessError(f"unknown lm-eval task(s): {', '.join(unknown)}{where}")
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
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


def log_to_mlflow(results: dict[str, Any], run_id: str, *, uri: str | None = None) -> str:
    """The metrics (at the checkpoint's step) and the whole results JSON as artifacts of an existing run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from . import tracking

    uri = tracking.resolve_uri(uri)
    client = MlflowClient(uri)
    client.get_run(run_id)  # an unknown run fails here, before anything is written
    step = int(results.get("config", {}).get("step", 0))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in flat_metrics(results).items()])
    client.log_text(run_id, json.dumps(results, indent=2, default=str), f"harness/results_step{step}.json")
    return uri
