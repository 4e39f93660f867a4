"""End to end: distrl's GRPO against TRL's ``GRPOTrainer`` on the same work, in the same run.

Both run GRPO on the same model and packaged chat prompts with the same reward (distinct words /
32, a plain Python function): 2 prompts x 4 generations = 8 completions per step of at most 32
new tokens at temperature 0.7, group-normalised advantages, token-mean loss, clip 0.2, one
optimizer step per step at learning rate 1e-6, and no KL term (beta 0, TRL's default), so neither
runs a reference model. TRL keeps its default gradient checkpointing. Seconds per step are the
median over the timed steps after a warm-up step.

distrl runs two ways: ``overlap`` (one rollout worker and the learner in separate processes, one
torch thread each, generating the next batch while the learner trains: ``max_policy_lag`` 1)
and ``alternate`` (generation then learning, each with both threads). TRL is the optional
``bench`` extra (``pip install -e ".[bench]"``); without it the comparison is skipped with a
message. ``--device`` and ``--dtype`` apply to both (on a GPU, distrl's rollout worker and
learner each hold half of it); the work itself stays the fixed one above. ``--engine vllm``
makes distrl's rollout worker generate with vLLM (``rollout.engine vllm``); TRL still generates
with ``generate`` (its vLLM modes need a GPU).
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from typing import Any

from distrl.bench.common import BenchOptions, gpu_share, local_ray, ratio, rounded
from distrl.config import load_config
from distrl.data.examples import load_examples
from distrl.models.loading import select_device, select_dtype
from distrl.outputs.metrics import read_metrics

REWARD = "distrl.bench.pipeline:distinct_words"
COMPLETIONS, GENERATIONS, MAX_NEW_TOKENS, TEMPERATURE, LR = 8, 4, 32, 0.7, 1e-6
TRL_ROWS = ("trl_grpo", "trl_grpo_no_checkpointing")
WORD = re.compile(r"\w+('\w+)*")


def _text(completion: Any) -> str:
    """A completion as text: TRL passes chat completions as lists of messages."""
    if isinstance(completion, list):
        return " ".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def distinct_words(completions: list[Any], **_: Any) -> list[float]:
    """The benchmark reward: distinct lower-cased words / 32, per completion."""
    return [
        len({m.group(0) for m in WORD.finditer(_text(c).lower())}) / MAX_NEW_TOKENS
        for c in completions
    ]


def device_and_dtype(options: BenchOptions) -> dict[str, str]:
    """The device and dtype ``options`` resolve to, as both sides load the model."""
    device = select_device(options.device)
    dtype = select_dtype(options.dtype, device)
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch.")}


def pipeline_overrides(
    options: BenchOptions, steps: int, tmp: str, *, lag: int, threads: int, workers: int = 1
) -> dict[str, Any]:
    """The run config of the benchmark's work: GRPO on ``workers`` rollout workers (the
    completions of a step split between them) at ``max_policy_lag`` ``lag``, for ``steps``
    timed steps after a warm-up one, written under ``tmp``."""
    gpus = gpu_share(options, workers + 1)
    return {
        "model.device": options.device,
        "model.dtype": options.dtype,
        "iterations": steps + 1,
        "rollout.num_workers": workers,
        "algo": "grpo",
        "rollout.engine": options.engine,
        "rollout.batch_size": COMPLETIONS // GENERATIONS // workers,
        "rollout.samples_per_prompt": GENERATIONS,
        "rollout.max_new_tokens": MAX_NEW_TOKENS,
        "rollout.temperature": TEMPERATURE,
        "rollout.max_policy_lag": lag,
        "ppo.epochs": 1,
        "ppo.minibatch_size": COMPLETIONS,
        "ppo.kl_loss_coef": 0.0,  # TRL's default beta 0: no reference model in either
        "learner.lr": LR,
        "reward.components": [{"name": REWARD}],
        "resources.torch_threads": threads,
        "resources.rollout_cpus": 0.0,
        "resources.rollout_gpus": gpus,
        "resources.learner_cpus": 0.0,
        "resources.learner_gpus": gpus,
        "resources.reward_cpus": 0.0,
        "output.dir": f"{tmp}/run",
        "output.eval_every": 0,
        "output.checkpoint_every": steps + 1,
        "output.tensorboard": False,
        "output.plots": False,
        "output.progress": False,
    }


def timed_steps(records: list[dict[str, Any]]) -> list[float]:
    """Seconds of each step after the first (a warm-up), the last one's final checkpoint left
    out (TRL's step timing leaves saving out too)."""
    return [r["time/iteration_s"] - r.get("time/checkpoint_s", 0.0) for r in records[1:]]


def distrl_pipeline(options: BenchOptions, steps: int, overlap: bool) -> dict[str, Any]:
    """Seconds per iteration of ``distrl.loop.driver.train`` (algo grpo) on the benchmark's work."""
    from distrl.loop.driver import train

    threads = 1 if overlap else 2
    with tempfile.TemporaryDirectory() as tmp:
        overrides = pipeline_overrides(options, steps, tmp, lag=int(overlap), threads=threads)
        config = load_config(options.model, overrides)
        records = read_metrics(train(config) / "metrics.jsonl")
    seconds = timed_steps(records)
    per_step = statistics.median(seconds)
    return {
        **device_and_dtype(options),
        "torch_threads": threads,
        "engine": config.rollout.engine,
        "max_policy_lag": config.rollout.max_policy_lag,
        "seconds_per_step": per_step,
        "completions_per_s": COMPLETIONS / per_step,
        "seconds": rounded(seconds),
        "generate_s": statistics.median(r["time/generate_s"] for r in records[1:]),
        "train_s": statistics.median(r["time/train_s"] for r in records[1:]),
    }


def trl_grpo(options: BenchOptions, steps: int, checkpointing: bool = True) -> dict[str, Any]:
    """Seconds per step of TRL's ``GRPOTrainer`` on the benchmark's work, with its default
    gradient checkpointing or (``checkpointing`` False) without it.

    Raises:
        ImportError: TRL is not installed. ValueError: the config's tokenizer is not one TRL
            can use (the tiny configs use tiktoken).
    """
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from distrl.models.policy import build_model, build_tokenizer
    from distrl.models.tokenizers import HFTokenizer

    config = load_config(
        options.model, {"model.device": options.device, "model.dtype": options.dtype}
    )
    tokenizer = build_tokenizer(config.model, config.tokenizer)
    if not isinstance(tokenizer, HFTokenizer):
        raise ImportError(
            f"TRL needs a Hugging Face tokenizer, and config {options.model!r} uses "
            f"{config.tokenizer.name}"
        )
    policy = build_model(config.model, tokenizer, seed=0)
    examples = load_examples("default", limit=4 * (steps + 1))
    data = Dataset.from_dict({"prompt": [e.prompt_messages for e in examples]})
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=COMPLETIONS,
            num_generations=GENERATIONS,
            max_completion_length=MAX_NEW_TOKENS,
            temperature=TEMPERATURE,
            beta=0.0,
            learning_rate=LR,
            max_steps=steps + 1,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=not options.on_gpu,
            bf16=policy.dtype == torch.bfloat16,
            seed=0,
            gradient_checkpointing=checkpointing,
            lr_scheduler_type="constant",  # as distrl's
        )
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=distinct_words,
            args=args,
            train_dataset=data,
            processing_class=tokenizer.tok,
            callbacks=[Clock()],
        )
        start = time.perf_counter()
        trainer.train()
    seconds = [b - a for a, b in zip([start, *marks], marks)][1:]
    per_step = statistics.median(seconds)
    return {
        **device_and_dtype(options),
        "torch_threads": torch.get_num_threads(),
        "gradient_checkpointing": checkpointing,
        "seconds_per_step": per_step,
        "completions_per_s": COMPLETIONS / per_step,
        "seconds": rounded(seconds),
    }


