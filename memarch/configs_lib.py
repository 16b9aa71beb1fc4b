"""Config helpers shared by every `configs/<family>.py` (docs/design.md, "Conventions").

A config file defines `get_config(arg=None)`; `arg` is the text after ':' in
`--config=configs/titans.py:variant=mag,size=tiny`, parsed by `parse_arg`. Configs are locked
ConfigDicts, so an unknown override key fails; at the module boundary they become frozen dataclasses
(`lm_config`, `opt_config`).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any

import ml_collections

# Shared size presets. CPU presets use the small MQAR vocabulary (256): at Zoology's 8192 a
# d_model-64 model needs tens of thousands of steps before recall appears. The paper sizes (170m to
# 1.3b) have the blocks, width and heads of Titans' Table 5 ("Architectural Details", Behrouz et
# al., arXiv 2501.00663, Appendix E.1 of the NeurIPS 2025 revision); their names are the papers'
# model sizes, not this zoo's parameter counts, which differ per family (docs/recipes.md).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, num_layers=2, num_heads=2, mqar_vocab=256, batch_size=64,
                 seq_len=64, num_kv_pairs=4),
    "small": dict(d_model=128, num_layers=4, num_heads=4, mqar_vocab=256, batch_size=64,
                  seq_len=128, num_kv_pairs=8),
    "base": dict(d_model=256, num_layers=4, num_heads=4, mqar_vocab=8192, batch_size=256,
                 seq_len=256, num_kv_pairs=16),
    "170m": dict(d_model=768, num_layers=12, num_heads=16, mqar_vocab=8192, batch_size=256,
                 seq_len=512, num_kv_pairs=64),
    "340m": dict(d_model=1024, num_layers=24, num_heads=16, mqar_vocab=8192, batch_size=256,
                 seq_len=512, num_kv_pairs=64),
    "760m": dict(d_model=1536, num_layers=24, num_heads=16, mqar_vocab=8192, batch_size=256,
                 seq_len=512, num_kv_pairs=64),
    "1.3b": dict(d_model=2048, num_layers=18, num_heads=8, mqar_vocab=8192, batch_size=256,
                 seq_len=512, num_kv_pairs=64),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'k1=v1,k2=v2' into a ConfigDict over `defaults`; values are Python literals or strings.

  Keys not in `defaults` fail, so 'varaint=mag' is caught.
  """
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    if "=" not in part:
      raise ValueError(f"config arg {part!r} is not key=value (e.g. 'variant=mag,size=tiny')")
    key, value = part.split("=", 1)
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; valid: {sorted(defaults)}")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    out[key] = value
  return ml_collections.ConfigDict(out)


def size_preset(size: str) -> dict[str, Any]:
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
  return SIZES[size]


