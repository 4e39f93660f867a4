"""Prompt and conversation data: the Example record, streaming readers and a train/val split.

``read_examples(source)`` picks a reader by extension: ``.jsonl``/``.json`` (one JSON object per
line), ``.txt`` (one prompt per non-empty line), ``.parquet`` (the JSON keys as columns, read in
record batches), or ``"default"`` (conversations of the ``chitchat_dataset`` package). A record is
one of (each may add ``"quality"``, a number, and ``"target"``/``"target_context"``, the text a
relevance reward compares generations to; ``"messages"`` wins over ``"prompt"`` over ``"text"``)::

    {"messages": [{"role": "user", "content": "Hello"}, {"content": "Hi there!"}]}
    {"text": "Single response text", "quality": 0.8}
    {"prompt": "Hello", "response": "Hi there!"}

- ``"messages"``: a message without a ``"role"`` (or a null one) answers the one before it,
  ``assistant`` after ``user`` and ``user`` otherwise, so role-less conversations alternate
  user/assistant from user. With two or more messages and an assistant message last, that last
  message is the reference reply and the rest are the prompt; otherwise (one message, or a user
  message last, as with three role-less messages) all of it is prompt and there is no reference.
- ``"prompt"``: a string is a one-message user prompt; a message list is read as above but is all
  prompt. ``"response"`` (or TRL's ``"completion"``, a string or message list whose last content
  counts) is the reference.
- ``"text"``: a one-message user prompt with no reference.

Every problem raises ``DataError`` naming the file and its 1-based line (Parquet: 0-based row).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from distrl.assets import module_dir
from distrl.errors import AssetError, DataError

DEFAULT = "default"
# Prompt sets inside the package, by name: (package, file).
PACKAGED = {
    "arithmetic": ("distrl.data.tasks", "arithmetic.jsonl"),
    "guess": ("distrl.data.tasks", "guess.jsonl"),
    "code": ("distrl.data.tasks", "code.jsonl"),
}
MAX_LINE_BYTES = 1 << 20
SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
PARQUET_BATCH_ROWS = 1024
_PROMPT_KEYS = ("messages", "prompt", "text")
_COLUMNS = (*_PROMPT_KEYS, "response", "completion", "quality", "target", "target_context")


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One prompt, with the reply the data gives to it when it has one.

    Attributes:
        messages: the prompt turns, oldest first; the final assistant reply is not among them.
        reference: that final assistant reply (a label / reference response), or None.
        quality: a human quality score, or None.
        target: the text a relevance reward compares generations to, or None.
        source: where the example came from (``file:line``), for error messages.
    """

    messages: tuple[Message, ...]
    reference: str | None = None
    quality: float | None = None
    target: str | None = None
    source: str = "<memory>"

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The prompt as ``[{"role": ..., "content": ...}, ...]`` for a chat template."""
        return [{"role": m.role, "content": m.content} for m in self.messages]

    @property
    def prompt_text(self) -> str:
        """The prompt as plain text: a lone message's content, else ``Role: content`` lines."""
        if len(self.messages) == 1:
            return self.messages[0].content
        return "\n".join(f"{m.role.capitalize()}: {m.content}" for m in self.messages)


