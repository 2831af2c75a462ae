#!/usr/bin/env python
"""Django's command-line utility for the platform."""
import os
import sys
from pathlib import Path

# platform/ is a plain folder, never a package: its config/ package is imported
# as `config`, so the standard library's `platform` module stays unshadowed.
sys.path.insert(0, str(Path(__file__).resolve().parent / "platform"))


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
