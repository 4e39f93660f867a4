"""``python -m distrl.chat``: talk to a checkpoint, or answer a file of prompts in one go.

Interactive (reads standard input line by line, so it can be piped; history on by default):
    python -m distrl.chat                       # the packaged SmolLM2-135M-Instruct
    python -m distrl.chat --checkpoint runs/ppo-20261126-101500/final --temperature 0
    python -m distrl.chat --env calculator      # offer an environment's tools (or --tool F)
Batch (one JSONL line per prompt; reward components when --reward names a config):
    python -m distrl.chat --checkpoint DIR --prompts prompts.jsonl --output out.jsonl --reward tiny
Python:
    ChatInterface("runs/.../final").generate_response("Hello, how are you?")
    generate_text("Once upon a time", model, tokenizer, 40)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from distrl.config import ModelConfig, RewardConfig, TokenizerConfig, cli, load_config
from distrl.data.examples import Example, load_examples
from distrl.dqn.learner import is_dqn_checkpoint, load_q_policy
from distrl.dqn.policy import QPolicy
from distrl.envs.base import load_environment
from distrl.envs.tools import (
    Tool,
    load_tool,
    parse_tool_calls,
    render_with_tools,
    run_tool_calls,
    tool_messages,
)
from distrl.errors import ConfigError, DataError, DistrlError, ModelError
from distrl.models.policy import build_model, build_tokenizer, left_pad
from distrl.models.tokenizers import TIKTOKEN_ENCODINGS, HFTokenizer, Tokenizer, load_tokenizer

Model = PreTrainedModel | QPolicy  # a language model, or Q-guided decoding (DQN checkpoints)
PLAIN_STOP = "\nUser:"  # without a chat template, the next "User:" line ends a reply
ROLES = ("system", "user", "assistant", "tool")
MAX_TOOL_ROUNDS = 4  # tool calls answered per message, at most; then the last reply stands
TEST_SAMPLE = "Hello, world! Tokenisation of naïve café text costs 1234 tokens 🚀"
COMMANDS = """commands:
  quit | exit | bye   end the chat (so does the end of the input)
  clear               forget the conversation history
  save FILE           write the history as JSON
  load FILE           read a history: a JSON list of {role, content} or {"messages": [...]}
  test [TEXT]         tokens, ids and round trip of TEXT (default: a sample) under the
                      model's tokenizer and tiktoken's cl100k_base, o200k_base and gpt2
  help                show this