def read_examples(
    source: str, *, limit: int | None = None, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[Example]:
    """Stream the examples of a data file, or of the packaged default set.

    Args:
        source: a ``.jsonl``, ``.json``, ``.txt`` or ``.parquet`` path, ``"default"``, or the
            name of a prompt set in ``PACKAGED`` (``"arithmetic"``).
        limit: stop after this many examples (None: all of them).
        max_line_bytes: longest line accepted, so one runaway line cannot exhaust memory.

    Raises:
        DataError: the file is missing, of an unknown kind, empty, or has a malformed record.
    """
    if source == DEFAULT:
        return itertools.islice(_chitchat_examples(), limit)
    path = packaged_file(source) if source in PACKAGED else Path(source)
    if not path.is_file():
        names = ", ".join(map(repr, [DEFAULT, *PACKAGED]))
        raise DataError(f"{path}: no such file (packaged prompt sets: {names})")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        examples = _read_jsonl(path, max_line_bytes)
    elif suffix == ".txt":
        examples = _read_text(path, max_line_bytes)
    elif suffix == ".parquet":
        examples = _read_parquet(path)
    else:
        raise DataError(
            f"{path}: unknown extension {suffix or '(none)'!r}; supported: "
            f"{', '.join(SUFFIXES)}, or {', '.join(map(repr, [DEFAULT, *PACKAGED]))} for the "
            "packaged prompts"
        )
    return itertools.islice(_require_some(examples, path), limit)


def packaged_file(name: str) -> Path:
    """The file of the packaged prompt set ``name`` (a key of ``PACKAGED``)."""
    package, filename = PACKAGED[name]
    return Path(str(importlib.resources.files(package).joinpath(filename)))


def load_examples(
    source: str, *, limit: int | None = None, max_line_bytes: int = MAX_LINE_BYTES
) -> list[Example]:
    """Read all examples of ``source`` (see ``read_examples``) into a list, which is never empty."""
    examples = list(read_examples(source, limit=limit, max_line_bytes=max_line_bytes))
    if not examples:
        raise DataError(f"{source}: no examples")
    return examples


def split(
    examples: Sequence[Example], *, val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split examples into ``(train, val)`` by a hash of each prompt, keeping the input order.

    An example's side depends only on its prompt text and ``seed``, not on file order, the other
    examples or Python's hash randomization, so equal prompts share a side, except that with
    ``val_fraction > 0`` and at least two examples, each side gets at least one example.

    Args:
        examples: the examples to split.
        val_fraction: the expected share of validation examples, in [0, 1).
        seed: changes which examples land in validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keys = [_split_key(example, seed) for example in examples]
    is_val = [position < val_fraction for position, _ in keys]
    if val_fraction > 0 and len(examples) >= 2:
        if not any(is_val):
            is_val[keys.index(min(keys))] = True
        elif all(is_val):
            is_val[keys.index(max(keys))] = False
    train = [e for e, v in zip(examples, is_val) if not v]
    val = [e for e, v in zip(examples, is_val) if v]
    return train, val


def _split_key(example: Example, seed: int) -> tuple[float, str]:
    """A position in [0, 1) from the prompt, and a tie-break from the whole example."""
    digest = hashlib.sha256(f"{seed}\0{example.prompt_text}".encode()).digest()
    tie = hashlib.sha256(repr((example.messages, example.reference)).encode()).hexdigest()
    return int.from_bytes(digest[:8], "big") / 2**64, tie


def parse_record(record: Any, where: str) -> Example:
    """Turn one decoded JSON line or Parquet row into an Example (see the module docstring)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_shown(record)}")
    reference = None
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
        if len(messages) >= 2 and messages[-1].role == "assistant":
            messages, reference = messages[:-1], messages[-1].content
    elif "prompt" in record:
        prompt = record["prompt"]
        is_text = isinstance(prompt, str)
        messages = (Message("user", prompt),) if is_text else _messages(prompt, where, "prompt")
        reference = _reply(record, where)
    elif "text" in record:
        messages = (Message("user", _string(record, "text", where)),)
    else:
        keys = ", ".join(map(str, record)) or "none"
        raise DataError(f'{where}: no "messages", "prompt" or "text" key (keys: {keys})')
    if not any(m.content.strip() for m in messages):
        raise DataError(f"{where}: the prompt is empty")
    target_key = "target" if record.get("target") is not None else "target_context"
    target = _string(record, target_key, where) if record.get(target_key) is not None else None
    return Example(messages, reference, _quality(record, where), target, where)


def _messages(value: Any, where: str, key: str) -> tuple[Message, ...]:
    if not isinstance(value, list):
        kind = "a list of messages" if key == "messages" else "a string or a list of messages"
        raise DataError(f'{where}: "{key}" must be {kind}, got {_shown(value)}')
    if not value:
        raise DataError(f'{where}: "{key}" is an empty list')
    messages: list[Message] = []
    for i, item in enumerate(value):
        at = f"{where}: {key}[{i}]"
        if not isinstance(item, dict):
            raise DataError(f'{at} must be an object with "content", got {_shown(item)}')
        if "content" not in item:
            raise DataError(f'{at} has no "content"')
        content = _string(item, "content", at)
        role = item.get("role")
        if role is None:
            role = "assistant" if messages and messages[-1].role == "user" else "user"
        elif not isinstance(role, str):
            raise DataError(f'{at}: "role" must be a string, got {_shown(role)}')
        messages.append(Message(role, content))
    return tuple(messages)


def _reply(record: dict, where: str) -> str | None:
    key = "response" if "response" in record else "completion"
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    return _messages(value, where, key)[-1].content


def _string(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string, got {_shown(value)}')
    return value


def _quality(record: dict, where: str) -> float | None:
    value = record.get("quality")
    if value is None:
        return None
    # bool is an int to Python but never a score; NaN and Infinity are valid to json.loads.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f'{where}: "quality" must be a finite number, got {_shown(value)}')
    return float(value)


def _shown(value: Any) -> str:
    """``value`` as short JSON, for error messages."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` for each non-blank line, never holding an oversized line."""
    offset = 0
    with path.open("rb") as f:
        for lineno in itertools.count(1):
            raw = f.readline(max_line_bytes + 1)  # reads at most this much of a longer line
            if not raw:
                return
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise DataError(
                    f"{path}:{lineno}: line is longer than {max_line_bytes} bytes (max_line_bytes)"
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 at byte {e.start} of the line "
                    f"(byte {offset + e.start} of the file)"
                ) from None
            offset += len(raw)
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            if text.strip():
                yield lineno, text


def _read_jsonl(path: Path, max_line_bytes: int) -> Iterator[Example]:
    for lineno, text in _lines(path, max_line_bytes):
        where = f"{path}:{lineno}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: malformed JSON ({e.msg} at column {e.colno}); "
                f"expected one JSON object per line"
            ) from None
        yield parse_record(record, where)


def _read_text(path: Path, max_line_bytes: int) -> Iterator[Example]:
    for lineno, text in _lines(path, max_line_bytes):
        yield Example((Message("user", text.strip()),), source=f"{path}:{lineno}")


def _read_parquet(path: Path) -> Iterator[Example]:
    import pyarrow  # imported here: only Parquet users pay for it
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = parquet.schema_arrow.names
    if not set(_PROMPT_KEYS) & set(names):
        raise DataError(
            f'{path}: no "messages", "prompt" or "text" column '
            f"(columns: {', '.join(names) or 'none'})"
        )
    columns = [c for c in _COLUMNS if c in names]
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        for record in batch.to_pylist():
            present = {k: v for k, v in record.items() if v is not None}  # null cell = no key
            yield parse_record(present, f"{path}, row {row}")
            row += 1


def _require_some(examples: Iterator[Example], path: Path) -> Iterator[Example]:
    empty = True
    for example in examples:
        empty = False
        yield example
    if empty:
        raise DataError(f"{path}: no examples (it is empty or has only blank lines)")


@cache
def _chitchat_examples() -> tuple[Example, ...]:
    """The packaged default prompts, one per chitchat conversation with at least two turns.

    A turn is a run of non-empty messages from one sender, joined by newlines. The prompt is the
    first turn (as the user), or, when that is a bare greeting of at most three words, the first
    two (assistant greeting, then user); the next turn is the reference reply. File order.
    """
    folder = module_dir("chitchat_dataset")
    if folder is None:
        raise AssetError(
            "the default prompt set needs the chitchat-dataset package; "
            "run `pip install chitchat-dataset==0.9.0`"
        )
    with (folder / "dataset.json").open(encoding="utf-8") as f:
        conversations = json.load(f)
    examples = []
    for key, conversation in conversations.items():
        said = [m for turn in conversation["messages"] for m in turn if m["text"].strip()]
        turns = [
            "\n".join(m["text"].strip() for m in run)
            for _, run in itertools.groupby(said, key=lambda m: m["sender"])
        ]
        if len(turns) < 2:
            continue
        n = 2 if len(turns) >= 3 and len(turns[0].split()) <= 3 else 1
        prompt = tuple(Message(role, text) for role, text in zip(("assistant", "user")[-n:], turns))
        examples.append(Example(prompt, turns[n], source=f"{DEFAULT}:{key}"))
    return tuple(examples)
