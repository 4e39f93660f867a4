"""Chat and generation: the interactive loop over stdin, batch mode, the Python API, errors.

Everything but the ``slow`` test uses a random tiny Llama saved as a distrl checkpoint (tiktoken
GPT-2 tokenizer, no chat template), so replies are gibberish but every path runs in seconds.
"""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import distrl
from distrl.chat import (
    COMMANDS,
    PLAIN_STOP,
    ChatInterface,
    TokenStreamer,
    generate_text,
    load_model,
    main,
    read_history,
)
from distrl.config import ModelConfig, TokenizerConfig, cli, load_config
from distrl.dqn.learner import QLearner
from distrl.dqn.policy import QPolicy
from distrl.errors import ConfigError, DataError, ModelError
from distrl.models.policy import build_model, build_tokenizer
from distrl.models.tokenizers import load_tokenizer

FAST = ["--max-new-tokens", "4", "--seed", "0"]


@pytest.fixture(scope="module")
def tiny_model():
    config = ModelConfig(name="tiny-llama", device="cpu")
    tokenizer = build_tokenizer(config, TokenizerConfig(name="tiktoken:gpt2"))
    return build_model(config, tokenizer, seed=0), tokenizer


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    """A distrl-style checkpoint folder: HF weights plus the tokenizer spec, as a run leaves."""
    folder = tmp_path_factory.mktemp("run") / "final"
    tiny_model[0].save_pretrained(folder)
    (folder / "distrl_tokenizer.json").write_text(json.dumps({"spec": "tiktoken:gpt2"}))
    return folder


