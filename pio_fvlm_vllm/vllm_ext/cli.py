"""`--plugin NAME` for vLLM's engine argument parser, so `vllm serve MODEL --plugin pio_fvlm`
works as typed.

vLLM loads every installed general plugin on its own (`VLLM_PLUGINS` narrows that), so the flag
does not switch anything on: it asserts that the named plugins are installed and loaded, and
fails the command with the list of installed plugins when one is not.
"""

from __future__ import annotations

import argparse
import functools

PLUGIN_GROUP = "vllm.general_plugins"


def installed_plugins() -> list[str]:
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group=PLUGIN_GROUP)})


def _plugin_name(value: str) -> str:
    import vllm.envs as envs

    names = installed_plugins()
    if value not in names:
        raise argparse.ArgumentTypeError(
            f"no vLLM plugin named {value!r} is installed (installed: {', '.join(names) or 'none'})"
        )
    allowed = envs.VLLM_PLUGINS
    if allowed is not None and value not in allowed:
        raise argparse.ArgumentTypeError(
            f"plugin {value!r} is installed but VLLM_PLUGINS={','.join(allowed)!r} excludes it"
        )
    return value


def add_plugin_argument(parser: argparse.ArgumentParser) -> None:
    if "--plugin" in parser._option_string_actions:
        return
    parser.add_argument(
        "--plugin",
        action="append",
        type=_plugin_name,
        metavar="NAME",
        help="Require the vLLM general plugin NAME (e.g. pio_fvlm) to be installed and loaded. "
        "Repeatable.",
    )


def install_cli_flag() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.add_cli_args
    if getattr(original, "__pio_fvlm__", False):
        return

    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        add_plugin_argument(parser)
        return parser

    add_cli_args.__pio_fvlm__ = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
