"""Progress bars: tqdm's widget or terminal bar where a person watches, one final line where outputs are saved.

``tqdm.auto`` draws a widget in Jupyter. A notebook executed to be read later (``make run``: papermill) would save
that widget's state, which renders as an empty ``0%|  | 0/600`` wherever widgets do not load (GitHub, the site,
a plain Jupyter without ipywidgets). With ``NEMU_PROGRESS=final`` (what :mod:`nemu_lib.series` sets for the
kernels it starts), a bar writes nothing while it runs and one text line when it closes, e.g.
``SimCLR: 100%|██████████| 600/600 [01:02<00:00, 9.6it/s]``; bars opened with ``leave=False`` leave nothing.

Usage: ``from nemu_lib.progress import tqdm`` in place of ``from tqdm.auto import tqdm``.
"""

from __future__ import annotations

import io
import os
import sys

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

PROGRESS_ENV = "NEMU_PROGRESS"  # "final": one line per bar, when it closes; anything else: tqdm.auto


class FinalLineBar(std_tqdm):
    """A tqdm bar that writes nothing while it runs and its final state as one line to stdout when it closes
    (if ``leave``; tqdm's default leaves only outermost bars)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["file"] = io.StringIO()  # the running bar goes nowhere
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        leave = (self.pos == 0) if self.leave is None else self.leave
        line = None if self.disable or not leave else self.format_meter(**self.format_dict)
        super().close()
        if line:
            print(line.strip(), file=sys.stdout, flush=True)


def final_line() -> bool:
    """Whether bars are reduced to their final line (``NEMU_PROGRESS=final``)."""
    return os.environ.get(PROGRESS_ENV, "").strip().lower() == "final"


def tqdm(*args: object, **kwargs: object) -> std_tqdm:
    """A progress bar: :class:`FinalLineBar` under ``NEMU_PROGRESS=final``, else ``tqdm.auto.tqdm``.
    Takes tqdm's arguments."""
    return (FinalLineBar if final_line() else auto_tqdm)(*args, **kwargs)


tqdm.write = std_tqdm.write  # type: ignore[attr-defined]  # print a line without breaking a running bar
