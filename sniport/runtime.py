"""The config compiled for serving: route table and per-block runtime data, built once.

Job: everything a worker needs that is derived from the config and costs something to make
(the route table, upstream addresses resolved to socket addresses), built at load so that no
connection pays for it, and so that ``check`` and ``run`` fail on exactly the same problems.
"""

from __future__ import annotations

from dataclasses import dataclass

from sniport.addresses import AddressError
from sniport.config import ConfigError, LoadedConfig, Problem, block_path
from sniport.net.passthrough import PassthroughRuntime
from sniport.routing import RouteTable


@dataclass(frozen=True)
class Runtime:
    loaded: LoadedConfig
    table: RouteTable
    passthrough: dict[str, PassthroughRuntime]


def build_runtime(loaded: LoadedConfig) -> Runtime:
    config = loaded.config
    problems: list[Problem] = []
    passthrough: dict[str, PassthroughRuntime] = {}
    for block in config.passthrough:
        try:
            passthrough[block.name] = PassthroughRuntime.build(block)
        except AddressError as exc:
            problems.append(Problem(loaded.source, f"{block_path(config, block)}.upstreams",
                                    str(exc)))
    if problems:
        raise ConfigError(problems)
    return Runtime(loaded, RouteTable(config), passthrough)
