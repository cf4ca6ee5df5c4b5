"""A block of lines redrawn in place on a terminal: the demo's live view and `paypoll top`.

No curses and no terminal library (README, "Why each runtime dependency"): the block is redrawn
by moving the cursor up over it (``ESC[nF``) and clearing to the end of the screen (``ESC[J``),
which every common terminal understands. Each line is cut to the terminal's width at every draw,
so a narrow or resized window never wraps a line, which would make the block taller than the
cursor moves up and leave old copies scrolling by.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import TextIO


def fit(line: str, width: int) -> str:
    """``line`` cut to ``width`` characters (with an ellipsis when cut)."""
    if width <= 0 or len(line) <= width:
        return line
    return line[: max(0, width - 1)] + "…"


class LiveBlock:
    """The last block drawn on ``out``; :meth:`draw` replaces it, :meth:`clear` erases it."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.drawn = 0  # lines of the block on screen now

    def clear(self) -> None:
        """Erase the block (the cursor goes back to where it began)."""
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def draw(self, lines: Sequence[str]) -> None:
        """Replace the block with ``lines``, each cut to the terminal's width now."""
        width = shutil.get_terminal_size().columns
        self.clear()
        # \x1b[K clears leftovers of a longer previous line when the terminal wraps nothing.
        self.out.write("".join(f"{fit(line, width - 1)}\x1b[K\n" for line in lines))
        self.out.flush()
        self.drawn = len(lines)

    def leave(self) -> None:
        """Keep the last block on screen, the cursor below it."""
        self.drawn = 0
        self.out.flush()
