# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of the memarch zoo
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/memarch/memarch/blob/main/notebooks/zoo_tour.ipynb)
#
# Every registered sequence mixer (attention, sliding windows, Gated DeltaNet, Mixture-of-Memories,
# landmark attention, HCAM and the four Titans variants) trained at tiny size on the **same small
# MQAR budget**, then compared by recall accuracy against the size of the state each one carries
# (the Zoology / Based recall-memory trade-off). Last, two models on BABILong-style long-context
# questions, evaluated segment by segment through their recurrent state.
#
# The notebook only calls `memarch.evals` helpers. With the full budget the sweep takes a while on a
# CPU (each run is capped at a minute); set `MEMARCH_NOTEBOOK_FAST=1` for a smoke test on two mixers
# (how CI runs it).

# %% [markdown]
# ## Install
#
# In Colab this installs memarch from GitHub; where memarch is already importable the cell does
# nothing.

# %%
import importlib.util

if importlib.util.find_spec("memarch") is None:
  # !pip install -q "git+https://github.com/memarch/memarch"
  importlib.invalidate_caches()

# %% [markdown]
# The BABILong recipe is a config file in the repository's `configs/` folder, which a pip install
# does not carry: find a checkout, else fetch one.

# %%
import os

import jax
from IPython.display import Image, Markdown, display

from memarch.evals import mqar_sweep

FAST = os.environ.get("MEMARCH_NOTEBOOK_FAST") == "1"
REPO = next((p for p in (os.getcwd(), os.path.dirname(os.getcwd()), mqar_sweep.ROOT)
             if os.path.exists(os.path.join(p, "configs", "babilong.py"))), None)
if REPO is None:
  # !git clone -q --depth 1 https://github.com/memarch/memarch memarch_src
  REPO = os.path.abspath("memarch_src")
OUT = os.path.abspath("runs/zoo_tour_fast" if FAST else "runs/zoo_tour")
print(f"jax {jax.__version__} on {jax.default_backend()}; configs from {REPO}; fast mode: {FAST}")

# %% [markdown]
# ## The registry
#
# A mixer is a name in `memarch.registry.SEQUENCE_MIXERS` pointing at a Flax NNX module and its
# config dataclass. Registering is all it takes to appear in this tour and in the conformance tests.

# %%
from memarch import registry

for name, (module, cls, cfg_cls, _) in registry.SEQUENCE_MIXERS.items():
  print(f"{name:16s} {module}.{cls}  ({cfg_cls})")

# %% [markdown]
# ## One MQAR budget for everyone
#
# `run_sweep` trains each mixer in the tiny LM shell (2 layers, d_model 64, SwiGLU channel mixer) on
# MQAR, stops a run at 0.99 accuracy, the step budget or the wall-time cap, keeps the best run over
# the learning rates, and writes a table and the accuracy vs state-size plot. Finished runs are read
# back, so re-running the cell is instant.

# %%
MIXERS = ["attention", "gated_deltanet"] if FAST else list(registry.SEQUENCE_MIXERS)
SETTINGS = [(32, 2)] if FAST else [(64, 4)]  # (seq_len, key-value pairs)
BUDGET = (dict(max_steps=2, batch_size=8, eval_examples=8, eval_every=2) if FAST else
          dict(max_steps=500, max_seconds=60.0, batch_size=32, eval_examples=256, eval_every=50))
sweep = mqar_sweep.run_sweep(MIXERS, SETTINGS, d_models=[32 if FAST else 64], lrs=[3e-3],
                             out_dir=os.path.join(OUT, "mqar"), **BUDGET)

# %% [markdown]
# The table: accuracy on held-out MQAR examples, steps used, and the state each layer carries at
# batch 1 (attention's KV cache grows with the sequence; recurrent states do not).

# %%
display(Markdown(open(sweep["paths"]["md"]).read()))

# %% [markdown]
# Accuracy against state bytes per layer: more state buys more recall, and the question each
# architecture answers is how efficiently.

# %%
display(Image(sweep["paths"]["png"]))

# %% [markdown]
# `state_bytes_per_layer` is the helper behind the x axis: it builds the model abstractly and sums
# the bytes of every layer's `init_state(1, max_len=seq_len)`. Attention's cache grows with the
# context; a recurrent memory's does not:

# %%
for seq_len in (64, 256, 1024):
  sizes = {name: max(mqar_sweep.state_bytes_per_layer(mqar_sweep.load_named_config(name), seq_len))
           for name in ("attention", "gated_deltanet")}
  print(f"seq_len {seq_len:5d}: " + ", ".join(f"{k} {v:,} B" for k, v in sizes.items()))

# %% [markdown]
# ## BABILong-style long context, two models
#
# `configs/babilong.py` trains on generated qa1-qa5 stories (byte tokens, loss on the answer only);
# `memarch.evals.runner.run_evals` then asks questions about longer stories, fed segment by segment
# through the recurrent state (`memarch.evals.long_context.StreamingRunner`), and scores the answer
# by restricted argmax over the task's labels. These are tiny budgets: the point is the pipeline,
# not the numbers.

# %%
from memarch import configs_lib
from memarch.evals import runner
from memarch.train import train_and_evaluate

ARCHS = ["transformer", "gated_deltanet"]
EVAL = (dict(lengths=[340], tasks=["qa1"], num_examples=2, segment_len=64, batch_size=2) if FAST else
        dict(lengths=[256, 512, 1024], tasks=["qa1", "qa2"], num_examples=20, segment_len=256,
             batch_size=8))
results = {}
for arch in ARCHS:
  c = configs_lib.load_config(os.path.join(REPO, "configs", "babilong.py") +
                              f":arch={arch},seq_len={128 if FAST else 256},"
                              f"steps={2 if FAST else 300},tasks={'+'.join(EVAL['tasks'])}")
  c.train.progress = False
  c.train.ckpt_every = 0
  if FAST:
    c.model.d_model, c.model.num_layers, c.data.batch_size, c.opt.warmup_steps = 16, 1, 4, 1
  workdir = os.path.join(OUT, "babilong", arch)
  train_and_evaluate(c, workdir, quiet=True)
  results[arch] = runner.run_evals(workdir, "babilong", log=lambda m: None, **EVAL)["babilong"]
  print(arch, {k: round(v, 3) for k, v in results[arch]["result"]["mean"].items()})

# %% [markdown]
# The heatmaps (task x context length; the last row is the mean over tasks):

# %%
for arch in ARCHS:
  display(Image(results[arch]["png"]))
