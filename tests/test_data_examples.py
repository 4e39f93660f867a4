"""Tests for distrl.data.examples: real files in tmp_path, the packaged default set, the split."""

import json
import random
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distrl.data import examples as data
from distrl.data.examples import (
    Example,
    Message,
    load_examples,
    packaged_file,
    read_examples,
    split,
)
from distrl.errors import DataError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_jsonl_seed_004_shapes(tmp_path):
    path = tmp_path / "seed.jsonl"
    path.write_text(
        '{"messages": [{"content": "Hello"}, {"content": "Hi there! How can I help?"}], '
        '"quality": 1.0}\n'
        "\n"
        '{"text": "Single response text", "quality": 0.8}\n'
    )
    chat, text = load_examples(str(path))
    assert chat == Example(
        (Message("user", "Hello"),), "Hi there! How can I help?", 1.0, None, f"{path}:1"
    )
    assert chat.prompt_messages == [{"role": "user", "content": "Hello"}]
    assert chat.prompt_text == "Hello"
    assert text == Example((Message("user", "Single response text"),), None, 0.8, None, f"{path}:3")


def test_jsonl_messages_roles(tmp_path):
    path = write_jsonl(
        tmp_path / "roles.json",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be kind."},
                    {"content": "Hi"},
                    {"content": "Hello!"},
                ]
            },
            {"messages": [{"content": "a"}, {"content": "b"}, {"content": "c"}]},
            {"messages": [{"role": "user", "content": "only"}], "target": "topic"},
            {
                "messages": [
                    {"role": "assistant", "content": "x"},
                    {"role": "assistant", "content": "y"},
                ]
            },
        ],
    )
    mixed, odd, single, assistants = load_examples(path)
    assert mixed.messages == (Message("system", "Be kind."), Message("user", "Hi"))
    assert mixed.reference == "Hello!"
    assert mixed.prompt_text == "System: Be kind.\nUser: Hi"
    # three role-less messages end on a user turn: all prompt, nothing to imitate
    assert [m.role for m in odd.messages] == ["user", "assistant", "user"]
    assert odd.reference is None
    assert single.prompt_messages == [{"role": "user", "content": "only"}]
    assert (single.reference, single.target, single.quality) == (None, "topic", None)
    assert assistants.messages == (Message("assistant", "x"),) and assistants.reference == "y"


def test_jsonl_prompt_response_shapes(tmp_path):
    path = write_jsonl(
        tmp_path / "trl.jsonl",
        [
            {"prompt": "Why?", "response": "Because.", "target_context": "reasons"},
            {"prompt": "Just a prompt", "quality": 2},
            {
                "prompt": [{"role": "user", "content": "Q"}],
                "completion": [{"role": "assistant", "content": "A"}],
            },
        ],
    )
    first, second, third = load_examples(path)
    assert (first.prompt_text, first.reference, first.target) == ("Why?", "Because.", "reasons")
    assert (second.reference, second.quality) == (None, 2.0)
    assert isinstance(second.quality, float)
    assert (third.prompt_messages, third.reference) == ([{"role": "user", "content": "Q"}], "A")


def test_txt_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffHello there\n\n   \n  Tell me a joke.  \r\nlast".encode())
    examples = load_examples(str(path))
    assert [e.prompt_text for e in examples] == ["Hello there", "Tell me a joke.", "last"]
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    assert all(e.reference is None and e.messages[0].role == "user" for e in examples)


def test_parquet_columns(tmp_path):
    path = tmp_path / "data.parquet"
    table = pa.table({"text": ["one", "two", "three"], "quality": [0.5, None, 1.0]})
    pq.write_table(table, path, row_group_size=2)
    examples = load_examples(str(path))
    assert [(e.prompt_text, e.quality) for e in examples] == [
        ("one", 0.5),
        ("two", None),
        ("three", 1.0),
    ]
    assert examples[2].source == f"{path}, row 2"

    chats = tmp_path / "chats.parquet"
    messages = [[{"role": None, "content": "Hi"}, {"role": None, "content": "Hello!"}]]
    pq.write_table(pa.table({"messages": messages, "extra": [1]}), chats)
    (chat,) = load_examples(str(chats))
    assert (chat.messages, chat.reference) == ((Message("user", "Hi"),), "Hello!")

    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "response": ["r1", None]}), prompts)
    assert [(e.prompt_text, e.reference) for e in load_examples(str(prompts))] == [
        ("p1", "r1"),
        ("p2", None),
    ]