def bench_pipeline(options: BenchOptions) -> dict[str, Any]:
    """distrl's end-to-end GRPO (overlapped and alternating) beside TRL's GRPO."""
    steps = 3 if options.quick else 6
    out: dict[str, Any] = {"completions_per_step": COMPLETIONS, "max_new_tokens": MAX_NEW_TOKENS}
    with local_ray():
        out["distrl_overlap"] = distrl_pipeline(options, steps, overlap=True)
        out["distrl_alternate"] = distrl_pipeline(options, steps, overlap=False)
    for name, checkpointing in (("trl_grpo", True), ("trl_grpo_no_checkpointing", False)):
        try:
            out[name] = trl_grpo(options, steps, checkpointing)
        except (ImportError, ValueError) as err:
            out[name] = None
            hint = " (pip install -e '.[bench]')" if isinstance(err, ImportError) else ""
            out["note"] = f"TRL comparison skipped: {err}{hint}"
    # Against the faster of TRL's two settings.
    trl = [out[n]["completions_per_s"] for n in TRL_ROWS if out[n]]
    reference = max(trl, default=0.0)
    print(f"\npipeline, {COMPLETIONS} completions x <= {MAX_NEW_TOKENS} tokens per step")
    print(f"{'':<34}{'s/step':>10}{'completions/s':>16}{'vs TRL GRPO':>14}")
    for name in ("distrl_overlap", "distrl_alternate", *TRL_ROWS):
        row = out[name]
        if row is None:
            print(f"{name:<34}{'skipped':>10}")
            continue
        row["ratio"] = ratio(row["completions_per_s"], reference) if reference else None
        shown = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(
            f"{name:<34}{row['seconds_per_step']:>10.2f}{row['completions_per_s']:>16.2f}"
            f"{shown:>14}"
        )
    if "note" in out:
        print(out["note"])
    return out
