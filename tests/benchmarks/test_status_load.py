"""``flexsfl bench status``: its flags, and the flood's rate cap against a real loopback server."""

from __future__ import annotations

import asyncio
import threading

import pytest

from flexsfl.benchmarks import status_load
from flexsfl.benchmarks.status_load import StatusLoadConfig, _flood
from flexsfl.core.errors import ConfigError


def test_bench_status_command_builds_its_config(monkeypatch):
    from flexsfl.cli import bench, build_parser

    seen = []
    mod, _, text = bench.BENCHMARKS["status"]
    assert mod is status_load
    monkeypatch.setitem(bench.BENCHMARKS, "status", (mod, lambda cfg: (seen.append(cfg), ([], "| summary |"))[1], text))
    args = build_parser().parse_args(["bench", "status", "--rate", "20", "--clients", "2", "--repeats", "5"])
    assert args.func(args) == 0
    assert seen == [StatusLoadConfig(rate=20.0, clients=2, repeats=5)]


@pytest.mark.parametrize("bad, says", [({"rate": 0.0}, "--rate"), ({"rounds": 1}, "--rounds"), ({"clients": 0}, "--clients")])
def test_bad_settings_name_their_flag(bad, says):
    with pytest.raises(ConfigError, match=says):
        StatusLoadConfig(**bad)


def test_flood_keeps_to_its_rate_cap():
    from websockets.asyncio.server import serve

    paths = []

    def answer(connection, request):
        paths.append(request.path)
        return connection.respond(200, "{}")

    async def run():
        async with serve(lambda ws: None, "127.0.0.1", 0, process_request=answer) as server:
            stop = threading.Event()
            asyncio.get_running_loop().call_later(1.0, stop.set)
            return await _flood(server.sockets[0].getsockname()[1], rate=40, concurrency=8, stop=stop)

    got = asyncio.run(run())
    assert got["errors"] == 0 and got["requests"] == len(paths)
    assert 30 <= got["requests"] <= 50, got  # 40 req/s for ~1 s, never more than the cap allows
    assert paths.count("/metrics") == len(paths) // 10  # every 10th request scrapes /metrics
