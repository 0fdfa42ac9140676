"""Config keys of the generate protocols: protocol, request, outputs, compare.mode text, compare.min_similarity,
latency.first_ms. One invalid file per rule (tests/testdata/config_generate), each asserting the exact message."""

from __future__ import annotations

from pathlib import Path

import pytest

from probe.config import MAX_REQUEST_BYTES, ConfigError, load_config

TESTDATA = Path(__file__).parent / "testdata" / "config_generate"
INVALID = sorted(TESTDATA.glob("*.yaml"))

CONTRACT_EXAMPLE = """
canaries:
  - name: chat
    model: llama
    protocol: generate_stream
    request:
      text_input: "The capital of France is"
      max_tokens: 16
      parameters: {temperature: 0}
    outputs: [text_output]
    compare:
      mode: text
      min_similarity: 0.9
    latency:
      first_ms: 200
      max_ms: 2000
      drift: 3.0
"""


def expected_message(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <message>'"
    return first[len("# expect: ") :]


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_generate_config_names_key_path(path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == expected_message(path)


def test_contract_example_loads(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(CONTRACT_EXAMPLE)
    (c,) = load_config(tmp_path / "p.yaml").canaries
    assert c.protocol == "generate_stream"
    assert c.request == {"text_input": "The capital of France is", "max_tokens": 16, "parameters": {"temperature": 0}}
    assert list(c.request) == ["text_input", "max_tokens", "parameters"]  # sent in the order written
    assert c.inputs == ()
    assert c.outputs == ("text_output",)
    assert (c.compare.mode, c.compare.min_similarity) == ("text", 0.9)
    assert (c.latency.first_ms, c.latency.max_ms, c.latency.drift) == (200.0, 2000.0, 3.0)


def test_defaults(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "canaries:\n"
        "  - {name: chat, model: m, protocol: generate, request: {text_input: hi, stop_words: [a, null, 1.5, true]}}\n"
        "  - name: img\n"
        "    model: resnet\n"
        "    inputs: [{name: X, datatype: FP32, shape: [1], fill: zeros}]\n"
    )
    chat, img = load_config(tmp_path / "p.yaml").canaries
    assert (chat.protocol, chat.compare.mode, chat.latency.first_ms, chat.outputs) == ("generate", "exact", None, None)
    assert chat.request == {"text_input": "hi", "stop_words": ["a", None, 1.5, True]}
    assert chat.compare.min_similarity == 0.9
    assert (img.protocol, img.request) == ("infer", None)


def test_min_similarity_bounds_are_inclusive(tmp_path: Path) -> None:
    for value in (0, 1, 0.5):
        (tmp_path / "p.yaml").write_text(
            f"canaries:\n  - name: c\n    model: m\n    protocol: generate_stream\n    request: {{text_input: hi}}\n"
            f"    compare: {{mode: text, min_similarity: {value}}}\n"
        )
        assert load_config(tmp_path / "p.yaml").canaries[0].compare.min_similarity == float(value)


def test_request_size_is_bounded(tmp_path: Path) -> None:
    prompt = "x" * (MAX_REQUEST_BYTES + 1)
    (tmp_path / "p.yaml").write_text(
        f"canaries:\n  - name: c\n    model: m\n    protocol: generate\n    request: {{text_input: {prompt}}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "p.yaml")
    assert str(err.value) == "canaries[0].request: 256.0KiB as JSON, over the 256.0KiB limit"


def test_a_request_at_the_depth_limit_loads(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "canaries:\n  - name: c\n    model: m\n    protocol: generate\n    request: {x: " + "[" * 31 + "]" * 31 + "}\n"
    )
    assert load_config(tmp_path / "p.yaml").canaries[0].request is not None
