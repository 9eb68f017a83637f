"""`ladle serve --redis URL` sets MeteringConfig.redis (over a config file's too); a URL that is not
Redis's fails at startup naming the flag."""

from __future__ import annotations

import pytest

from ladle import cli
from ladle.config import MeteringConfig
from ladle.errors import LadleError


def _metering(*argv):
    args = cli.build_parser().parse_args(["serve", *argv])
    return cli._config_from_file(args, cli._serve_defaults()).metering


def test_redis_flag_alone_and_over_a_config_file(tmp_path):
    defaults = cli._serve_defaults()
    for argv, expected in (([], None), (["--redis", "redis://h:6379/2"], "redis://h:6379/2")):
        args = cli.build_parser().parse_args(["serve", *argv])
        assert cli._metering_config(args, MeteringConfig(), defaults).redis == expected
    path = tmp_path / "ladle.yaml"
    path.write_text("models:\n  - name: x\n    model: /nowhere\nmetering:\n  redis: redis://file:6379/0\n")
    assert _metering("--config", str(path)).redis == "redis://file:6379/0"
    assert _metering("--config", str(path), "--redis", "redis://flag:6379/1").redis == "redis://flag:6379/1"


def test_a_url_that_is_not_redis_is_refused_naming_the_flag():
    with pytest.raises(LadleError, match="--redis must be a URL starting with redis://"):
        MeteringConfig(redis="http://127.0.0.1:6379")
