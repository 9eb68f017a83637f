"""Tool-call parsers on fixed model outputs: what they read, streaming split anywhere reads the
same, and the grammars of `required` / named choices accept exactly the calls they should."""

from __future__ import annotations

import json

import pytest

from ladle.server.tool_parsers import (
    TOOL_PARSERS,
    FunctionSpec,
    HermesToolParser,
    Llama3JsonToolParser,
    ParsedCall,
    StreamingToolExtractor,
    parser_for,
)

WEATHER = FunctionSpec(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
TIME = FunctionSpec(
    "get_time",
    None,
    {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"], "additionalProperties": False},
)

HERMES_OUTPUTS = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>',
    '<tool_call>{"name":"get_time","arguments":{"zone":"a \\"quoted\\" }{ zone"}}</tool_call>',
    "The answer is 3 < 4 and <tool is a word.",
    "<tool_call>\nnot a call\n</tool_call>\nsorry",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',  # cut by max_tokens
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\nDone.',
    '\n\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n',
    "Plain text\nwith lines \n",
]
LLAMA_OUTPUTS = [
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
    '{"name": "get_time", "parameters": {"zone": "UTC"}}',
    '{"name": "get_time", "arguments": {"zone": "UTC"}}',
    "Paris is the capital of France.",
    '{"answer": 42}',
    '  {"name": "get_time", "parameters": {"zone": "U',
]


def test_hermes_reads_calls_and_content():
    parser = HermesToolParser()
    assert parser.extract(HERMES_OUTPUTS[0]) == (None, [ParsedCall("get_weather", '{"city": "Paris"}')])
    content, calls = parser.extract(HERMES_OUTPUTS[1])
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"zone": "Europe/Paris"}),
    ]
    assert json.loads(parser.extract(HERMES_OUTPUTS[2])[1][0].arguments) == {"zone": 'a "quoted" }{ zone'}
    assert parser.extract(HERMES_OUTPUTS[3]) == (HERMES_OUTPUTS[3], [])
    # a block that holds no call is not lost: it comes out as content
    assert parser.extract(HERMES_OUTPUTS[4]) == (HERMES_OUTPUTS[4], [])
    assert parser.extract(HERMES_OUTPUTS[5]) == (None, [ParsedCall("get_weather", '{"city": "Pa')])
    assert parser.extract(HERMES_OUTPUTS[6]) == ("\nDone.", [ParsedCall("get_weather", '{"city": "Paris"}')])
    assert parser.extract(HERMES_OUTPUTS[7]) == (None, [ParsedCall("get_time", '{"zone": "UTC"}')])
    assert parser.extract(HERMES_OUTPUTS[8]) == (HERMES_OUTPUTS[8], [])


def test_llama3_json_reads_calls_and_content():
    parser = Llama3JsonToolParser()
    assert parser.extract(LLAMA_OUTPUTS[0]) == (None, [ParsedCall("get_weather", '{"city": "Paris"}')])
    assert parser.extract(LLAMA_OUTPUTS[1]) == (
        None,
        [ParsedCall("get_weather", '{"city": "Paris"}'), ParsedCall("get_time", '{"zone": "UTC"}')],
    )
    assert parser.extract(LLAMA_OUTPUTS[2]) == (None, [ParsedCall("get_time", '{"zone": "UTC"}')])
    assert parser.extract(LLAMA_OUTPUTS[3]) == (LLAMA_OUTPUTS[3], [])
    assert parser.extract(LLAMA_OUTPUTS[4]) == (LLAMA_OUTPUTS[4], [])  # JSON, but not a call
    assert parser.extract(LLAMA_OUTPUTS[5]) == (None, [ParsedCall("get_time", '{"zone": "U')])


def _streamed(parser, pieces):
    extractor = StreamingToolExtractor(parser)
    content, calls = "", []
    for k, piece in enumerate(pieces):
        text, deltas = extractor.feed(piece, is_final=k == len(pieces) - 1)
        content += text
        for d in deltas:
            if d.index == len(calls):  # a new call: its id and name come on its first delta
                assert d.id.startswith("call_") and d.name
                calls.append(ParsedCall(d.name, ""))
            else:
                assert d.id is None and d.name is None
            calls[d.index].arguments += d.arguments
    return content, calls


