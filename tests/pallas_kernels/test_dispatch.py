"""The one implementation resolver every kernel op goes through (pallas_kernels._dispatch)."""
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.block_retrieval_attention import IMPLEMENTATIONS as BRA
from pallas_kernels.expert_gather import GATHER_IMPLEMENTATIONS, MLP_IMPLEMENTATIONS
from pallas_kernels.gated_delta_rule import IMPLEMENTATIONS as GDR
from pallas_kernels.linear_attention import IMPLEMENTATIONS as LA
from pallas_kernels.miras_memory import IMPLEMENTATIONS as MIRAS
from pallas_kernels.titans_memory import IMPLEMENTATIONS as TITANS
from pallas_kernels.titans_memory import OPT_IN as TITANS_OPT_IN

OPS = {"gated_delta_rule": GDR, "linear_attention": LA, "expert_gather": GATHER_IMPLEMENTATIONS,
       "expert_mlp": MLP_IMPLEMENTATIONS, "block_retrieval_attention": BRA, "titans_memory": TITANS,
       "miras_memory": MIRAS}


def test_every_op_registers_known_names():
  for op, impls in OPS.items():
    assert set(impls) <= set(_dispatch.IMPLEMENTATIONS), op
    assert {"reference", "xla"} <= set(impls), op


def test_resolve(monkeypatch):
  impls = {"reference": None, "xla": None, "pallas_gpu": None}
  assert _dispatch.resolve("op", impls, "reference") == ("reference",)
  assert _dispatch.resolve("op", impls, _dispatch.Implementation.PALLAS_GPU) == ("pallas_gpu",)
  with pytest.raises(ValueError, match=r"^op: unknown implementation ''; choose one of"):
    _dispatch.resolve("op", impls, "")
  with pytest.raises(NotImplementedError, match="'pallas_tpu' is not available"):
    _dispatch.resolve("op", impls, "pallas_tpu")
  monkeypatch.setattr(_dispatch, "default_order", lambda backend=None: ("pallas_gpu", "xla"))
  assert _dispatch.resolve("op", impls, None) == ("pallas_gpu", "xla")
  assert _dispatch.resolve("titans_memory", TITANS, None, TITANS_OPT_IN) == ("xla",)
  assert _dispatch.resolve("miras_memory", MIRAS, None) == ("xla",)
  monkeypatch.setattr(_dispatch, "default_order", lambda backend=None: ("pallas_tpu", "xla"))
  assert _dispatch.resolve("op", impls, None) == ("xla",)


def test_check_implementation():
  assert _dispatch.check_implementation(None, "cfg") is None
  assert _dispatch.check_implementation("xla", "cfg") == "xla"
  assert type(_dispatch.check_implementation(_dispatch.Implementation.XLA, "cfg")) is str
  with pytest.raises(ValueError, match="cfg: unknown implementation 'cuda'"):
    _dispatch.check_implementation("cuda", "cfg")
