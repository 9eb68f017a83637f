"""--tool-call-parser reaches the model's config entry; with --config it belongs in the file."""

from __future__ import annotations

import pytest

from ladle.cli import _config_from_flags, _serve_defaults, build_parser, main


def test_the_flag_reaches_the_model_entry():
    args = build_parser().parse_args(["serve", "--tool-call-parser", "llama3_json"])
    assert _config_from_flags(args, _serve_defaults()).models[0].tool_call_parser == "llama3_json"
    default = build_parser().parse_args(["serve"])
    assert _config_from_flags(default, _serve_defaults()).models[0].tool_call_parser == "auto"


def test_an_unknown_parser_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--tool-call-parser", "mistral"])
    assert "hermes" in capsys.readouterr().err


def test_with_a_config_file_the_parser_goes_in_the_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  - name: a\n")
    assert main(["serve", "--config", str(cfg), "--tool-call-parser", "hermes"]) == 2
    assert "--tool-call-parser" in capsys.readouterr().err
