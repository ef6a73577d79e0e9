"""The examples at the end of each command's --help, shown as written: click rewraps a help text's
paragraphs to the terminal's width, which broke commands mid-option and dropped their line breaks,
so that a copied example no longer ran."""

from __future__ import annotations

_KEEP_AS_WRITTEN = "\b"  # click's mark: the paragraph after it is not rewrapped


def examples(*commands: str, after: str = "") -> str:
    """An epilog: ``commands`` one to a line (a command may continue on the next with `` \\``),
    then the paragraph ``after``."""
    lines = "\n".join(f"  {line}" for command in commands for line in command.splitlines())
    return f"Examples:\n\n{_KEEP_AS_WRITTEN}\n{lines}\n" + (f"\n{after}\n" if after else "")