def base_config(size: str = "tiny") -> ml_collections.ConfigDict:
  """Every key the project relies on, with defaults; family configs fill in `model` and `data`."""
  p = size_preset(size)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      d_model=p["d_model"], num_layers=p["num_layers"], num_heads=p["num_heads"],
      vocab_size=0,  # 0: taken from the data
      layer_pattern=("attention",),
      mixer=ml_collections.ConfigDict({"attention": {}}),
      channel_pattern=("swiglu",),
      channel=ml_collections.ConfigDict({"swiglu": {}}),
      tie_embeddings=True, dtype="float32",
      # Storage dtype of the parameters (float32 | bfloat16; the optimizer's state stays float32)
      # and per-block rematerialisation (none | dots | full); memarch.lm, docs/design.md:
      param_dtype="float32", remat="none",
      scan_layers=False))  # the blocks as a lax.scan over pattern periods: faster compiles
  c.data = ml_collections.ConfigDict(dict(
      name="mqar", seq_len=p["seq_len"], batch_size=p["batch_size"],
      num_kv_pairs=p["num_kv_pairs"], vocab_size=p["mqar_vocab"], power_a=0.01,
      random_non_queries=False, eval_examples=1000,
      # Real text (data.name = 'shakespeare' for the embedded plays, 'text' for local files,
      # 'tfds' for a prepared TFDS dataset; docs/data.md). tokenizer: byte | sentencepiece (with
      # spm_model) | bpe (a byte-level BPE of data.vocab_size ids trained on the training split,
      # saved as <workdir>/tokenizer.json) | /path/to/tokenizer.json. Held-out split: the fixed
      # plays, eval_paths (local files) or tfds_eval_split; eval_rows of it are scored every
      # train.eval_every steps (loss, bits per byte, perplexity):
      paths=(), eval_paths=(), tfds_name="", tfds_data_dir="", tfds_split="train",
      tfds_eval_split="", text_key="text", tokenizer="byte", spm_model="", pack=True, eval_rows=32,
      # BABILong-style qa1-qa5 (data.name = 'babilong'); length 0 = fit the context to data.seq_len:
      babilong_tasks=("qa1", "qa2", "qa3", "qa4", "qa5"), babilong_length=0,
      # Passkey / S-NIAH-1 (data.name = 'passkey' | 'niah'); depth < 0 = uniform per example;
      # prompt_loss: loss on every token of the row (language modelling), not only the answer;
      # landmark_block L > 0: rows in landmark attention's layout (a landmark token after every
      # L - 1 content tokens; scripts/eval.py inserts them the same way):
      needle_depth=-1.0, niah_needles=1, niah_queries=1, prompt_loss=False, landmark_block=0,
      # MAD memorization (data.name = 'memorization'; uses seq_len, vocab_size, batch_size): the
      # number of stored facts M, 0 = all (vocab_size - 1) // 2:
      num_facts=0))
  c.opt = ml_collections.ConfigDict(dict(
      lr=3e-3, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, schedule="cosine",
      warmup_steps=50, decay_fraction=0.2, min_lr_ratio=0.0, grad_accum=1,
      decay_memory_init=False, decay_gains=True,
      # Adam's first moment (float32 | bfloat16) and how bfloat16 parameters round their update
      # (stochastic | nearest); memarch.optim.float32_state:
      mu_dtype="float32", update_rounding="stochastic"))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=1000, log_every=25, eval_every=100, ckpt_every=250, keep_checkpoints=3,
      stop_at_accuracy=0.0,  # > 0: stop once eval/accuracy reaches it (Zoology stops at 0.99)
      time_budget_s=0.0,  # > 0: stop (with an eval) once this much wall time, compile included, is used
      skip_nonfinite=False, progress=True, aux_loss_weights=ml_collections.ConfigDict({}),
      stats_every=0,  # > 0: log layer statistics (memory surprise, gates) every N steps
      # A finished run (num_steps reached, stop_at_accuracy, time_budget_s or a non-finite stop;
      # <workdir>/finished.json) stays finished on a rerun; True trains on from its last checkpoint.
      continue_finished=False,
      # Throughput and tracing (docs/recipes.md): peak_flops > 0 (FLOP/s of ONE device, e.g. 989e12
      # for an H100 SXM in bf16) logs train/mfu; profile_steps "a,b" writes a jax.profiler trace of
      # steps a..b to <workdir>/profile/; wandb_project sends the metrics rows to Weights & Biases
      # too (needs the wandb package; "" = off).
      peak_flops=0.0, profile_steps="", wandb_project=""))
  # distributed=True: one process per host (memarch.sharding.maybe_initialize_distributed); the
  # coordinator is found from the environment unless coordinator_address ("host:port") is given,
  # with num_processes and process_id (docs/design.md, "Multi-host runs").
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0,  # 0 = all
                                          distributed=False, coordinator_address="",
                                          num_processes=0, process_id=-1))
  # None: each op's best available path; a name of pallas_kernels._dispatch.Implementation forces
  # that path in every mixer whose own `implementation` is None.
  c.kernels = ml_collections.ConfigDict(dict(implementation=impl_field()))
  c.evals = ml_collections.ConfigDict(dict(names=("mqar",)))
  return c


def impl_field():
  """A kernel-implementation config field: None (best available) until set to a name of
  `pallas_kernels._dispatch.Implementation`; typed str, so a command-line override
  (`--config.kernels.implementation=xla`) parses."""
  return ml_collections.config_dict.placeholder(str)