def test_parquet_errors_name_file_and_row(tmp_path):
    bad_quality = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "quality": ["1", "2", "x"]}), bad_quality)
    with pytest.raises(DataError, match=r"bad\.parquet, row 0: \"quality\" must be"):
        load_examples(str(bad_quality))

    no_prompt = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"question": ["a"]}), no_prompt)
    with pytest.raises(DataError, match=r"cols\.parquet: no .* column \(columns: question\)"):
        load_examples(str(no_prompt))

    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable Parquet file"):
        load_examples(str(not_parquet))

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match=r"empty\.parquet: no examples"):
        load_examples(str(empty))


def test_default_prompts():
    data._chitchat_examples.cache_clear()
    first = load_examples("default")
    data._chitchat_examples.cache_clear()
    assert load_examples("default") == first  # rebuilt from the file, same result
    assert len(first) > 1000
    for example in first:
        assert example.reference and example.reference.strip()
        assert all(m.content.strip() for m in example.messages)
        assert example.messages[-1].role == "user"
    english = sum((e.prompt_text + e.reference).isascii() for e in first)
    assert english / len(first) > 0.95
    words = " ".join(e.prompt_text.lower() for e in first).split()
    assert {"you", "the", "what"} <= set(words)
    assert [e.source for e in read_examples("default", limit=3)] == [e.source for e in first[:3]]
    assert len(load_examples("default", limit=7)) == 7


def test_limit_streams_only_what_is_asked(tmp_path):
    path = tmp_path / "limit.jsonl"
    # line 3 is malformed: a limit of 2 never reaches it
    path.write_text('{"text": "a"}\n{"text": "b"}\n{not json\n')
    assert [e.prompt_text for e in read_examples(str(path), limit=2)] == ["a", "b"]
    with pytest.raises(DataError, match=":3: malformed JSON"):
        load_examples(str(path))