anything else is a message to the model"""


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """How replies are decoded."""

    max_new_tokens: int = 100  # longest reply, in tokens
    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 1.0  # nucleus sampling probability mass (1 = off)
    seed: int | None = None  # torch seed set before generating (None: leave the RNG alone)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"need max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1; got "
                f"{self.max_new_tokens}, {self.temperature} and {self.top_p}"
            )

    def shifted(self, k: int) -> GenerationOptions:
        """These options with seed ``seed + k``, so successive calls differ yet repeat."""
        return self if self.seed is None else dataclasses.replace(self, seed=self.seed + k)


def load_model(path: str | None = None) -> tuple[Model, Tokenizer]:
    """The model and tokenizer of a distrl checkpoint or Hugging Face folder; a DQN
    checkpoint gives its ``QPolicy`` (Q-guided decoding) in place of a language model.

    Args:
        path: a folder, or None / "default" for the packaged SmolLM2-135M-Instruct.

    Raises:
        ModelError: the folder is missing or holds no model.
    """
    name = "default" if path in (None, "default") else str(path)
    if name != "default" and is_dqn_checkpoint(Path(name)):
        return load_q_policy(name)  # Q-guided decoding over the reference LM's candidates
    spec = "auto" if name == "default" else checkpoint_tokenizer(Path(name))
    model_config = ModelConfig(name=name)
    tokenizer = build_tokenizer(model_config, TokenizerConfig(name=spec))
    return build_model(model_config, tokenizer, seed=0), tokenizer


def checkpoint_tokenizer(folder: Path) -> str:
    """The tokenizer spec of a model folder: a distrl checkpoint's ``distrl_tokenizer.json``
    (e.g. tiktoken, which the Hugging Face files cannot record), else "auto" (the folder's)."""
    if not folder.is_dir():
        raise ModelError(f"checkpoint {folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"checkpoint {folder} is not a model folder (no config.json); expected a distrl "
            "checkpoint (e.g. runs/<run>/final) or a Hugging Face model folder"
        )
    spec_file = folder / "distrl_tokenizer.json"
    if not spec_file.is_file():
        return "auto"
    try:
        return json.loads(spec_file.read_text())["spec"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{spec_file}: unreadable ({e})") from None


class TokenStreamer(BaseStreamer, StoppingCriteria):
    """Writes a reply (batch of one) to ``out`` as ``generate`` makes it, with any ``Tokenizer``.

    Each step re-decodes the reply and writes only the new text, holding it back while it ends
    in a partial UTF-8 character (U+FFFD) or in what may be the start of ``stop``. Passed as a
    stopping criterion too, it ends generation once ``stop`` appears.
    """

    def __init__(self, tokenizer: Tokenizer, out: TextIO, stop: str | None = None) -> None:
        self.tokenizer, self.out, self.stop = tokenizer, out, stop or ""
        self.ids: list[int] = []
        self.shown, self.prompt_seen, self.stopped = 0, False, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:  # generate passes the prompt first
            self.ids += value.reshape(-1).tolist()
            self._write(final=False)
        self.prompt_seen = True

    def end(self) -> None:
        self._write(final=True)
        self.out.write("\n")
        self.out.flush()

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.stopped, device=input_ids.device)

    def _write(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids)
        if self.stop and self.stop in text:
            text, self.stopped = text[: text.index(self.stop)], True
        elif not final:
            text = text.rstrip("\ufffd")
            stop = self.stop  # hold back its longest prefix that ends the text
            held = next((k for k in range(len(stop), 0, -1) if text.endswith(stop[:k])), 0)
            text = text[: len(text) - held]
        text = text.lstrip()
        if len(text) > self.shown:
            self.out.write(text[self.shown :])
            self.out.flush()
            self.shown = len(text)


@torch.no_grad()
def generate_ids(
    model: Model,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    *,
    stop: str | None = None,
    streamer: TokenStreamer | None = None,
) -> list[str]:
    """Continuations of token-id prompts, generated as one left-padded batch.

    Each is cut at its first EOS and at ``stop``. A prompt longer than the model's context
    minus ``max_new_tokens`` keeps its last tokens.
    """
    if not all(prompts):
        raise DataError("cannot generate from an empty prompt")
    lm = model.reference if isinstance(model, QPolicy) else model
    keep = getattr(lm.config, "max_position_embeddings", 0) - options.max_new_tokens
    prompts = [list(p)[-keep:] for p in prompts] if keep > 0 else prompts
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    if isinstance(model, QPolicy):
        rows = q_generate(model, ids, mask, options, streamer)
        return [_cut(row, tokenizer, stop) for row in rows]
    device = next(model.parameters()).device
    greedy = options.temperature == 0
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else options.temperature,
        top_p=None if greedy else options.top_p,
        top_k=None if greedy else 0,
        max_new_tokens=options.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if options.seed is not None:
        torch.manual_seed(options.seed)
    out = model.generate(
        input_ids=torch.from_numpy(ids).to(device),
        attention_mask=torch.from_numpy(mask).to(device),
        generation_config=config,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([streamer] if streamer else []),
    )
    return [_cut(row, tokenizer, stop) for row in out[:, ids.shape[1] :].tolist()]


def _cut(row: list[int], tokenizer: Tokenizer, stop: str | None) -> str:
    """A reply's text, cut at its first EOS and at ``stop``."""
    if tokenizer.eos_token_id in row:
        row = row[: row.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(row)
    return text[: text.index(stop)] if stop and stop in text else text


def q_generate(
    policy: QPolicy,
    ids: np.ndarray,
    mask: np.ndarray,
    options: GenerationOptions,
    streamer: TokenStreamer | None = None,
) -> list[list[int]]:
    """Q-guided replies (token lists, padding removed): greedy over Q at temperature 0, else
    Boltzmann over Q at that temperature, always within the reference LM's candidates."""
    generator = torch.Generator()
    generator.manual_seed(options.seed if options.seed is not None else torch.seed())
    out = policy.decode(
        ids,
        mask,
        options.max_new_tokens,
        explore="greedy" if options.temperature == 0 else "boltzmann",
        temperature=options.temperature or 1.0,
        generator=generator,
    )
    rows = [r[: int(m.sum())].tolist() for r, m in zip(out.response_ids, out.response_mask)]
    if streamer is not None:  # Q decoding is not incremental here: show the reply at once
        streamer.put(torch.from_numpy(ids))
        streamer.put(torch.tensor(rows[0]))
        streamer.end()
    return rows


def generate_text(
    prompt: str,
    model: PreTrainedModel,
    tokenizer: Tokenizer | PreTrainedTokenizerBase,
    length: int = 50,
    **options: Any,
) -> str:
    """Continue ``prompt`` by up to ``length`` new tokens.

    The prompt is used as written, without a chat template; only the continuation is returned.
    ``tokenizer`` is a distrl ``Tokenizer`` or a Hugging Face one; ``options`` are
    ``temperature``, ``top_p`` and ``seed`` (see ``GenerationOptions``).
    """
    tok = HFTokenizer(tokenizer) if isinstance(tokenizer, PreTrainedTokenizerBase) else tokenizer
    opts = GenerationOptions(max_new_tokens=length, **options)
    return generate_ids(model, tok, [tok.encode(prompt, add_special_tokens=True)], opts)[0]


def read_history(path: str | Path) -> list[dict[str, str]]:
    """The messages of a history file: a JSON list of {role, content} or {"messages": [...]}.

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    where = f"history file {path}"
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{where}: cannot read it ({e.strerror})") from None
    except ValueError as e:  # not UTF-8, or not JSON
        raise DataError(f"{where}: not valid JSON ({e})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise DataError(
            f'{where}: expected a list of {{"role", "content"}} messages or an object whose '
            f'"messages" is one, got {json.dumps(data)[:40]}'
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f'{where}: message {i} is not an object with a string "content"')
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} has role {m.get('role')!r}, not one of {ROLES}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class ChatInterface:
    """A conversation with a model.

    Args:
        path: a distrl checkpoint or Hugging Face folder; None or "default" is the packaged
            SmolLM2-135M-Instruct.
        use_history: show the model the earlier turns (they are kept for ``save`` either way).
        system: a system message put before every prompt.
        model, tokenizer: an already loaded pair, used instead of loading ``path``.
        tools: tools offered to the model (``distrl.envs.tools``): its calls are run and their
            results shown to it, up to ``MAX_TOOL_ROUNDS`` times a message.
        **options: ``max_new_tokens``, ``temperature``, ``top_p``, ``seed`` (GenerationOptions).
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        use_history: bool = True,
        system: str | None = None,
        model: Model | None = None,
        tokenizer: Tokenizer | None = None,
        tools: Sequence[Tool] = (),
        **options: Any,
    ) -> None:
        self.options = GenerationOptions(**options)
        self.tools = {t.name: t for t in tools}
        if model is None or tokenizer is None:
            model, tokenizer = load_model(path)
        self.model, self.tokenizer, self.name = model, tokenizer, str(path or "default")
        self.use_history, self.system = use_history, system
        self.messages: list[dict[str, str]] = []
        self.calls = 0
        self.stop = None if tokenizer.has_chat_template else PLAIN_STOP

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for ``messages``: the system message first, through the template."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        if self.tools:
            return render_with_tools(self.tokenizer, [*system, *messages], [*self.tools.values()])
        return self.tokenizer.apply_chat_template([*system, *messages])

    def generate_response(self, text: str, stream: TextIO | None = None) -> str:
        """Reply to ``text`` (written to ``stream`` as it is generated, if given); the message
        and the reply join the history. A reply that calls tools gets their results (shown on
        ``stream`` as ``tool NAME>`` lines) and the model replies again."""
        turn = {"role": "user", "content": text}
        context = [*self.messages, turn] if self.use_history else [turn]
        added = [turn]
        for rounds in range(MAX_TOOL_ROUNDS + 1):
            if rounds and stream:
                stream.write("assistant> ")
            reply = self.reply(context, stream)
            added.append({"role": "assistant", "content": reply})
            calls = parse_tool_calls(reply) if self.tools and rounds < MAX_TOOL_ROUNDS else []
            results = tool_messages(run_tool_calls(calls, self.tools))
            for message in results if stream else []:
                stream.write(f"tool {message['name']}> {message['content']}\n")
            added += results
            context = [*context, *added[-1 - len(results) :]]
            if not results:
                break
        self.messages += added
        return reply

    def reply(self, messages: list[dict[str, str]], stream: TextIO | None = None) -> str:
        """The model's next message after ``messages``, streamed to ``stream`` if given."""
        ids = [self.tokenizer.encode(self.prompt(messages))]
        streamer = TokenStreamer(self.tokenizer, stream, self.stop) if stream else None
        options, self.calls = self.options.shifted(self.calls), self.calls + 1
        texts = generate_ids(
            self.model, self.tokenizer, ids, options, stop=self.stop, streamer=streamer
        )
        return texts[0].strip()

    def respond_all(self, examples: Sequence[Example], batch_size: int = 8) -> list[str]:
        """Replies to each example's prompt (no history), batched, with a progress bar."""
        from tqdm import tqdm

        replies: list[str] = []
        with tqdm(total=len(examples), desc="generating", unit="prompt", file=sys.stderr) as bar:
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                ids = [self.tokenizer.encode(self.prompt(e.prompt_messages)) for e in chunk]
                options = self.options.shifted(start)
                texts = generate_ids(self.model, self.tokenizer, ids, options, stop=self.stop)
                replies += [t.strip() for t in texts]
                bar.update(len(chunk))
        return replies

    def clear(self) -> None:
        """Forget the conversation history."""
        self.messages = []

    def save(self, path: str | Path) -> None:
        """Write the history as JSON ``{"messages": [{"role", "content"}, ...]}``."""
        try:
            text = json.dumps({"messages": self.messages}, indent=2, ensure_ascii=False)
            Path(path).expanduser().write_text(text + "\n", encoding="utf-8")
        except OSError as e:
            raise DataError(f"history file {path}: cannot write it ({e.strerror})") from None

    def load(self, path: str | Path) -> None:
        """Replace the history with the one in ``path`` (see ``read_history``)."""
        self.messages = read_history(path)


def tokenization_report(text: str, tokenizer: Tokenizer) -> str:
    """Tokens, ids and a round-trip check of ``text`` under ``tokenizer`` and tiktoken's."""
    lines = [f"text: {text!r}"]
    others = [load_tokenizer(f"tiktoken:{name}") for name in TIKTOKEN_ENCODINGS]
    for label, tok in [(f"model ({tokenizer.name})", tokenizer), *((t.name, t) for t in others)]:
        ids = tok.encode(text)
        back = tok.decode(ids, skip_special_tokens=False)
        check = "round trip ok" if back == text else f"round trip differs: {back!r}"
        count = f"{len(ids)} token" + ("" if len(ids) == 1 else "s")
        lines += [f"{label}: {count}, {check}", f"  tokens: {tok.tokens(text)}"]
        lines.append(f"  ids:    {ids}")
    return "\n".join(lines)


def run_command(chat: ChatInterface, line: str) -> str | None:
    """The output of a chat command, or None if ``line`` is a message for the model."""
    word, _, arg = line.partition(" ")
    word, arg = word.lower(), arg.strip()
    if word == "help" and not arg:
        return COMMANDS
    if word == "clear" and not arg:
        chat.clear()
        return "history cleared"
    if word in ("save", "load") and not arg:
        return f"usage: {word} FILE"
    if word in ("save", "load") and " " not in arg:  # "save the whales" is a message
        getattr(chat, word)(arg)
        done = "saved" if word == "save" else "loaded"
        count = f"{len(chat.messages)} message" + ("" if len(chat.messages) == 1 else "s")
        return f"{done} {count} {'to' if word == 'save' else 'from'} {arg}"
    if word == "test":
        return tokenization_report(arg or TEST_SAMPLE, chat.tokenizer)
    return None


def interact(chat: ChatInterface, inp: TextIO, out: TextIO) -> None:
    """Chat over the lines of ``inp`` until ``quit``/``exit``/``bye`` or the end of the input."""
    echo = not inp.isatty()  # piped input is shown, so the output reads as a transcript
    out.write(f"distrl chat: {chat.name} ({chat.tokenizer.name}). Type 'help' for commands.\n")
    while True:
        out.write("you> ")
        out.flush()
        line = inp.readline()
        text = line.strip()
        out.write(text + "\n" if echo or not line else "")
        if not line or text.lower() in ("quit", "exit", "bye"):
            return
        try:
            if text and (reply := run_command(chat, text)) is not None:
                out.write(reply + "\n")
            elif text:
                out.write("assistant> ")
                chat.generate_response(text, stream=out)
        except DistrlError as e:
            out.write(f"error: {e}\n")


def write_responses(
    output: Path, examples: Sequence[Example], replies: list[str], reward: RewardConfig | None
) -> None:
    """One JSONL line per prompt: prompt, response and, with ``reward``, its components."""
    rows = [{"prompt": e.prompt_text, "response": r} for e, r in zip(examples, replies)]
    if reward is not None:
        from distrl.rewards import RewardBatch, RewardScorer

        scores = RewardScorer(reward).score(RewardBatch.from_examples(examples, replies))
        values = {"total": scores.total, **scores.components}
        for i, row in enumerate(rows):  # NaN (a failed component) is not JSON: null
            row["reward"] = {k: float(v[i]) if v[i] == v[i] else None for k, v in values.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, then chat over standard input or answer ``--prompts``."""
    p = argparse.ArgumentParser(
        prog="python -m distrl.chat",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--checkpoint", metavar="DIR", help="checkpoint or HF folder (default: packaged SmolLM2)")
    add("--no-history", action="store_true", help="answer each message on its own")
    add("--system", metavar="TEXT", help="system message put before every prompt")
    add("--max-new-tokens", metavar="N", type=int, default=100, help="longest reply (default 100)")
    add("--temperature", metavar="T", type=float, default=0.7, help="0 = greedy (default 0.7)")
    add("--top-p", metavar="P", type=float, default=1.0, help="nucleus mass (default 1 = off)")
    add("--seed", metavar="N", type=int, default=None, help="sampling seed (default: unseeded)")
    add("--tool", metavar="SPEC", action="append", default=[], help="offer pkg.module:function")
    add("--env", metavar="NAME", help="offer this environment's tools (calculator, code, ...)")
    add = p.add_argument_group("batch mode").add_argument
    add("--prompts", metavar="FILE", help="prompts: .jsonl, .txt or .parquet")
    add("--output", metavar="FILE", type=Path, help="JSONL file of responses")
    add("--reward", metavar="CONFIG", help="score with this config's reward")
    add("--batch-size", metavar="N", type=int, default=8, help="prompts per generate call")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if bool(args.prompts) != bool(args.output) or (args.reward and not args.prompts):
        raise ConfigError("--prompts and --output go together (and --reward needs them)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    # Bad options and files fail here, before the model loads.
    options = GenerationOptions(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    examples = load_examples(args.prompts) if args.prompts else []
    reward = load_config(args.reward).reward if args.reward else None
    tools = [load_tool(spec) for spec in args.tool]
    if args.env:
        tools += load_environment(args.env)().tools()
    chat = ChatInterface(
        args.checkpoint,
        use_history=not args.no_history,
        system=args.system,
        tools=tools,
        **dataclasses.asdict(options),
    )
    if not args.prompts:
        interact(chat, sys.stdin, sys.stdout)
        return 0
    write_responses(args.output, examples, chat.respond_all(examples, args.batch_size), reward)
    print(f"wrote {len(examples)} responses to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