def passkey_task(c, a) -> None:
  """task=passkey: train on passkey rows of `seq_len` (default 512) byte tokens, language-model loss
  on the whole row (memarch.data.needle.PasskeySource); scripts/eval.py then runs the passkey eval
  (exact match of the key's digits; Mohtashami & Jaggi 2023, arXiv 2305.16300) at 512 to 16k
  tokens, segment by segment through the mixer's cache or memory. Shared by the landmark and HCAM
  configs (`task=passkey`); `a` needs seq_len and steps."""
  c.data.name = "passkey"
  c.data.tokenizer = "byte"
  c.data.seq_len = a.get("seq_len", 0) or 512
  c.data.batch_size = 16
  # Language-model loss on the whole row (as the landmark paper trains): the repeated filler and the
  # key line's second copy of the key teach the copying (induction) circuit that the answer needs;
  # with the loss on the five answer digits alone, 250 steps left the digit loss at chance [ours].
  c.data.prompt_loss = True
  c.model.vocab_size = 0  # from the tokenizer (259 bytes + specials)
  c.opt.lr = 2e-3
  c.train.num_steps = a.get("steps", 0) or 2400
  c.train.stop_at_accuracy = 0.0  # no fixed eval set in the stream; train the full budget
  c.train.eval_every = 0
  c.train.ckpt_every = 200
  c.evals.names = ("passkey",)
  c.evals.lengths = (512, 1024, 2048, 4096, 8192, 16384)
  c.evals.depths = (0.0, 0.25, 0.5, 0.75, 1.0)
  c.evals.num_examples = 16
  c.evals.segment_len = 512


def text_task(c, a) -> None:
  """task=text: language modelling on the embedded Shakespeare plays (data.name=shakespeare, 34
  training plays packed into rows of `seq_len` byte tokens, default 512; docs/data.md), with the
  held-out plays scored every 100 steps (eval/loss, eval/bits_per_byte, eval/perplexity) and
  scripts/eval.py's perplexity eval at 512 to 4k tokens, streamed through the mixer's state in
  training-length segments. Packed rows carry segment ids, so only mixers that reset at document
  boundaries run; the others refuse with one line. `--config.data.tokenizer=bpe` switches to a
  byte-level BPE of data.vocab_size ids (default here 4096). `a` may hold seq_len and steps."""
  c.data.name = "shakespeare"
  c.data.tokenizer = "byte"
  c.data.vocab_size = 4096  # read only by data.tokenizer=bpe
  c.data.seq_len = a.get("seq_len", 0) or 512
  c.data.batch_size = 16
  c.data.pack = True
  c.data.eval_rows = 32
  c.model.vocab_size = 0  # from the tokenizer
  c.opt.lr = 2e-3
  c.opt.warmup_steps = 100
  c.train.num_steps = a.get("steps", 0) or 2000
  c.train.stop_at_accuracy = 0.0  # language modelling: train the full budget
  c.train.eval_every = 100
  c.train.ckpt_every = 250
  c.evals.names = ("perplexity",)
  c.evals.lengths = (512, 1024, 2048, 4096)
  c.evals.segment_len = c.data.seq_len


# ---- recipe=paper: the optimisation of the papers' language-modelling runs (docs/recipes.md) ----
# Titans (Behrouz et al., arXiv 2501.00663): §5.1 "Experimental Setup" of v1 (§4.1 in the NeurIPS
# 2025 revision) and Appendix E.1 of that revision; Gated DeltaNet (Yang, Kautz, Hatamizadeh, arXiv
# 2412.06464): §4 "Setup"; DeltaNet (Yang et al., arXiv 2406.06484): §5.1 "Training details".
PAPER_SEQ_LEN = 4096           # training length 4K: Titans §5.1, Gated DeltaNet §4
PAPER_ROWS_PER_STEP = 128      # 128 x 4096 = 524,288 tokens, the "0.5M tokens" batch of both papers
PAPER_VOCAB = 32000            # Llama 2 tokenizer, 32,000 ids: Gated DeltaNet §4 ("32K": Titans)
PAPER_WEIGHT_DECAY = 0.1       # Titans §5.1, Gated DeltaNet §4
PAPER_CLIP_NORM = 1.0          # Gated DeltaNet §4
PAPER_MIN_LR_RATIO = 0.1       # DeltaNet §5.1: cosine from 3e-4 to 3e-5; Titans/Gated DeltaNet say
                               # "cosine annealing" without the floor
