"""The memorization experiment (memarch.evals.memorization): matched baselines and a micro-run."""
import json

import pytest
from flax import nnx

from memarch import configs_lib, registry
from memarch.data import make_source
from memarch.data.memorization import MemorizationSource
from memarch.evals import memorization as mem
from memarch.lm import count_params
from memarch.sharding import mesh_context

TINY = mem.Setup(vocab_size=64, seq_len=8, batch_size=8, d_model=16, num_heads=2, max_steps=3,
                 eval_every=3, eval_examples=8, peer_n=4, peer_heads=2, peer_k=2, um_n=4, um_k=4)


def test_cost_model_matches_built_layers_and_baselines_are_matched():
  s = mem.Setup()
  specs = {sp["name"]: sp for sp in mem.row_specs(s, mem.ROWS)}
  assert sorted(specs) == sorted(["peer", "ultramem", "dense_flops~peer", "dense_params~peer",
                                  "dense_flops~ultramem", "dense_params~ultramem", "none"])
  with mesh_context():
    for sp in specs.values():
      if sp["channel"] == "none":
        continue
      layer = nnx.eval_shape(lambda sp=sp: registry.build_channel(
          sp["channel"], rngs=nnx.Rngs(0), d_model=s.d_model, **sp["kwargs"]))
      assert count_params(layer) == sp["params"], sp["name"]
  d = s.d_model
  for kind in ("peer", "ultramem"):
    m, fl, pa = specs[kind], specs[f"dense_flops~{kind}"], specs[f"dense_params~{kind}"]
    assert abs(fl["flops"] - m["flops"]) <= 3 * 2 * d  # hidden rounded to one unit (6 d FLOPs)
    assert abs(pa["params"] - m["params"]) <= 3 * d // 2 + 1
    assert pa["params"] > fl["params"] and pa["flops"] > m["flops"]  # the baselines differ
  assert specs["dense_params~peer"]["params"] > 10 * specs["dense_flops~peer"]["params"]
  # PEER at the default setup: 2 h n d_k + 2 d h d_k + 4 h k d with d_k = d / 2.
  assert specs["peer"]["flops"] == 2 * 4 * 32 * 16 + 2 * 32 * 4 * 16 + 4 * 4 * 8 * 32


def test_make_source_memorization_branch():
  c = configs_lib.base_config("tiny")
  c.data.name, c.data.seq_len, c.data.vocab_size, c.data.num_facts = "memorization", 8, 33, 5
  src = make_source(c.data, seed=3)
  assert isinstance(src, MemorizationSource) and src.num_facts == 5 and src.seed == 3
  assert src.batch(0)["inputs"].shape == (c.data.batch_size, 8)
  c.data.num_facts = 0  # 0 = every fact
  assert make_source(c.data, seed=0).facts[0].size == 16


@pytest.mark.slow  # the cost model and the data branch: the tests above
def test_micro_run_writes_table_and_json(tmp_path):
  logs = []
  out = mem.run_experiment(TINY, str(tmp_path), rows=("peer", "dense_flops", "none"),
                           log=logs.append)
  names = [r["name"] for r in out["rows"]]
  assert names == ["peer", "dense_flops~peer", "none"]
  table = open(out["paths"]["md"]).read()
  for n in names:
    assert f"| {n} |" in table
  data = json.load(open(out["paths"]["json"]))
  assert data["setup"]["vocab_size"] == 64 and len(data["rows"]) == 3
  for r in data["rows"]:
    assert r["steps"] == 3 and 0.0 <= r["accuracy"] <= 1.0 and r["wall_sec"] > 0
  # The LM's total parameters = the shared shell + the channel layer's.
  shell = next(r for r in data["rows"] if r["name"] == "none")["num_params"]
  for r in data["rows"]:
    assert r["num_params"] == shell + r["params"] + (16 if r["channel"] != "none" else 0)
  # Resumable: finished rows are read back, not retrained.
  again = mem.run_experiment(TINY, str(tmp_path), rows=("peer",), log=logs.append)
  assert again["rows"][0]["wall_sec"] == data["rows"][0]["wall_sec"]
  assert len(logs) == 3 + 1 + 1 + 1  # one line per row and one per table
  # Dense rows follow the memory rows asked for.
  assert [sp["name"] for sp in mem.row_specs(TINY, ("ultramem", "dense_params"))] == [
      "ultramem", "dense_params~ultramem"]


def test_unknown_row_fails(tmp_path):
  with pytest.raises(ValueError, match="unknown rows"):
    mem.run_experiment(TINY, str(tmp_path), rows=("peer", "moe"))