BAD_JSONL = [
    (b'{"text": "a"}\n{"text": \n', ":2: malformed JSON"),
    (b'\n["a", "b"]\n', ':2: expected a JSON object, got ["a", "b"]'),
    (b'{"text": "a"}\n42\n', ":2: expected a JSON object, got 42"),
    (b'{"foo": 1}\n', ':1: no "messages", "prompt" or "text" key (keys: foo)'),
    (b'{"messages": "hi"}\n', ':1: "messages" must be a list of messages, got "hi"'),
    (b'{"messages": ["hi"]}\n', ':1: messages[0] must be an object with "content"'),
    (b'{"messages": [{"role": "user"}]}\n', ':1: messages[0] has no "content"'),
    (b'{"messages": [{"content": 3}]}\n', ':1: messages[0]: "content" must be a string, got 3'),
    (b'{"messages": [{"role": 1, "content": "a"}]}\n', ':1: messages[0]: "role" must be a string'),
    (b'{"messages": []}\n', ':1: "messages" is an empty list'),
    (b'{"text": "a", "quality": "high"}\n', ':1: "quality" must be a finite number, got "high"'),
    (b'{"text": "a", "quality": NaN}\n', ':1: "quality" must be a finite number, got NaN'),
    (b'{"text": "a", "quality": Infinity}\n', ':1: "quality" must be a finite number'),
    (b'{"text": "a", "quality": true}\n', ':1: "quality" must be a finite number, got true'),
    (b'{"text": 7}\n', ':1: "text" must be a string, got 7'),
    (b'{"text": "  "}\n', ":1: the prompt is empty"),
    (b'{"prompt": 5}\n', ':1: "prompt" must be a string or a list of messages, got 5'),
    (b'{"prompt": "p", "response": 5}\n', ':1: "response" must be a string or a list of messages'),
    (b'{"text": "a", "target": ["t"]}\n', ':1: "target" must be a string'),
    (b"", ": no examples"),
    (b"\n   \n\n", ": no examples"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: not UTF-8 at byte 13 of the line (byte 28 of"),
]


@pytest.mark.parametrize(("content", "fragment"), BAD_JSONL)
def test_bad_jsonl_names_file_and_line(tmp_path, content, fragment):
    path = tmp_path / "bad_input.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        load_examples(str(path))
    assert str(error.value).startswith(str(path))
    assert fragment in str(error.value)


def test_bad_txt_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\n\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: not UTF-8 at byte 0 of the line"):
        load_examples(str(path))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_examples(str(tmp_path / "nope.jsonl"))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown extension '\.csv'.*\.jsonl, \.json"):
        read_examples(str(csv))


def test_huge_line_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "huge.jsonl"
    line_bytes = 5_000_000
    with path.open("wb") as f:
        f.write(b'{"text": "fine"}\n')
        f.write(b'{"text": "' + b"a" * line_bytes + b'"}\n')
    examples = read_examples(str(path), max_line_bytes=1 << 20)
    assert next(examples).prompt_text == "fine"
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"huge\.jsonl:2: line is longer than 1048576 bytes"):
            next(examples)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < line_bytes // 2


def test_line_cap_boundary(tmp_path):
    path = tmp_path / "edge.jsonl"
    line = b'{"text": "abcdefghij"}'  # 22 bytes
    path.write_bytes(line + b"\n" + line)
    assert len(load_examples(str(path), max_line_bytes=len(line))) == 2
    with pytest.raises(DataError, match=r"edge\.jsonl:1: line is longer than 21 bytes"):
        load_examples(str(path), max_line_bytes=len(line) - 1)


def make_examples(n):
    return [Example((Message("user", f"prompt number {i}"),), f"reply {i}") for i in range(n)]


def test_split_is_deterministic_disjoint_and_covering():
    examples = make_examples(1000)
    train, val = split(examples, val_fraction=0.2, seed=3)
    assert split(examples, val_fraction=0.2, seed=3) == (train, val)
    assert set(train).isdisjoint(val)
    assert len(train) + len(val) == len(examples)
    assert set(train) | set(val) == set(examples)
    assert [e for e in examples if e in set(val)] == val  # input order kept
    assert 0.15 < len(val) / len(examples) < 0.25
    assert set(split(examples, val_fraction=0.2, seed=4)[1]) != set(val)


def test_split_ignores_input_order():
    examples = make_examples(300)
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    train, val = split(examples, val_fraction=0.3, seed=0)
    train2, val2 = split(shuffled, val_fraction=0.3, seed=0)
    assert (set(train), set(val)) == (set(train2), set(val2))


def test_split_keeps_equal_prompts_together():
    examples = make_examples(50)
    twins = [Example(e.messages, "another reply") for e in examples]
    train, val = split(examples + twins, val_fraction=0.5, seed=1)
    val_prompts = {e.prompt_text for e in val}
    assert not val_prompts & {e.prompt_text for e in train}


def test_split_small_inputs():
    two = make_examples(2)
    train, val = split(two, val_fraction=0.001, seed=0)
    assert len(train) == len(val) == 1
    train, val = split(two, val_fraction=0.999, seed=0)
    assert len(train) == len(val) == 1
    assert split(two, val_fraction=0.0, seed=0) == (two, [])
    train, val = split(two[:1], val_fraction=0.5, seed=0)
    assert train + val == two[:1]
    same = [Example((Message("user", "same"),), f"r{i}") for i in range(3)]
    train, val = split(same, val_fraction=0.01, seed=0)
    assert len(val) == 1 and len(train) == 2
    with pytest.raises(ValueError, match="val_fraction"):
        split(two, val_fraction=1.0, seed=0)


def test_packaged_prompt_sets_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the file comes from the package
    examples = load_examples("arithmetic")
    assert len(examples) == 260 and examples[0].source.startswith(str(packaged_file("arithmetic")))
    assert "Reply with only the result" in examples[0].prompt_text
    with pytest.raises(DataError, match="no such file .*'default', 'arithmetic'"):
        load_examples("arithmetics")