PAPER_WARMUP_TOKENS = 1e9      # Gated DeltaNet §4: "a 1B token warm-up period"
# Peak learning rate and training tokens per size: Titans Table 5 (Appendix E.1, NeurIPS 2025
# revision); the v1 text states one rate, 4e-4, for all sizes (§5.1).
PAPER_LR = {"170m": 3e-3, "340m": 1.5e-3, "760m": 1.25e-3, "1.3b": 7e-4}
PAPER_TOKENS = {"170m": 15e9, "340m": 15e9, "760m": 30e9, "1.3b": 100e9}
# A family whose own paper states another rate: Gated DeltaNet §4 trains its 1.3B models at 4e-4.
PAPER_LR_BY_FAMILY = {"gated_deltanet": {"1.3b": 4e-4}}
# Micro-batches per step [ours: 8 rows of 4096 tokens per micro-batch; lower it on a larger mesh
# or with model.remat, raise it when the dry run's memory estimate exceeds the device].
PAPER_GRAD_ACCUM = 16


def paper_recipe(c, a, family: str) -> None:
  """recipe=paper (with task=text, which it implies): the papers' optimisation on top of
  `text_task`: rows of 4096 tokens, 128 rows (~0.5M tokens) per optimizer step in PAPER_GRAD_ACCUM
  micro-batches (`accum=N` overrides), AdamW with weight decay 0.1 and clipping 1.0, a 1B-token
  linear warmup then cosine decay to 10% of the peak, the size's peak rate and token budget, and a
  32,000-id vocabulary (a byte-level BPE trained on the training split: nothing is downloaded; the
  Llama 2 SentencePiece model, if you have the file, is one override away). Sizes 170m, 340m, 760m
  and 1.3b only. Every number's source is in the constants above and docs/recipes.md."""
  size = a.get("size", "")
  if size not in PAPER_LR:
    raise ValueError(f"{family}: recipe=paper needs size={'|'.join(PAPER_LR)} (got {size!r})")
  lr = PAPER_LR_BY_FAMILY.get(family, {}).get(size, PAPER_LR[size])
  c.data.seq_len = a.get("seq_len", 0) or PAPER_SEQ_LEN
  c.data.batch_size = PAPER_ROWS_PER_STEP
  c.data.tokenizer = "bpe"
  c.data.vocab_size = PAPER_VOCAB
  c.model.vocab_size = PAPER_VOCAB
  c.model.dtype = "bfloat16"  # [ours] accelerator compute dtype; parameters and moments stay float32
  # [ours] keep only the projections' outputs: the T x T attention scores of a 4096-token row are
  # recomputed in the backward pass instead of stored (the dry run's memory estimate shows why)
  c.model.remat = "dots"
  tokens_per_step = c.data.batch_size * c.data.seq_len
  c.opt.grad_accum = a.get("accum", 0) or PAPER_GRAD_ACCUM
  c.opt.lr = lr
  c.opt.weight_decay = PAPER_WEIGHT_DECAY
  c.opt.clip_norm = PAPER_CLIP_NORM
  c.opt.schedule = "cosine"
  c.opt.min_lr_ratio = PAPER_MIN_LR_RATIO
  c.opt.warmup_steps = round(PAPER_WARMUP_TOKENS / tokens_per_step)
  c.train.num_steps = a.get("steps", 0) or round(PAPER_TOKENS[size] / tokens_per_step)
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.ckpt_every = 1000
  c.evals.lengths = (c.data.seq_len, 2 * c.data.seq_len, 4 * c.data.seq_len)
  c.evals.segment_len = c.data.seq_len


