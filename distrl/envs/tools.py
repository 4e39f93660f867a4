"""Tool calling for multi-turn episodes: tools are Python functions named by import path.

    tools = {t.name: t for t in map(load_tool, ["my_pkg.tools:add"])}
    prompt = render_with_tools(tokenizer, messages, list(tools.values()))
    ...the model writes <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>
    results = run_tool_calls(parse_tool_calls(reply), tools)
    messages += [{"role": "assistant", "content": reply}, *tool_messages(results)]

A tool's JSON schema comes from its type hints and Google-style docstring (``Args:``), as
``transformers.utils.get_json_schema`` reads them. Calls are parsed in the Hermes/Qwen format,
``<tool_call>`` tags around one JSON object ``{"name", "arguments"}`` or a JSON list of them. The
packaged SmolLM2-135M's chat template has no tools section, so ``render_with_tools`` describes the
tools and this format in a system message for it. Nothing the model writes and nothing a tool
raises escapes as an exception: a malformed call or a failed tool becomes an error message the
model reads next turn.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers.utils import DocstringParsingException, TypeHintParsingException, get_json_schema

from distrl.envs.base import Environment, Step
from distrl.errors import ConfigError

if TYPE_CHECKING:  # importing the tokenizers takes seconds; loading tools does not need them
    from distrl.models.tokenizers import Tokenizer

# A call's body runs to its closing tag or, when generation stopped at "</tool_call>" (a common
# stop string), to the end of the text.
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Tool:
    """A function the model may call.

    Attributes:
        name: the name the model calls it by (the function's ``__name__``).
        function: the Python callable, called with the call's arguments as keywords.
        schema: the OpenAI / Hugging Face function-calling dict, ``{"type": "function",
            "function": {"name", "description", "parameters": {"type": "object",
            "properties", "required"}}}``.
    """

    name: str
    function: Callable[..., Any]
    schema: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call the model wrote: a tool name and its keyword arguments."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCallError:
    """A call the model wrote that cannot be run; ``message`` is one line saying why, and
    ``name`` the tool it named, if any."""

    message: str
    name: str = ""


@dataclass(frozen=True)
class ToolResult:
    """What a call returned (``json.dumps`` of it unless a str), or an error message."""

    name: str
    content: str
    error: bool = False


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def tool_from_function(function: Callable[..., Any]) -> Tool:
    """Wrap ``function`` as a Tool, its schema read from its type hints and docstring.

    Raises:
        ConfigError: the function has no docstring, or an argument lacks a type hint or a
            description under ``Args:``.
    """
    return _tool(function, repr(getattr(function, "__name__", function)))


def load_tool(spec: str) -> Tool:
    """Import the tool ``spec`` names, ``"pkg.module:function"``, and build its schema.

    Raises:
        ConfigError: one line naming ``spec`` and what is wrong: not of the form
            ``pkg.module:function``, the module cannot be imported, it has no such attribute,
            the attribute is not callable, or its schema cannot be built.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ConfigError(f"tool {spec!r}: a tool is named 'pkg.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"tool {spec!r}: cannot import module {module_name!r}: {_one_line(err)}"
        ) from err
    if not hasattr(module, attr):
        raise ConfigError(f"tool {spec!r}: module {module_name!r} has no attribute {attr!r}")
    function = getattr(module, attr)
    if not callable(function):
        raise ConfigError(f"tool {spec!r}: {attr!r} is a {type(function).__name__}, not callable")
    return _tool(function, repr(spec))


def _tool(function: Callable[..., Any], label: str) -> Tool:
    try:
        schema = get_json_schema(function)
    except (DocstringParsingException, TypeHintParsingException, TypeError, ValueError) as err:
        # TypeError/ValueError: inspect finds no signature or hints (some builtins, C functions).
        raise ConfigError(f"tool {label}: cannot build its JSON schema: {_one_line(err)}") from err
    return Tool(name=schema["function"]["name"], function=function, schema=schema)


def parse_tool_calls(text: str) -> list[ToolCall | ToolCallError]:
    """Return the calls in the model's ``text``, in order; ``[]`` if it makes none.

    Each ``<tool_call>...</tool_call>`` holds a JSON object ``{"name": str, "arguments":
    object}`` (``arguments`` may be left out for a tool without any) or a JSON list of such
    objects. A last tag left unclosed runs to the end of the text. A malformed call (invalid
    JSON, no name, arguments not an object) yields a ``ToolCallError``; this never raises.
    """
    calls: list[ToolCall | ToolCallError] = []
    for match in _CALL.finditer(text):
        body = match.group(1).strip()
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError as err:
            calls.append(ToolCallError(f"tool call is not valid JSON ({err}): {body[:80]!r}"))
            continue
        if isinstance(parsed, list):
            if not parsed:
                calls.append(ToolCallError("tool call is an empty list"))
            calls.extend(_call(item) for item in parsed)
        else:
            calls.append(_call(parsed))
    return calls


def _call(obj: Any) -> ToolCall | ToolCallError:
    """Check one parsed call object."""
    if not isinstance(obj, dict):
        return ToolCallError(f"tool call must be a JSON object, not {json.dumps(obj)[:80]}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError(f'tool call has no "name" string: {json.dumps(obj)[:80]}')
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return ToolCallError(
            f'tool call to {name!r}: "arguments" must be a JSON object, not '
            f"{json.dumps(arguments)[:80]}",
            name=name,
        )
    return ToolCall(name, arguments)


def run_tool_calls(
    calls: Iterable[ToolCall | ToolCallError], tools: dict[str, Tool]
) -> list[ToolResult]:
    """Run each call with the tool of its name; one result per call, in order.

    An unknown tool, a malformed call, arguments the function does not accept, or a tool that
    raises an ``Exception`` give a one-line ``error: ...`` message as the content and
    ``error=True``; this never raises for them.
    """
    return [_run(call, tools) for call in calls]


def _run(call: ToolCall | ToolCallError, tools: dict[str, Tool]) -> ToolResult:
    if isinstance(call, ToolCallError):
        return ToolResult(call.name, f"error: {call.message}", error=True)
    tool = tools.get(call.name)
    if tool is None:
        known = ", ".join(sorted(tools)) or "none"
        return ToolResult(
            call.name, f"error: unknown tool {call.name!r} (tools: {known})", error=True
        )
    try:
        inspect.signature(tool.function).bind(**call.arguments)
    except TypeError as err:
        return ToolResult(
            call.name, f"error: wrong arguments for {call.name}: {_one_line(err)}", error=True
        )
    except ValueError:  # no signature to check (some builtins): let the call itself say
        pass
    try:
        value = tool.function(**call.arguments)
    except Exception as err:  # the model reads any failure as the tool's answer
        message = f"error: {call.name} raised {type(err).__name__}: {_one_line(err)}"
        return ToolResult(call.name, message, error=True)
    if isinstance(value, str):
        return ToolResult(call.name, value)
    try:
        return ToolResult(call.name, json.dumps(value, default=str))
    except ValueError as err:  # a circular structure
        message = f"error: {call.name} returned a value JSON cannot hold: {_one_line(err)}"
        return ToolResult(call.name, message, error=True)


def tool_messages(results: Iterable[ToolResult]) -> list[dict[str, str]]:
    """The messages that carry ``results`` back to the model: ``{"role": "tool", "name",
    "content"}`` each, in order."""
    return [{"role": "tool", "name": r.name, "content": r.content} for r in results]


def tools_description(tools: list[Tool]) -> str:
    """A system-prompt text listing ``tools`` (their JSON schemas) and the call format."""
    schemas = "\n".join(json.dumps(t.schema) for t in tools)
    return (
        "You can call these tools, given as JSON schemas:\n"
        f"{schemas}\n"
        'To call a tool, write <tool_call>{"name": <tool name>, "arguments": <arguments '
        "as a JSON object>}</tool_call>. Its result comes back in a message from the tool."
    )


def render_with_tools(
    tokenizer: Tokenizer,
    messages: list[dict],
    tools: list[Tool],
    *,
    generation_prompt: bool = True,
) -> str:
    """Render ``messages`` (each with a ``role``) as a prompt that offers ``tools``, ending
    with the assistant's cue when ``generation_prompt``.

    A Hugging Face chat template that renders tools gets them through
    ``apply_chat_template(messages, tools=[schemas])``. A template that ignores them (the
    rendered text does not change when they are given, as with the packaged SmolLM2-135M's),
    or a tokenizer without a template, gets a system message describing them instead
    (``tools_description``): before the first message, or appended to the first message when
    that is already a system message (templates expect one system message, first).
    """
    cue = generation_prompt
    if not tools:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=cue)
    hf = getattr(tokenizer, "tok", None)  # an HFTokenizer's transformers tokenizer
    if hf is not None and tokenizer.has_chat_template:
        schemas = [t.schema for t in tools]
        with_tools = hf.apply_chat_template(
            messages, tools=schemas, add_generation_prompt=cue, tokenize=False
        )
        without = hf.apply_chat_template(messages, add_generation_prompt=cue, tokenize=False)
        if with_tools != without:
            return with_tools
    description = tools_description(tools)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{description}")
        messages = [first, *messages[1:]]
    else:
        messages = [{"role": "system", "content": description}, *messages]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=cue)


