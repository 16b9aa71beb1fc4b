"""recipe=paper, the paper size presets, model FLOPs per token (memarch.flops) and the dry run
(memarch.dry_run, scripts/train.py --dry_run); docs/recipes.md."""
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from memarch import configs_lib, dry_run, flops
from memarch.lm import LM, count_params
from memarch.sharding import mesh_context

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _config(spec, **overrides):
  c = configs_lib.load_config(os.path.join(ROOT, spec))
  c.unlock()
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  c.lock()
  return c


def test_paper_recipe_numbers():
  """The recipe's numbers are the papers' (docs/recipes.md has the sources)."""
  c = _config("configs/transformer.py:size=340m,recipe=paper")
  assert (c.data.seq_len, c.data.batch_size * c.data.seq_len) == (4096, 524_288)
  assert c.data.batch_size % c.opt.grad_accum == 0
  assert (c.opt.lr, c.opt.weight_decay, c.opt.clip_norm) == (1.5e-3, 0.1, 1.0)
  assert (c.opt.schedule, c.opt.min_lr_ratio) == ("cosine", 0.1)
  assert c.opt.warmup_steps == 1907                     # 1B tokens / 524,288
  assert c.train.num_steps == 28_610                    # 15B tokens
  assert (c.model.vocab_size, c.data.tokenizer, c.data.name) == (32_000, "bpe", "shakespeare")
  c13 = _config("configs/titans.py:size=1.3b,recipe=paper,accum=32")
  assert (c13.model.d_model, c13.model.num_layers, c13.model.num_heads) == (2048, 18, 8)
  assert (c13.opt.lr, c13.train.num_steps, c13.opt.grad_accum) == (7e-4, 190_735, 32)
  assert _config("configs/gated_deltanet.py:size=1.3b,recipe=paper").opt.lr == 4e-4
  with pytest.raises(ValueError, match="recipe=paper needs size"):
    _config("configs/transformer.py:recipe=paper")
  with pytest.raises(ValueError, match="unknown recipe"):
    _config("configs/mom.py:size=170m,recipe=papers")
  with pytest.raises(ValueError, match="text recipe"):
    _config("configs/landmark.py:size=170m,task=passkey,recipe=paper")


def test_new_train_keys_are_checked():
  for key, value, match in (("train.peak_flops", -1.0, "peak_flops=-1.0 must be >= 0"),
                            ("train.profile_steps", "3,2", "1 <= a <= b"),
                            ("train.profile_steps", "x", "must be 'a,b'"),
                            ("train.profile_steps", "0,2", "1 <= a <= b")):
    with pytest.raises(ValueError, match=match):
      configs_lib.validate(_config("configs/transformer.py", **{key: value}))
  assert configs_lib.profile_steps("2, 4") == (2, 4)
  assert configs_lib.profile_steps("5") == (5, 5)
  assert configs_lib.profile_steps("") is None