TASKS = ("mqar", "passkey", "text")
RECIPES = ("", "paper")


def apply_task(c, a, family: str) -> None:
  """The `task=mqar|passkey|text` and `recipe=paper` options every family config shares: mqar keeps
  the family's MQAR setting (`steps=N`, when the config has it, sets the step count), passkey is
  `passkey_task`, text is `text_task`; recipe=paper is `paper_recipe` (implies task=text)."""
  recipe = a.get("recipe", "")
  if recipe not in RECIPES:
    raise ValueError(f"{family}: unknown recipe {recipe!r}; choose paper (or leave it out)")
  task = a.get("task", "mqar")
  if recipe == "paper":
    if task not in ("mqar", "text"):  # mqar is every config's default: the recipe makes it text
      raise ValueError(f"{family}: recipe=paper is a text recipe; use task=text, not task={task}")
    task = "text"
  if task == "passkey":
    passkey_task(c, a)
  elif task == "text":
    text_task(c, a)
    if recipe == "paper":
      paper_recipe(c, a, family)
  elif task != "mqar":
    raise ValueError(f"{family}: unknown task {task!r}; choose {', '.join(TASKS)}")
  elif a.get("steps", 0):
    c.train.num_steps = a.steps


def _get(c, dotted: str):
  node = c
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


# (key, lowest allowed value, what the key means) for the numbers every run reads. 0 where allowed
# means "off" / "only at the end" (eval_every, ckpt_every, stats_every, time_budget_s, ...).
_AT_LEAST: tuple[tuple[str, float, str], ...] = (
    ("data.batch_size", 1, "rows per step"),
    ("data.seq_len", 2, "tokens per row"),
    ("data.eval_examples", 1, "held-out examples of a synthetic task"),
    ("data.eval_rows", 1, "held-out rows of a text source"),
    ("train.num_steps", 1, "optimizer steps"),
    ("train.log_every", 1, "steps between logged metrics rows"),
    ("train.eval_every", 0, "steps between evals; 0 = only at the end"),
    ("train.ckpt_every", 0, "steps between checkpoints; 0 = only at the end"),
    ("train.keep_checkpoints", 1, "checkpoints kept on disk"),
    ("train.stats_every", 0, "steps between layer statistics; 0 = off"),
    ("train.time_budget_s", 0, "seconds of wall time; 0 = no budget"),
    ("train.stop_at_accuracy", 0, "eval accuracy that ends the run; 0 = never"),
    ("train.peak_flops", 0, "peak FLOP/s of one device, for train/mfu; 0 = not logged"),
    ("opt.warmup_steps", 0, "warmup steps"),
    ("opt.grad_accum", 1, "micro-batches per step"),
    ("opt.clip_norm", 0, "gradient-norm clip; 0 = none"),
    ("opt.weight_decay", 0, "decoupled weight decay"),
    ("model.d_model", 1, "model width"),
    ("model.num_layers", 1, "blocks"),
    ("model.num_heads", 1, "attention heads"),
    ("model.vocab_size", 0, "vocabulary; 0 = from the data"),
    ("mesh.num_devices", 0, "devices; 0 = all"),
)


def profile_steps(value) -> tuple[int, int] | None:
  """train.profile_steps -> (first, last) step to trace, None when off ('' or None). Accepts
  "a,b", "a" (one step) or a pair of ints; refuses anything else with one line."""
  if value is None or value == "" or value == ():
    return None
  parts = value if isinstance(value, (tuple, list)) else str(value).replace(" ", "").split(",")
  try:
    steps = [int(p) for p in parts]
  except (TypeError, ValueError):
    steps = []
  if len(steps) == 1:
    steps = steps * 2
  if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
    raise ValueError(f"train.profile_steps={value!r} must be 'a,b' with 1 <= a <= b (the first and "
                     "last step to trace), e.g. --config.train.profile_steps=10,12; '' = off")
  return steps[0], steps[1]


