"""What both command-line tools share: logging and how a command ends on an error."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

from common.errors import GimmeError


def setup_logging(level: int) -> None:
    """Rich on a terminal; plain lines otherwise (daemon logs in files and containers)."""
    console = Console(stderr=True)
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)


def run_command(args: argparse.Namespace, console: Console, quiet_level: int) -> None:
    """Run the chosen subcommand; a GimmeError ends it with its message and status 2."""
    setup_logging(logging.DEBUG if args.verbose else quiet_level)
    try:
        args.func(args)
    except GimmeError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