def test_flops_match_xla_cost_analysis():
  """The Transformer++ formula against XLA's count of a compiled forward: XLA computes the masked
  attention in full, so it is compared with causal=False; XLA also counts the elementwise work the
  formula leaves out (norms, softmax, RoPE, SiLU), 1.6-2.5% here, hence the 4% tolerance. Leaving
  out the attention term (13% of the forward here) or the head (22%) fails."""
  c = _config("configs/transformer.py:size=small")
  t, b = 128, 2
  lm_cfg = configs_lib.lm_config(c, c.data.vocab_size)
  with mesh_context():
    model = LM(lm_cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(
      state, jnp.zeros((b, t), jnp.int32)).compile()
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / (b * t)
  f = flops.flops_per_token(lm_cfg, nnx.state(model, nnx.Param), t, causal=False)
  assert abs(xla / f.forward - 1) < 0.04, (xla, f)
  assert f.train == 3 * f.forward
  # the hand count: 2 x (4 d^2 + 3 d h_ffn) per layer + 2 d V for the head; attention 4 d T
  d, layers, v, hidden = 128, 4, 256, 344
  assert f.dense == layers * 2 * (4 * d * d + 3 * d * hidden) + 2 * d * v
  assert f.sequence == layers * 4 * d * t
  causal = flops.flops_per_token(lm_cfg, nnx.state(model, nnx.Param), t)
  assert causal.sequence == layers * 4 * d * (t + 1) / 2


def test_flops_of_the_other_families():
  """Per-family terms: the gated delta rule's chunk cost per head (bench.py's formula), MoM's
  active memories only, sliding windows, and the Titans memory MLP's 8 P per token and head."""
  assert flops.recurrence_flops_per_token("gated_delta_rule", 128, 128, 64) == 6 * 128 * 128 + 2 * 64 * 640
  assert flops.causal_context(8, 2) == (1 + 2 * 7) / 8
  assert flops.causal_context(8) == 4.5
  from layers.deltanet import GatedDeltaNetConfig
  from layers.mom import MoMConfig
  from layers.titans import TitansConfig
  gdn = flops.mixer_sequence_flops("gated_deltanet", GatedDeltaNetConfig(64, 2, chunk_size=16), 64)
  mom = flops.mixer_sequence_flops("mom", MoMConfig(64, 2, num_memories=4, top_k=2, chunk_size=16), 64)
  assert mom == 3 * gdn == 3 * 2 * flops.recurrence_flops_per_token("gated_delta_rule", 32, 32, 16)
  lmm = flops.mixer_sequence_flops("titans_lmm", TitansConfig(64, 2, memory_depth=2, expansion=4), 64)
  assert lmm == 2 * 8 * (2 * 32 * 128)
  with mesh_context():
    cfg = configs_lib.lm_config(_config("configs/mom.py"), 256)
    model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  f = flops.flops_per_token(cfg, nnx.state(model, nnx.Param), 64)
  # by hand, per layer (d 64, 2 heads of 32, 4 memories): shared q, convs, gate, output, router and
  # shared memory's k, v, beta, alpha; the 4 memories' k, v, beta, alpha at top_k / M = 1/2; SwiGLU
  d, m = 64, 4
  shared = d * d + 3 * 4 * d + 2 * d * d + d * m + 2 * d * 2 + 2 * d * d
  routed = m * (2 * d * d + 2 * d * 2) / 2
  swiglu = 3 * d * 176
  assert f.dense == 2 * cfg.num_layers * (shared + routed + swiglu) + 2 * d * 256
  # top_k = 2 routed memories + the shared one, 2 heads, chunk 64 (the config's)
  assert f.sequence == cfg.num_layers * 3 * 2 * flops.recurrence_flops_per_token(
      "gated_delta_rule", 32, 32, 64)


def _independent_count(c) -> int:
  """Parameter count of the config's model without memarch.dry_run: models of one and two blocks
  built here (cheap), the count being linear in the number of identical blocks."""
  counts = []
  for layers in (1, 2):
    lm_cfg = dataclasses.replace(configs_lib.lm_config(c, c.model.vocab_size or c.data.vocab_size),
                                 num_layers=layers)
    with mesh_context():
      counts.append(count_params(nnx.eval_shape(lambda: LM(lm_cfg, rngs=nnx.Rngs(1)))))
  return counts[0] + (c.model.num_layers - 1) * (counts[1] - counts[0])


@pytest.mark.parametrize("spec", ["configs/transformer.py:size=340m",
                                  pytest.param("configs/titans.py:size=340m", marks=pytest.mark.slow)])
def test_dry_run_parameter_count_is_exact(spec):
  c = _config(spec)
  r = dry_run.plan(c)
  assert r.params_total == _independent_count(c)
  assert r.params_embedding == c.data.vocab_size * 1024
  if spec.startswith("configs/transformer"):
    # by hand: per layer 4 d^2 (attention) + 3 d h (SwiGLU, h = 2736) + 2 d (norms); final norm
    d, h = 1024, 2736
    assert r.params_non_embedding == 24 * (4 * d * d + 3 * d * h + 2 * d) + d
  assert r.tokens_per_step == 256 * 512
  # float32 params, Adam's two float32 moments, the float32 gradient accumulator
  assert r.memory.params == 4 * r.params_total
  assert r.memory.optimizer >= 8 * r.params_total
  assert r.memory.state_per_device == pytest.approx(
      (r.memory.params + r.memory.optimizer + r.memory.grads) / 1)
  assert r.flops.train > 6 * r.params_non_embedding


def test_dry_run_cli():
  """`--dry_run` prints the plan and exits 0 without training: no workdir is written."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                      "--config=configs/transformer.py:size=340m,recipe=paper", "--dry_run",
                      "--config.mesh.fsdp=4", "--workdir=never_written"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  out = r.stdout
  assert "parameters: 335,201,280 total = 32,768,000 embedding" in out
  assert "tokens per optimizer step: 524,288" in out
  assert "/ fsdp x tensor = 4" in out and "ROUGH" in out
  assert not os.path.exists(os.path.join(ROOT, "never_written"))