@pytest.mark.parametrize(
    "parser, text",
    [(HermesToolParser(), t) for t in HERMES_OUTPUTS] + [(Llama3JsonToolParser(), t) for t in LLAMA_OUTPUTS],
)
def test_streaming_split_anywhere_reads_what_extract_reads(parser, text):
    content, calls = parser.extract(text)
    expected = (content or "", calls)
    assert _streamed(parser, list(text)) == expected  # one character at a time
    for k in range(len(text) + 1):  # and in two pieces, split at every boundary
        assert _streamed(parser, [text[:k], text[k:]]) == expected, k


def test_streaming_holds_back_a_possible_marker_until_it_is_decided():
    extractor = StreamingToolExtractor(HermesToolParser())
    assert extractor.feed("Hi <tool") == ("Hi", [])
    assert extractor.feed("box") == (" <toolbox", [])
    assert extractor.feed("\n") == ("", [])  # whitespace waits: a call may follow
    text, deltas = extractor.feed(' <tool_call>\n{"name": "get_time", "arguments": {"zo')
    assert text == "" and [(d.index, d.name, d.arguments) for d in deltas] == [(0, "get_time", '{"zo')]


def test_parser_chosen_by_name_or_template():
    assert isinstance(parser_for("llama3_json", "<tool_call>"), Llama3JsonToolParser)
    assert isinstance(parser_for("auto", "{{- '<tool_call>\\n' }}"), HermesToolParser)
    assert isinstance(parser_for("auto", "{{ '<|python_tag|>' }}"), Llama3JsonToolParser)
    assert isinstance(parser_for("auto", "{{ message['content'] }}"), HermesToolParser)  # Ladle's own prompt
    assert isinstance(parser_for("auto", None), HermesToolParser)


def test_config_names_every_registered_parser():
    from ladle.config import TOOL_CALL_PARSERS

    assert set(TOOL_CALL_PARSERS) == {"auto", *TOOL_PARSERS}


def test_written_calls_read_back():
    calls = [ParsedCall("get_weather", '{"city": "Oslo"}'), ParsedCall("get_time", '{"zone": "UTC"}')]
    for parser in (HermesToolParser(), Llama3JsonToolParser()):
        assert parser.extract(parser.format_calls(calls)) == (None, calls)


# -- grammars, checked with llguidance on the embedded model's tokenizer ---------------------------


@pytest.fixture(scope="module")
def tokenizers(embedded_source):
    from llguidance import LLTokenizer

    from ladle.model.gguf_loader import GGUFFile

    tok = GGUFFile(embedded_source.path).tokenizer()
    return tok, LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=list(tok.stop_token_ids))


def _accepts(tokenizers, grammar: str, text: str) -> bool:
    from llguidance import LLMatcher

    tok, ll = tokenizers
    matcher = LLMatcher(ll, LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ids = ll.tokenize_str(text)
    return matcher.validate_tokens(ids) == len(ids) and matcher.consume_tokens(ids) and matcher.is_accepting()


@pytest.mark.parametrize("parser", [HermesToolParser(), Llama3JsonToolParser()])
def test_grammar_accepts_valid_calls_and_rejects_others(tokenizers, parser):
    from llguidance import LLMatcher

    tools = [WEATHER, TIME]
    required, named = parser.grammar(tools, is_single=False), parser.grammar([TIME], is_single=True)
    for grammar in (required, named):
        assert LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(grammar), tokenizers[1]) == ""

    def write(*calls):
        return parser.format_calls([ParsedCall(name, json.dumps(args)) for name, args in calls])

    weather, time = ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "UTC"})
    assert _accepts(tokenizers, required, write(weather))
    assert _accepts(tokenizers, required, write(time, weather))
    assert _accepts(tokenizers, named, write(time))
    assert not _accepts(tokenizers, named, write(weather))  # named: only that function
    assert not _accepts(tokenizers, named, write(time, time))  # ... and once
    assert not _accepts(tokenizers, required, write(("get_date", {"zone": "UTC"})))  # no such tool
    assert not _accepts(tokenizers, required, write(("get_weather", {"unit": "celsius"})))  # city missing
    assert not _accepts(tokenizers, required, write(("get_weather", {"city": "Paris", "unit": "kelvin"})))
    assert not _accepts(tokenizers, required, write(("get_time", {"zone": "UTC", "extra": 1})))
    assert not _accepts(tokenizers, required, "I cannot call tools.")
    assert not _accepts(tokenizers, required, "")  # required: at least one call
