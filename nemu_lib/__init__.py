"""nemu_lib: the small library behind the nemu notebooks (explaining representations)."""

__version__ = "0.1.0"