def validate(c: ml_collections.ConfigDict) -> None:
  """Refuses settings that cannot mean anything (a batch of 0 rows, logging every 0 steps, ...) with
  one ValueError line naming the key, before any data is read or program compiled."""
  for key, low, meaning in _AT_LEAST:
    v = _get(c, key)
    if v is None:
      continue
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise ValueError(f"{key}={v!r} must be a number ({meaning})")
    if not v >= low:  # also catches NaN
      raise ValueError(f"{key}={v} must be >= {low:g} ({meaning})")
  if _get(c, "train.stop_at_accuracy") is not None and c.train.stop_at_accuracy > 1:
    raise ValueError(f"train.stop_at_accuracy={c.train.stop_at_accuracy} must be in [0, 1] "
                     "(0 = never stop early)")
  for key in ("opt.b1", "opt.b2"):
    v = _get(c, key)
    if v is not None and not 0 <= v < 1:
      raise ValueError(f"{key}={v} must be in [0, 1) (Adam moment decay)")
  from memarch.lm import PARAM_DTYPES, REMAT  # the modules' own lists of choices
  from memarch.optim import MU_DTYPES, UPDATE_ROUNDINGS
  for key, choices in (("model.dtype", ("float32", "bfloat16", "float64")),
                       ("model.param_dtype", PARAM_DTYPES), ("model.remat", tuple(REMAT)),
                       ("opt.mu_dtype", MU_DTYPES), ("opt.update_rounding", UPDATE_ROUNDINGS)):
    v = _get(c, key)
    if v is not None and v not in choices:
      raise ValueError(f"{key}={v!r} is not one of {', '.join(choices)}")
  if _get(c, "train.profile_steps") is not None:
    profile_steps(c.train.profile_steps)
  project = _get(c, "train.wandb_project")
  if project is not None and not isinstance(project, str):
    raise ValueError(f"train.wandb_project={project!r} must be a project name (a string; '' = off)")
  if _get(c, "opt.grad_accum") and c.data.batch_size % c.opt.grad_accum:
    raise ValueError(f"data.batch_size={c.data.batch_size} is not divisible by "
                     f"opt.grad_accum={c.opt.grad_accum}")


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.lock()
  return c


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/titans.py:variant=mag' -> the config (for notebooks and tests)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  spec_ = importlib.util.spec_from_file_location(f"_memarch_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  return module.get_config(arg or None)


def _plain(x):
  if isinstance(x, ml_collections.ConfigDict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return type(x)(_plain(v) for v in x)
  return x


def to_dict(c: ml_collections.ConfigDict) -> dict:
  return _plain(c)


def to_json(c: ml_collections.ConfigDict) -> str:
  return json.dumps(to_dict(c), indent=2, sort_keys=True, default=str)


def lm_config(c: ml_collections.ConfigDict, vocab_size: int):
  """The typed model config (modules never read a ConfigDict)."""
  from memarch.lm import LMConfig
  m = c.model
  impl = c.kernels.implementation or None   # a config.json written before None stored ""
  mixer_kwargs = {name: dict(_plain(kw)) for name, kw in m.mixer.items()}
  for kw in mixer_kwargs.values():
    if "implementation" in kw:
      kw["implementation"] = kw["implementation"] or None
    if impl and kw.get("implementation") is None:   # the mixer's own choice wins
      kw["implementation"] = impl
  return LMConfig(
      vocab_size=m.vocab_size or vocab_size, d_model=m.d_model, num_layers=m.num_layers,
      num_heads=m.num_heads, layer_pattern=tuple(m.layer_pattern), mixer_kwargs=mixer_kwargs,
      channel_pattern=tuple(m.channel_pattern),
      channel_kwargs={name: dict(_plain(kw)) for name, kw in m.channel.items()},
      tie_embeddings=m.tie_embeddings, dtype=m.dtype,
      # a config.json written before these keys existed reads as the defaults
      param_dtype=m.get("param_dtype", LMConfig.param_dtype), remat=m.get("remat", LMConfig.remat),
      scan_layers=bool(m.get("scan_layers", LMConfig.scan_layers)))


def opt_config(c: ml_collections.ConfigDict):
  from memarch.optim import OptConfig
  return OptConfig(**_plain(c.opt))
