"""`ladle serve`'s metering flags set MeteringConfig, alone or over a config file's `metering:`."""

from __future__ import annotations

from ladle import cli

CONFIG = """\
models:
  - name: x
    model: /nowhere
metering:
  data_dir: {data_dir}
  database: sqlite:///{data_dir}/file.db
  prices:
    - model: x
      prompt_per_1k: 0.5
      per_engine_second: 0.01
"""


def _metering(*argv):
    args = cli.build_parser().parse_args(["serve", *argv])
    return cli._config_from_file(args, cli._serve_defaults()).metering


def test_the_config_files_metering_section_is_read_and_flags_override_it(tmp_path):
    path = tmp_path / "ladle.yaml"
    path.write_text(CONFIG.format(data_dir=tmp_path))
    m = _metering("--config", str(path))
    assert (m.data_dir, m.database, m.ledger, m.share_prefix_cache) == (str(tmp_path), f"sqlite:///{tmp_path}/file.db",
                                                                        True, False)  # fmt: skip
    assert m.price("x").prompt_per_1k == 0.5 and m.price("x").per_engine_second == 0.01
    m = _metering("--config", str(path), "--database", "postgresql://u@h/db", "--data-dir", "/d", "--no-ledger",
                  "--share-prefix-cache")  # fmt: skip
    assert (m.data_dir, m.database, m.ledger, m.share_prefix_cache) == ("/d", "postgresql://u@h/db", False, True)
    assert m.prices  # the file's price table stays


def test_the_flags_alone_build_the_metering_config(tmp_path):
    args = cli.build_parser().parse_args(["serve", "--model-repository", str(tmp_path), "--data-dir", "/d"])
    defaults = cli._serve_defaults()
    base = cli.MeteringConfig()
    m = cli._metering_config(args, base, defaults)
    assert (m.data_dir, m.database, m.ledger) == ("/d", None, True)


def test_a_database_that_does_not_answer_is_one_line_without_its_password():
    from helpers import assert_one_line_error, free_port, run_ladle

    url = f"postgresql://ladle:s3cret@127.0.0.1:{free_port()}/ledger"
    result = run_ladle("serve", "--database", url, "--no-embedding-model")
    assert_one_line_error(result, "--database postgresql://ladle:***@127.0.0.1", "cannot open the metering database")
    assert "s3cret" not in result.stderr