def chat_main(monkeypatch, capsys, argv, lines):
    """Run ``main(argv)`` with ``lines`` as standard input; return its exit code and stdout."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = main(argv)
    return code, capsys.readouterr().out


def test_interactive_chat_runs_every_command(checkpoint, tmp_path, monkeypatch, capsys):
    saved, empty, again = tmp_path / "h.json", tmp_path / "empty.json", tmp_path / "h2.json"
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "bot", "content": "hi"}]')
    lines = [
        "Hello there",
        "help",
        "test",
        "test naïve café 🚀",
        f"save {saved}",
        "clear",
        f"save {empty}",
        f"load {saved}",
        f"load {bad}",
        f"load {tmp_path / 'missing.json'}",
        "save",
        "How are you?",
        f"save {again}",
        "bye",
        "never read",
    ]
    code, out = chat_main(monkeypatch, capsys, ["--checkpoint", str(checkpoint), *FAST], lines)
    assert code == 0
    assert out.startswith(f"distrl chat: {checkpoint} (tiktoken:gpt2)")
    assert out.count("assistant> ") == 2 and "never read" not in out
    assert COMMANDS in out
    # test: the sample and the given text under the model's tokenizer and three tiktoken ones
    assert out.count("model (tiktoken:gpt2): ") == 2
    for name in ("cl100k_base", "o200k_base", "gpt2"):
        assert out.count(f"tiktoken:{name}: ") == 2
    assert "text: 'naïve café 🚀'" in out and "round trip differs" not in out
    assert "ids:    [2616, 38776, 40304, 12520, 248, 222]" in out  # GPT-2 ids of the text
    # save / clear / load round trip, errors that name the file, usage
    first = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[0]["content"] == "Hello there"
    assert json.loads(empty.read_text()) == {"messages": []}
    assert f"loaded 2 messages from {saved}" in out
    assert f"error: history file {bad}: message 0 has role 'bot'" in out
    assert f"error: history file {tmp_path / 'missing.json'}: cannot read it" in out
    assert "usage: save FILE" in out
    # the bad load left the loaded history alone, and the next turn was added to it
    assert json.loads(again.read_text())["messages"][:2] == first
    assert len(json.loads(again.read_text())["messages"]) == 4


@pytest.mark.parametrize("last", ["quit", "exit", "bye", "QUIT", None])
def test_chat_ends_on_quit_words_and_end_of_input(checkpoint, monkeypatch, capsys, last):
    lines = ["hi", *([last, "not a reply"] if last else [])]
    code, out = chat_main(monkeypatch, capsys, ["--checkpoint", str(checkpoint), *FAST], lines)
    assert code == 0
    assert out.count("assistant> ") == 1 and "not a reply" not in out


def test_chat_through_a_real_pipe(checkpoint):
    """``python -m distrl.chat`` reads piped stdin (no TTY) and exits 0 at its end."""
    result = subprocess.run(
        [sys.executable, "-m", "distrl.chat", "--checkpoint", str(checkpoint), *FAST],
        input="Hello\nclear\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "you> Hello\nassistant> " in result.stdout
    assert "history cleared" in result.stdout


def test_cli_errors_are_one_line_with_exit_2(tmp_path, monkeypatch, capsys):
    """What ``python -m distrl.chat`` runs: ``cli.run_main(main)``."""
    monkeypatch.setattr(sys, "argv", ["distrl.chat", "--checkpoint", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: checkpoint {tmp_path / 'nope'}: no such folder\n"


def test_a_checkpoint_holding_a_pickle_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from test_models_loading import pickled_model_folder

    marker = tmp_path / "code-ran"
    folder = pickled_model_folder(tmp_path / "final", marker)
    (folder / "distrl_tokenizer.json").write_text(json.dumps({"spec": "tiktoken:gpt2"}))
    (tmp_path / "prompts.txt").write_text("Hello!\n")
    argv = ["--checkpoint", str(folder), "--prompts", str(tmp_path / "prompts.txt")]
    argv += ["--output", str(tmp_path / "out.jsonl")]
    monkeypatch.setattr(sys, "argv", ["distrl.chat", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load the model in {folder}: its weights are a pickle")
    assert err.count("\n") == 1 and not marker.exists()
    assert not (tmp_path / "out.jsonl").exists()


def test_batch_mode_writes_one_line_per_prompt_with_rewards(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    records = [
        {"prompt": "Hello!"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        {"text": "Tell me a joke"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out" / "responses.jsonl"
    argv = ["--checkpoint", str(checkpoint), *FAST, "--prompts", str(prompts), "--output", str(out)]
    assert main([*argv, "--reward", "tiny", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello!", "Hi", "Tell me a joke"]
    for row in rows:
        assert isinstance(row["response"], str)
        assert set(row["reward"]) == {"total", "diversity"}  # the tiny config's reward
        assert 0.0 <= row["reward"]["diversity"] <= 1.0
    err = capsys.readouterr().err
    assert "generating" in err and "3/3" in err  # the progress bar
    assert f"wrote 3 responses to {out}" in err


def test_batch_mode_reads_text_files_and_is_seeded(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n\ntwo\n")
    outputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for out in outputs:
        argv = ["--checkpoint", str(checkpoint), *FAST, "--prompts", str(prompts)]
        assert main([*argv, "--output", str(out)]) == 0
    rows = [json.loads(line) for line in outputs[0].read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["one", "two"] and "reward" not in rows[0]
    assert outputs[0].read_text() == outputs[1].read_text()


def test_python_api_keeps_history_and_round_trips_it(tiny_model, checkpoint, tmp_path):
    chat = distrl.ChatInterface(str(checkpoint), max_new_tokens=4, seed=0)
    seen = []
    encode = chat.tokenizer.encode
    chat.tokenizer.encode = lambda text, **kw: seen.append(text) or encode(text, **kw)
    reply = chat.generate_response("The first message")
    assert isinstance(reply, str)
    chat.generate_response("The second message")
    assert "The first message" in seen[-1] and seen[-1].endswith("Assistant:")
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2
    chat.save(tmp_path / "history.json")
    chat.clear()
    assert chat.messages == []
    chat.load(tmp_path / "history.json")
    assert chat.messages[0] == {"role": "user", "content": "The first message"}
    assert chat.messages[1]["content"] == reply
    # Without history each prompt stands alone; the transcript is still kept for save.
    lone = ChatInterface(
        model=tiny_model[0], tokenizer=chat.tokenizer, use_history=False, max_new_tokens=4
    )
    lone.generate_response("The third message", stream=io.StringIO())
    lone.generate_response("The fourth message")
    assert "The third message" not in seen[-1] and len(lone.messages) == 4


def test_replies_repeat_with_a_seed_and_greedy_decoding(tiny_model):
    def replies(**options):
        chat = ChatInterface(model=tiny_model[0], tokenizer=tiny_model[1], **options)
        return [chat.generate_response(text) for text in ("a", "b")]

    assert replies(seed=3, max_new_tokens=4) == replies(seed=3, max_new_tokens=4)
    assert replies(temperature=0, max_new_tokens=4) == replies(temperature=0, max_new_tokens=4)


def test_system_prompt_and_streaming_match_the_reply(tiny_model):
    chat = ChatInterface(
        model=tiny_model[0], tokenizer=tiny_model[1], system="Be brief.", max_new_tokens=8
    )
    assert chat.prompt([{"role": "user", "content": "hi"}]).startswith("System: Be brief.\n")
    stream = io.StringIO()
    reply = chat.generate_response("hi", stream=stream)
    assert stream.getvalue() == reply + "\n"


def test_generate_text_takes_a_distrl_or_hf_tokenizer(tiny_model):
    model, tokenizer = tiny_model
    hf = load_tokenizer("gpt2").tok  # same ids as tiktoken's gpt2
    text = generate_text("Once upon a time", model, tokenizer, 8, temperature=0)
    assert text == distrl.generate_text("Once upon a time", model, hf, 8, temperature=0)
    assert 1 <= len(tokenizer.encode(text)) <= 8 + 2  # re-encoding may merge or split a little
    with pytest.raises(DataError, match="empty prompt"):
        generate_text("", model, tokenizer, 4)


def test_streamer_holds_back_partial_characters_and_stops_at_the_stop_text():
    tokenizer = load_tokenizer("tiktoken:gpt2")
    out = io.StringIO()
    streamer = TokenStreamer(tokenizer, out, PLAIN_STOP)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt comes first and is skipped
    for token in tokenizer.encode(" naïve 🚀 ok\nUser: more"):
        assert "\ufffd" not in out.getvalue()
        streamer.put(torch.tensor([token]))
        if streamer.stopped:
            break
    streamer.end()
    assert out.getvalue() == "naïve 🚀 ok\n"  # the reply, without "\nUser:", then a newline
    assert bool(streamer(torch.zeros(2, 3), None).all())  # as a stopping criterion: stop


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        ("{not json", "not valid JSON"),
        ('{"turns": []}', 'object whose "messages" is one'),
        ("[1]", 'message 0 is not an object with a string "content"'),
        ('[{"role": "user"}]', 'message 0 is not an object with a string "content"'),
        ('{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}', "message 1 has"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_history_files_are_named_with_the_fault(tmp_path, content, fault):
    path = tmp_path / "history.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=f"history file {path}: ") as err:
        read_history(path)
    assert fault in str(err.value)


def test_history_may_be_a_plain_list_of_messages(tmp_path):
    path = tmp_path / "history.json"
    path.write_text('[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]')
    assert read_history(path) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
    ]


def test_missing_and_non_model_checkpoints_are_refused(tiny_model, checkpoint, tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="not a model folder"):
        load_model(str(tmp_path))
    # A Hugging Face folder without tokenizer files: the tokenizer cannot be found.
    bare = tmp_path / "bare"
    tiny_model[0].save_pretrained(bare)
    with pytest.raises(ModelError, match="cannot load a tokenizer"):
        load_model(str(bare))


def test_a_dqn_checkpoint_chats_with_q_guided_decoding(tmp_path, monkeypatch, capsys):
    """A DQN checkpoint loads as its QPolicy; greedy replies are the Q-network's argmax over
    the reference's candidates, and the interactive chat streams them."""
    config = load_config("tiny", {"algo": "dqn", "dqn.action_top_k": 4})
    QLearner(**QLearner.arguments(config)).save(str(tmp_path))
    policy, tokenizer = load_model(str(tmp_path))
    assert isinstance(policy, QPolicy)
    chat = ChatInterface(str(tmp_path), temperature=0, max_new_tokens=5)
    reply = chat.generate_response("Hello there")
    ids = [tokenizer.encode(chat.prompt([{"role": "user", "content": "Hello there"}]))]
    out = policy.decode(np.array(ids), np.ones((1, len(ids[0])), dtype=np.int64), 5)
    assert (
        reply
        == tokenizer.decode(out.response_ids[0][: int(out.response_mask.sum())].tolist()).strip()
    )
    sampled = [
        generate_text("Once upon a time", policy, tokenizer, 5, temperature=1.0, seed=s)
        for s in range(4)
    ]
    assert len(set(sampled)) > 1  # Boltzmann over Q at temperature 1
    code, out = chat_main(
        monkeypatch, capsys, ["--checkpoint", str(tmp_path), "--temperature", "0"], ["hi", "quit"]
    )
    assert code == 0 and out.strip()


