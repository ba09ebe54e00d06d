"""``mlora chat_preview FILE``: show conversations of a chat JSONL file as a chat template renders them.

A command a plugin adds through ``mlora_register_commands``: it checks the file the way the
``chat_markup`` data loader does (errors name the file and line) and prints the first conversations
rendered with the template, so a user sees what the model will read before training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlora_core.errors import MloraError
from mlora_core.plugin_api.host import PluginHost
from mlora_plugin_example.chat import TEMPLATES, read_conversations, render


class ChatPreviewCommand:
    help = "show the first conversations of a chat JSONL file as a chat template renders them"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("path", type=Path, help="a chat JSONL file ({'messages': [...]} per line)")
        parser.add_argument("--template", default="chatml", help=f"one of {', '.join(TEMPLATES)} (default chatml)")
        parser.add_argument("--limit", type=int, default=3, help="conversations to show (default 3)")

    def run(self, args: argparse.Namespace, host: PluginHost) -> int:
        if args.template not in TEMPLATES:
            raise MloraError(f"--template {args.template!r}: unknown; known: {', '.join(TEMPLATES)}")
        if not args.path.is_file():
            raise MloraError(f"{args.path}: no such file")
        conversations = read_conversations(args.path)  # a DataError (an MloraError) names file and line
        for i, messages in enumerate(conversations[: max(args.limit, 0)]):
            print(f"--- conversation {i + 1} of {len(conversations)}")
            print(render(messages, TEMPLATES[args.template]), end="")
        return 0
