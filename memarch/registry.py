"""Name -> (module class, config class) for sequence and channel mixers.

Entries are import paths, resolved lazily, so a missing optional layer never breaks the others and
importing the registry stays cheap. A new architecture registers here and gets the conformance suite
(tests/layers/test_conformance.py) for free.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

# name: (module, class, config class, extra config defaults)
SEQUENCE_MIXERS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "attention": ("layers.attention", "Attention", "AttentionConfig", {}),
    "swa": ("layers.attention", "Attention", "SlidingWindowConfig", {}),
    "gated_deltanet": ("layers.deltanet", "GatedDeltaNet", "GatedDeltaNetConfig", {}),
    "mom": ("layers.mom", "MoM", "MoMConfig", {}),
    "landmark": ("layers.landmark", "LandmarkAttention", "LandmarkConfig", {}),
    "hcam": ("layers.hcam", "HCAM", "HCAMConfig", {}),
    "moneta": ("layers.miras", "Miras", "MirasConfig", {"model": "moneta"}),
    "yaad": ("layers.miras", "Miras", "MirasConfig", {"model": "yaad"}),
    "memora": ("layers.miras", "Miras", "MirasConfig", {"model": "memora"}),
    "titans_lmm": ("layers.titans", "NeuralMemory", "TitansConfig", {}),
    "titans_mac": ("layers.titans", "MAC", "TitansConfig", {}),
    "titans_mag": ("layers.titans", "MAG", "TitansConfig", {}),
    "titans_mal": ("layers.titans", "MAL", "TitansConfig", {}),
}

CHANNEL_MIXERS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "swiglu": ("layers.mlp", "SwiGLU", "SwiGLUConfig", {}),
    "peer": ("layers.peer", "PEER", "PEERConfig", {}),
    "ultramem": ("layers.ultramem", "UltraMem", "UltraMemConfig", {}),
}


def _resolve(table, kind, name):
  if name not in table:
    raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table))}")
  mod, cls, cfg_cls, defaults = table[name]
  m = importlib.import_module(mod)
  return getattr(m, cls), getattr(m, cfg_cls), defaults


def make_config(table, kind: str, name: str, **kwargs):
  """Builds the typed config of `name` from kwargs, keeping d_model/num_heads only if it has them."""
  _, cfg_cls, defaults = _resolve(table, kind, name)
  fields = {f.name for f in dataclasses.fields(cfg_cls)}
  kwargs = {**defaults, **kwargs}
  for shared in ("d_model", "num_heads"):
    if shared in kwargs and shared not in fields:
      kwargs.pop(shared)
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"{kind} {name!r} has no option(s) {unknown}; valid: {sorted(fields)}")
  return cfg_cls(**kwargs)


def build_mixer(name: str, *, rngs, **kwargs):
  cls, _, _ = _resolve(SEQUENCE_MIXERS, "sequence mixer", name)
  return cls(make_config(SEQUENCE_MIXERS, "sequence mixer", name, **kwargs), rngs=rngs)


def build_channel(name: str, *, rngs, **kwargs):
  cls, _, _ = _resolve(CHANNEL_MIXERS, "channel mixer", name)
  return cls(make_config(CHANNEL_MIXERS, "channel mixer", name, **kwargs), rngs=rngs)


def check_name(kind: str, name: str) -> None:
  table = SEQUENCE_MIXERS if kind == "sequence mixer" else CHANNEL_MIXERS
  if name not in table and not (kind == "channel mixer" and name == "none"):
    raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table))}"
                     + (", none" if kind == "channel mixer" else ""))