class ToolEnvironment(Environment):
    """An environment whose model may call tools before it answers.

    A model message with tool calls gets the tools' results back as ``tool`` messages (an
    error message for a malformed call, an unknown tool or one that raises, and the episode
    goes on); a message without calls is the model's answer, which ``answer`` judges. Tools
    are named by import path in ``tool_specs`` (or the ``tools`` option) and offered to the
    model through the chat template (``render_with_tools``).
    """

    tool_specs: tuple[str, ...] = ()

    def __init__(self, tools: Sequence[str] | None = None) -> None:
        specs = self.tool_specs if tools is None else tuple(tools)
        self.toolbox = {t.name: t for t in map(load_tool, specs)}

    def tools(self) -> list[Tool]:
        """The tools offered to the model."""
        return list(self.toolbox.values())

    def step(self, message: str) -> Step:
        """Run the message's tool calls, or judge it as the answer when it makes none."""
        calls = parse_tool_calls(message)
        if not calls:
            return self.answer(message)
        results = run_tool_calls(calls, self.toolbox)
        info = {"tool_calls": len(results), "tool_errors": sum(r.error for r in results)}
        return Step(tool_messages(results), info=info)

    @abstractmethod
    def answer(self, message: str) -> Step:
        """Judge the model's answer (a message without tool calls); usually ends the episode."""