def test_a_hugging_face_folder_uses_its_own_tokenizer(tiny_model, tmp_path):
    folder = tmp_path / "hf"
    tiny_model[0].save_pretrained(folder)
    load_tokenizer("gpt2").tok.save_pretrained(folder)
    model, tokenizer = load_model(str(folder))
    assert tokenizer.name == str(folder) and model.config.vocab_size == 50257


def test_bad_prompt_files_and_options_fail_before_loading(tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = str(tmp_path / "out.jsonl")
    missing = str(tmp_path / "nope")  # would fail later, were the model loaded first
    with pytest.raises(DataError, match=f"{empty}: no examples"):
        main(["--checkpoint", missing, "--prompts", str(empty), "--output", out])
    with pytest.raises(ConfigError, match="--prompts and --output go together"):
        main(["--prompts", str(empty)])
    with pytest.raises(ConfigError, match="temperature >= 0"):
        main(["--checkpoint", missing, "--temperature", "-1"])


@pytest.mark.slow
def test_default_model_answers_in_english(monkeypatch, capsys):
    lines = ["What is the capital of France?", "quit"]
    argv = ["--temperature", "0", "--max-new-tokens", "30"]
    code, out = chat_main(monkeypatch, capsys, argv, lines)
    assert code == 0
    reply = out.split("assistant> ", 1)[1].split("you> ", 1)[0]
    assert "Paris" in reply, out


def test_test_command_counts_one_token_in_the_singular(checkpoint, monkeypatch, capsys):
    code, out = chat_main(
        monkeypatch, capsys, ["--checkpoint", str(checkpoint), *FAST], ["test a", "bye"]
    )
    assert code == 0
    assert "model (tiktoken:gpt2): 1 token, round trip ok" in out and "1 tokens" not in out


class ScriptedModel(ChatInterface):
    """The chat loop with the model's replies given (a random tiny model calls no tool)."""

    def __init__(self, replies, **kwargs):
        super().__init__(**kwargs)
        self.replies, self.prompts = iter(replies), []

    def reply(self, messages, stream=None):
        self.prompts.append(self.prompt(messages))
        text = next(self.replies)
        if stream:
            stream.write(text + "\n")
        return text


def test_a_chat_with_tools_runs_the_calls_and_the_model_answers_after_them(tiny_model):
    from distrl.envs.base import load_environment

    tools = load_environment("calculator")().tools()
    call = '<tool_call>{"name": "calculate", "arguments": {"expression": "%s"}}</tool_call>'
    chat = ScriptedModel(
        [call % "7 + 5", call % "1 / 0", "It is 12."],
        model=tiny_model[0],
        tokenizer=tiny_model[1],
        tools=tools,
    )
    out = io.StringIO()
    assert chat.generate_response("What is 7 + 5?", stream=out) == "It is 12."
    roles = [m["role"] for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert chat.messages[2]["content"] == "12"
    assert chat.messages[4]["content"].startswith("error: calculate raised ZeroDivisionError")
    assert "tool calculate> 12\n" in out.getvalue()
    assert '"name": "calculate"' in chat.prompts[0]  # the tools are offered in the prompt
    assert chat.prompts[1].endswith("Tool: 12\nAssistant:")  # and their results shown


def test_tool_calls_stop_after_the_round_limit(tiny_model):
    from distrl.chat import MAX_TOOL_ROUNDS
    from distrl.envs.calculator import Calculator

    call = '<tool_call>{"name": "calculate", "arguments": {"expression": "1"}}</tool_call>'
    chat = ScriptedModel(
        [call] * (MAX_TOOL_ROUNDS + 1),
        model=tiny_model[0],
        tokenizer=tiny_model[1],
        tools=Calculator().tools(),
    )
    assert chat.generate_response("Loop.") == call
    assert [m["role"] for m in chat.messages].count("tool") == MAX_TOOL_ROUNDS
