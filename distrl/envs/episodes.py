"""Multi-turn episodes as token sequences: token in, token out.

An episode is one token sequence: the prompt, then model turns (the exact ids sampled, never
decoded and encoded again) and environment turns (the chat template's text for the new
messages, tokenised once and appended). The learner trains on the model's tokens only:
``Episodes.response_mask`` is 1 on them, ``response_attention`` on every token.

Environment turns come from the chat template incrementally: the text the template adds for
the new messages is the rendering of the whole conversation with them minus its rendering
without them, plus whatever the template writes after the model's end-of-turn token (ChatML's
newline after ``<|im_end|>``). That is right only for a template that appends: one whose
rendering of a conversation starts with its rendering of every earlier part of it. Each
environment turn checks this and a template that rewrites earlier turns (one that drops
earlier reasoning, say) is refused with ``ModelError`` rather than trained on tokens the
model did not see.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from distrl.config import EnvConfig
from distrl.data.examples import Example
from distrl.envs.base import Environment, Step
from distrl.envs.pool import LocalEnvironments, RemoteEnvironments
from distrl.errors import ModelError
from distrl.models.tokenizers import Tokenizer
from distrl.pg.rollout import ARRAY_FIELDS, Trajectories
from distrl.rewards.composite import ScoreResult

if TYPE_CHECKING:
    from distrl.envs.tools import Tool

_MARK = "\x1fdistrl\x1f"  # a content no template writes itself


class Renderer:
    """The chat template, one turn at a time."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        system_prompt: str | None = None,
        tools: list[Tool] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.tools = tools or []
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        base = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}]
        rendered = self.render(base, generation_prompt=False)
        suffix = rendered[rendered.rindex(_MARK) + len(_MARK) :]
        eos = tokenizer.eos_token_id
        eos_text = "" if eos is None else tokenizer.decode([eos], skip_special_tokens=False)
        # The model's turn ends at its EOS; what the template writes after it is ours to add.
        self.after_eos = suffix[len(eos_text) :] if eos_text and suffix.startswith(eos_text) else ""

    def render(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        """The template's text of ``messages`` (the system prompt first, when configured, and
        the tools offered)."""
        if self.tools:
            from distrl.envs.tools import render_with_tools

            return render_with_tools(
                self.tokenizer,
                [*self.system, *messages],
                self.tools,
                generation_prompt=generation_prompt,
            )
        return self.tokenizer.apply_chat_template(
            [*self.system, *messages], add_generation_prompt=generation_prompt
        )

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of an episode's first messages and the cue for the model's reply."""
        return self.tokenizer.encode(self.render(messages, generation_prompt=True))

    def append(self, before: list[dict[str, str]], new: list[dict[str, str]]) -> list[int]:
        """Token ids that follow the model's last turn (the last of ``before``, ended by its
        EOS) for the environment's ``new`` messages and the cue for the next reply.

        Raises:
            ModelError: the template does not append (its rendering of the conversation
                with ``new`` does not start with its rendering without).
        """
        asked = self.render(before[:-1], generation_prompt=True)
        answered = self.render(before, generation_prompt=False)
        extended = self.render([*before, *new], generation_prompt=True)
        for shorter, longer in ((asked, answered), (answered, extended)):
            if not longer.startswith(shorter):
                at = next(i for i, (a, b) in enumerate(zip(shorter, longer)) if a != b)
                raise ModelError(
                    f"the chat template of {self.tokenizer.name} does not append: after "
                    f"{len(before)} messages it rewrites earlier text (character {at}: "
                    f"{shorter[at : at + 40]!r} became {longer[at : at + 40]!r}), so the "
                    "tokens trained on would not be the ones the model saw; multi-turn "
                    "episodes need a template that only appends (set tokenizer.chat_template "
                    "false for distrl's plain format)"
                )
        return self.tokenizer.encode(self.after_eos + extended[len(answered) :])


# What a model turn records per token besides its id: column name -> (trailing shape, dtype).
# The policy's log-probabilities; a DQN worker's Q-values and candidate actions.
Columns = dict[str, tuple[tuple[int, ...], Any]]
LOGPROBS: Columns = {"logprobs": ((), np.float32)}


@dataclass
class Transcript:
    """One episode so far: its token ids after the prompt, which of them the model sampled,
    what the model recorded with them, and the conversation as text with each turn's record."""

    prompt: list[int]
    messages: list[dict[str, str]]
    columns: Columns = field(default_factory=lambda: dict(LOGPROBS))
    tokens: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    chunks: dict[str, list[np.ndarray]] = field(default_factory=dict)
    token_rewards: list[float] = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    truncated: bool = False
    failed: str | None = None
    tool_calls: int = 0
    tool_errors: int = 0

    def add(
        self, ids: list[int], *, sampled: bool, values: dict[str, np.ndarray] | None = None
    ) -> None:
        """Append a turn's ids; the model's come with their ``values`` (one per column, each
        ``(len(ids), *shape)``), an environment's get zeros."""
        self.tokens += ids
        self.sampled += [sampled] * len(ids)
        self.token_rewards += [0.0] * len(ids)
        for name, (shape, dtype) in self.columns.items():
            value = values[name] if values is not None else np.zeros((len(ids), *shape), dtype)
            self.chunks.setdefault(name, []).append(np.asarray(value, dtype)[: len(ids)])

    def column(self, name: str) -> np.ndarray:
        """Column ``name`` over the episode's tokens, ``(len(tokens), *shape)``."""
        shape, dtype = self.columns[name]
        return np.concatenate([np.zeros((0, *shape), dtype), *self.chunks.get(name, [])])

    @property
    def last_reply(self) -> str:
        """The model's last message (what the reward pool scores)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")


@dataclass
class Episodes(Trajectories):
    """Multi-turn trajectories: ``response_*`` columns hold every token after the prompt,
    model and environment turns alike.

    Attributes:
        response_mask: (B, T) float32, 1 on the model's tokens only (what is trained on).
        response_attention: (B, T) int64, 1 on every token of the episode.
        env_rewards: (B,) float64, the episode's summed environment rewards.
        turns: (B,) int64, model turns taken.
        token_rewards: (B, T) float32, each turn's environment reward on the model's last
            token of that turn (they sum to ``env_rewards``).
        transcripts: (B,) the episode's turns as JSON (role, content, reward, info).
        failed: (B,) bool, the environment raised; the sample is not trained on.
        tool_calls, tool_errors: (B,) int64, the episode's tool calls and those that failed
            (a malformed call, an unknown tool, one that raised), from ``Step.info``.
        env_restarts: environment actors replaced while the batch was played (hung or dead).
        texts: (B,) the model's last message.
    """

    response_attention: np.ndarray = field(kw_only=True)
    env_rewards: np.ndarray = field(kw_only=True)
    token_rewards: np.ndarray = field(kw_only=True)
    turns: np.ndarray = field(kw_only=True)
    transcripts: np.ndarray = field(kw_only=True)
    failed: np.ndarray = field(kw_only=True)
    tool_calls: np.ndarray = field(kw_only=True)
    tool_errors: np.ndarray = field(kw_only=True)
    env_restarts: int = field(default=0, kw_only=True)

    reducers: ClassVar[dict[str, Callable[[list], Any]]] = {
        **Trajectories.reducers,
        "env_restarts": sum,
    }

    array_fields: ClassVar[tuple[str, ...]] = (
        *ARRAY_FIELDS,
        "response_attention",
        "env_rewards",
        "token_rewards",
        "turns",
        "transcripts",
        "failed",
        "tool_calls",
        "tool_errors",
    )

    def attention(self) -> np.ndarray:
        """(B, T) int64: every token of the episode, model's and environment's."""
        return self.response_attention


# One model turn for a batch of token sequences: (ids so far per row) -> (new ids per row, up to
# and including EOS; and per column, each row's values for them). A rollout worker's generate.
Generate = Callable[[list[list[int]]], tuple[list[list[int]], dict[str, list[np.ndarray]]]]


def run_episodes(
    *,
    generate: Generate,
    environments: list[Environment] | LocalEnvironments | RemoteEnvironments,
    examples: list[Example],
    seeds: list[int],
    renderer: Renderer,
    eos_id: int | None,
    max_turns: int,
    max_total_tokens: int,
    columns: Columns = LOGPROBS,
) -> list[Transcript]:
    """Play one episode per example, the model's turns batched across episodes and every live
    episode's environment step taken at once.

    Args:
        generate: one model turn for each unfinished episode, from its exact ids so far.
        environments: the episodes' environments (``distrl.envs.pool``; a list: one per
            episode, in this process).
        examples: the data example each episode starts from (``Environment.reset``).
        seeds: each episode's seed, for its ``reset``.
        renderer: the chat template.
        eos_id: the model's end-of-turn token; a turn cut before it ends the episode.
        max_turns: model turns per episode at most.
        max_total_tokens: tokens after the prompt at most (model and environment turns).
        columns: what ``generate`` records per token besides its id.
    """
    if isinstance(environments, list):
        environments = LocalEnvironments(environments)
    episodes = []
    for example, first in zip(examples, environments.reset(examples, seeds)):
        if isinstance(first, BaseException):  # this episode ends before it starts
            messages = example.prompt_messages
            failed = f"reset raised {type(first).__name__}: {first}"
            episode = Transcript(renderer.prompt(messages), messages, columns, done=True)
            episode.failed = failed
            episode.turns.append({"role": "environment", "error": failed})
        else:
            episode = Transcript(renderer.prompt(list(first)), list(first), columns)
        episodes.append(episode)
    tokenizer = renderer.tokenizer
    for turn in range(max_turns):
        live = [i for i, e in enumerate(episodes) if not e.done]
        if not live:
            break
        ids, values = generate([episodes[i].prompt + episodes[i].tokens for i in live])
        answered: list[int] = []
        for k, (i, new) in enumerate(zip(live, ids)):
            e = episodes[i]
            new = new[: max_total_tokens - len(e.tokens)]
            e.add(new, sampled=True, values={name: v[k] for name, v in values.items()})
            ended = bool(new) and new[-1] == eos_id
            text = tokenizer.decode(new[:-1] if ended else new)
            e.messages.append({"role": "assistant", "content": text})
            e.turns.append({"role": "assistant", "content": text, "tokens": len(new)})
            if ended:
                answered.append(i)
            else:  # cut by a length limit: the turn is unfinished, so is the episode
                e.done = e.truncated = True
        texts = [episodes[i].messages[-1]["content"] for i in answered]
        for i, step in zip(answered, environments.step(answered, texts)):
            e = episodes[i]
            try:
                if isinstance(step, BaseException):
                    raise step
                if not isinstance(step, Step):
                    raise TypeError(f"step returned {type(step).__name__}, not a Step")
                reward = float(step.reward)
            except Exception as err:  # the user's code: this episode ends, the run goes on
                e.done, e.failed = True, f"step raised {type(err).__name__}: {err}"
                e.turns[-1]["error"] = e.failed
                continue
            e.reward += reward
            e.token_rewards[-1] += reward  # on the turn's last token
            e.tool_calls += int(step.info.get("tool_calls", 0))
            e.tool_errors += int(step.info.get("tool_errors", 0))
            e.turns[-1].update(reward=reward, **({"info": step.info} if step.info else {}))
            if step.done or turn == max_turns - 1 or not step.messages:
                e.done = True
                continue
            more = renderer.append(e.messages, step.messages)
            if len(e.tokens) + len(more) >= max_total_tokens:  # no room left for a reply
                e.done = e.truncated = True
                continue
            e.add(more, sampled=False)
            e.messages += step.messages
            e.turns += [{"role": m["role"], "content": m["content"]} for m in step.messages]
    return episodes


def to_episodes(
    episodes: list[Transcript],
    example_ids: list[int],
    *,
    pad_id: int,
    version: int,
    seconds: float,
    cls: type[Episodes] = Episodes,
    env_restarts: int = 0,
) -> Episodes:
    """Pad ``episodes`` into a batch of ``cls``: prompts on the left, the rest on the right;
    every recorded column becomes the field of its name."""
    from distrl.models.policy import left_pad

    prompt_ids, prompt_mask = left_pad([e.prompt for e in episodes], pad_id)
    width = max(1, max(len(e.tokens) for e in episodes))
    B = len(episodes)

    def padded(values: list[Any], shape: tuple[int, ...] = (), dtype: Any = np.float32):
        out = np.zeros((B, width, *shape), dtype=dtype)
        for row, value in enumerate(values):
            out[row, : len(value)] = value
        return out

    ids = np.full((B, width), pad_id, dtype=np.int64)
    for row, e in enumerate(episodes):
        ids[row, : len(e.tokens)] = e.tokens
    sampled = padded([e.sampled for e in episodes])
    columns = {
        name: padded([e.column(name) for e in episodes], shape, dtype)
        for name, (shape, dtype) in episodes[0].columns.items()
    }
    logprobs = columns.pop("logprobs", np.zeros((B, width), np.float32))
    return cls(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=ids,
        response_mask=sampled,
        logprobs=logprobs * sampled,
        texts=np.array([e.last_reply for e in episodes], dtype=np.str_),
        example_ids=np.asarray(example_ids, dtype=np.int64),
        version=version,
        seconds=seconds,
        response_attention=padded([[1] * len(e.tokens) for e in episodes], dtype=np.int64),
        env_rewards=np.array([e.reward for e in episodes], dtype=np.float64),
        token_rewards=padded([e.token_rewards for e in episodes]),
        turns=np.array([sum(t["role"] == "assistant" for t in e.turns) for e in episodes]),
        transcripts=np.array([json.dumps(e.turns) for e in episodes], dtype=np.str_),
        failed=np.array([e.failed is not None for e in episodes], dtype=bool),
        tool_calls=np.array([e.tool_calls for e in episodes], dtype=np.int64),
        tool_errors=np.array([e.tool_errors for e in episodes], dtype=np.int64),
        env_restarts=env_restarts,
        **columns,
    )


def play(
    worker: Any,
    examples: list[Example],
    example_ids: list[int],
    *,
    turn: Generate,
    columns: Columns = LOGPROBS,
    cls: type[Episodes] = Episodes,
) -> Episodes:
    """A rollout worker's batch of episodes, one per example, each with a fresh environment of
    the worker's ``env`` config, seeded from the worker's seed and its episode count.

    Args:
        worker: a policy-gradient or DQN rollout worker (``env``, ``seed``, ``tokenizer``,
            ``system_prompt``, ``version``, ``episodes_started``).
        turn: one model turn, the worker's own generation (``Generate``).
        columns, cls: what ``turn`` records per token, and the batch class that holds it.
    """
    from distrl.envs.base import load_environment

    start = time.perf_counter()
    env = worker.env
    if env is None or not env.name:
        raise ValueError("episodes need an env config with a name")
    first = worker.seed * 1_000_003 + worker.episodes_started
    worker.episodes_started += len(examples)
    if env.num_actors:
        environments = RemoteEnvironments(env_hosts(worker), make_host(env), env.step_timeout_s)
    else:
        cls_env = load_environment(env.name, env.options)
        environments = LocalEnvironments([cls_env(**env.options) for _ in examples])
    episodes = run_episodes(
        generate=turn,
        environments=environments,
        examples=examples,
        seeds=[first + i for i in range(len(examples))],
        renderer=Renderer(worker.tokenizer, worker.system_prompt, environments.tools()),
        eos_id=worker.tokenizer.eos_token_id,
        max_turns=env.max_turns,
        max_total_tokens=env.max_total_tokens,
        columns=columns,
    )
    return to_episodes(
        episodes,
        example_ids,
        pad_id=worker.tokenizer.pad_token_id,
        version=worker.version,
        seconds=time.perf_counter() - start,
        cls=cls,
        env_restarts=environments.restarts,
    )


def make_host(env: EnvConfig) -> Callable[[], Any]:
    """What starts one environment actor of ``env``'s pool."""
    from distrl.envs.pool import START_TIMEOUT_S, EnvHost
    from distrl.runtime import actors

    options = actors.actor_options(env.cpus_per_actor, **actors.STATEFUL)

    def start() -> Any:
        host = actors.make_actor(EnvHost, options, env.name, env.options)
        actors.get(host.ready.remote(), timeout=START_TIMEOUT_S)
        return host

    return start


def env_hosts(worker: Any) -> list[Any]:
    """The worker's pool of environment actors, started on first use and kept."""
    if getattr(worker, "env_pool", None) is None:
        start = make_host(worker.env)
        worker.env_pool = [start() for _ in range(worker.env.num_actors)]
    return worker.env_pool


def with_episode_rewards(scores: ScoreResult, batch: Trajectories) -> ScoreResult:
    """``scores`` of a batch of multi-turn episodes with their environments' rewards added
    (component ``env``) and the episodes whose environment raised dropped; of any other
    batch, ``scores`` as they are."""
    if not isinstance(batch, Episodes):
        return scores
    failed = batch.failed | scores.dropped
    total = np.where(failed, np.nan, scores.total + batch.env_rewards)
    components = {**scores.components, "env": batch.env_rewards.astype(np.float64)}
    errors = [
        f"sample {i}: its environment's {json.loads(str(batch.transcripts[i]))[-1]['error']}"
        for i in np.flatnonzero(batch.failed)
    ]
    return dataclasses.replace(
        scores, total=total, components=components, dropped=failed, errors=scores.errors + errors
    )
