"""Fixed key->value memorization: PEER and UltraMemV2 against matched dense FFNs
(docs/architectures/peer.md; MAD memorization, Poli et al. 2024, arXiv 2403.17844).

  python -m memarch.evals.memorization --out=runs/memorization

Task: `memarch.data.memorization` (MAD): ONE key->value map of M facts, fixed for the dataset and
never shown in context; each sequence is L/2 "key, insert" pairs and the model must emit the key's
value at the insert token. Accuracy is over the insert positions of fresh test-split sequences of the
same facts, so it measures what the weights hold. Every run trains until eval accuracy >= 0.99
(`--stop_at`) or `--max_steps`; the table reports accuracy, the step reached and wall seconds.

Models [ours]: the LM shell with `--num_layers` attention blocks (default 1: attention only has to
move the key to the insert position, and the block's channel mixer is then the only layer that maps
keys to values). Only the channel mixer differs between rows:

  peer          PEER (n^2 experts, h heads, top-k) as every block's channel mixer.
  ultramem      UltraMemV2 (SwiGLU FFN + TDQKR memory) as every block's channel mixer.
  dense_flops   SwiGLU whose width gives the SAME ACTIVE FLOPs per token as the memory layer it is
                paired with: hidden = round(F / (6 d)), with F the memory layer's FLOPs per token,
                routing included (PEER: query 2 d h d_k + sub-key scores 2 h n d_k + experts 4 h k d,
                He 2024, §2; UltraMem: `layers.ultramem.memory_flops_per_token` plus its FFN).
  dense_params  SwiGLU whose width gives the SAME TOTAL PARAMETERS as the memory layer:
                hidden = round(P / (3 d)), P the memory layer's parameters (tables included), so the
                whole LM matches the memory model's parameter count to within 3 d per block.
  none          no channel mixer: the control. Attention plus the (trainable) embeddings alone can
                store the map, since a key's input embedding is a free vector per fact; this row
                shows how much of the task needs a channel mixer at all.

One dense FFN cannot match a memory layer in both active FLOPs and parameters at a fixed width, so
both baselines are run: at equal active FLOPs the memory layer has many more parameters (the claim
to test: more facts per active FLOP), at equal parameters the dense FFN spends
many more FLOPs. Reported per row: accuracy, steps, wall seconds, channel-layer active FLOPs per token
and parameters, and the LM's total parameters. Every row uses the same data, seed, optimizer and LR.

Written to `<out>`: memorization.json (rows and protocol) and memorization.md (the table); each run's
workdir is `<out>/runs/<name>` and finished runs are read back from its result.json (resumable).

Results of the default command: docs/results.md. Keep the no-channel control: with one-token keys
the key's input embedding alone can hold its fact, so at CPU sizes this task (MAD's layout) barely
separates channel mixers; a variant whose keys span several tokens (so that M exceeds what V x d
embeddings can store) would.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

ROWS = ("peer", "ultramem", "dense_flops", "dense_params", "none")


@dataclasses.dataclass(frozen=True)
class Setup:
  """One experiment's shared settings (every row uses them)."""
  vocab_size: int = 1024         # M <= (vocab - 1) // 2 facts (MAD uses 256)
  num_facts: int = 0             # 0 = all (vocab - 1) // 2
  seq_len: int = 32              # MAD memorization
  batch_size: int = 32
  d_model: int = 32
  num_layers: int = 1
  num_heads: int = 2
  lr: float = 3e-3
  max_steps: int = 800
  eval_every: int = 100
  eval_examples: int = 128
  stop_at: float = 0.99
  seed: int = 0
  # PEER
  peer_n: int = 32
  peer_heads: int = 4
  peer_k: int = 8
  # UltraMemV2
  um_n: int = 32
  um_k: int = 16
  um_ffn_hidden: int = 0         # 0 = layers.mlp's default 8/3 d


# ---- cost model (per token, one channel layer) ----

def peer_flops(d: int, n: int, h: int, k: int, dk: int) -> int:
  """PEER forward FLOPs per token (He 2024, §2): query, sub-key scores, expert reads."""
  return 2 * d * h * dk + 2 * h * n * dk + 4 * h * k * d


def peer_params(d: int, n: int, h: int, dk: int) -> int:
  return d * h * dk + 2 * n * (dk // 2) + 2 * n * n * d  # shared sub-keys (the default)


def swiglu_flops(d: int, hidden: int) -> int:
  return 6 * d * hidden


def swiglu_params(d: int, hidden: int) -> int:
  return 3 * d * hidden


def memory_layers(s: Setup) -> dict[str, dict]:
  """Channel-mixer kwargs, active FLOPs and parameters of the two memory layers."""
  from layers.peer import PEERConfig
  from layers.ultramem import (
    UltraMemConfig,
    ffn_flops_per_token,
    ffn_hidden_default,
    memory_flops_per_token,
  )
  d = s.d_model
  pc = PEERConfig(d, num_subkeys=s.peer_n, num_heads=s.peer_heads, top_k=s.peer_k)
  uc = UltraMemConfig(d, ffn_hidden=s.um_ffn_hidden or None, num_subkeys=s.um_n, top_m=s.um_k)
  um_hidden = s.um_ffn_hidden or ffn_hidden_default(d)
  r = uc.rank
  um_params = (swiglu_params(d, um_hidden) + 2 * r * d * uc.dk + 2 * r * s.um_n * uc.dk
               + uc.num_core_groups ** 2 * r * r + d * uc.dp + uc.dv * d + 2 * r * uc.dk
               + uc.num_rows * (uc.dp + uc.dv))
  return {
      "peer": dict(kwargs=dict(num_subkeys=s.peer_n, num_heads=s.peer_heads, top_k=s.peer_k),
                   flops=peer_flops(d, s.peer_n, s.peer_heads, s.peer_k, pc.dk),
                   params=peer_params(d, s.peer_n, s.peer_heads, pc.dk)),
      "ultramem": dict(kwargs=dict(num_subkeys=s.um_n, top_m=s.um_k,
                                   **({"ffn_hidden": s.um_ffn_hidden} if s.um_ffn_hidden else {})),
                       flops=memory_flops_per_token(uc) + ffn_flops_per_token(d, um_hidden),
                       params=um_params),
  }


def row_specs(s: Setup, rows: Sequence[str]) -> list[dict]:
  """(name, channel name, channel kwargs, FLOPs, params, matched-to) for every requested row."""
  mem = memory_layers(s)
  d = s.d_model
  specs = []
  # Dense baselines are matched to the memory rows asked for (to both when none is).
  kinds = [k for k in ("peer", "ultramem") if k in rows] or ["peer", "ultramem"]
  for kind in kinds:
    m = mem[kind]
    if kind in rows:
      specs.append(dict(name=kind, channel=kind, kwargs=m["kwargs"], flops=m["flops"],
                        params=m["params"], matched_to=""))
    if "dense_flops" in rows:
      hidden = max(1, round(m["flops"] / (6 * d)))
      specs.append(dict(name=f"dense_flops~{kind}", channel="swiglu", kwargs=dict(hidden=hidden),
                        flops=swiglu_flops(d, hidden), params=swiglu_params(d, hidden),
                        matched_to=f"{kind} active FLOPs"))
    if "dense_params" in rows:
      hidden = max(1, round(m["params"] / (3 * d)))
      specs.append(dict(name=f"dense_params~{kind}", channel="swiglu", kwargs=dict(hidden=hidden),
                        flops=swiglu_flops(d, hidden), params=swiglu_params(d, hidden),
                        matched_to=f"{kind} parameters"))
  if "none" in rows:
    specs.append(dict(name="none", channel="none", kwargs={}, flops=0, params=0, matched_to=""))
  return specs


def make_config(s: Setup, spec: dict):
  from memarch import configs_lib
  c = configs_lib.base_config("tiny")
  c.seed = s.seed
  c.model.d_model, c.model.num_layers, c.model.num_heads = s.d_model, s.num_layers, s.num_heads
  c.model.channel_pattern = (spec["channel"],)
  c.model.channel = {spec["channel"]: dict(spec["kwargs"])} if spec["channel"] != "none" else {}
  c.data.name = "memorization"
  c.data.vocab_size, c.data.seq_len, c.data.batch_size = s.vocab_size, s.seq_len, s.batch_size
  c.data.num_facts = s.num_facts
  c.data.eval_examples = s.eval_examples
  c.opt.lr = s.lr
  c.opt.warmup_steps = min(c.opt.warmup_steps, max(1, s.max_steps // 10))
  c.train.update(dict(num_steps=s.max_steps, eval_every=s.eval_every, ckpt_every=0,
                      log_every=s.eval_every, progress=False, stats_every=0,
                      stop_at_accuracy=s.stop_at))
  import jax
  if s.batch_size % jax.device_count():
    c.mesh.num_devices = 1
  return configs_lib.finalize(c)


def run_row(s: Setup, spec: dict, out_dir: str, *, quiet: bool = True) -> dict:
  from memarch.train import train_and_evaluate
  workdir = os.path.join(out_dir, "runs", spec["name"].replace("~", "_"))
  result_path = os.path.join(workdir, "result.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  cfg = make_config(s, spec)
  t0 = time.time()
  m = train_and_evaluate(cfg, workdir, quiet=quiet)
  row = dict(spec, accuracy=float(m.get("eval/accuracy", float("nan"))),
             eval_loss=float(m.get("eval/loss", float("nan"))), steps=int(m["step"]),
             reached=bool(m.get("stopped_early", False)), wall_sec=time.time() - t0,
             train_wall_sec=float(m["wall_sec"]), num_params=int(m["num_params"]), workdir=workdir)
  with open(result_path, "w") as f:
    json.dump(row, f, indent=2)
  return row


def markdown_table(s: Setup, rows: Sequence[dict]) -> str:
  m = s.num_facts or (s.vocab_size - 1) // 2
  lines = [f"# Fixed key->value memorization (MAD): M = {m} facts, vocab {s.vocab_size}, "
           f"L = {s.seq_len}, d_model {s.d_model}, {s.num_layers} layer(s), batch {s.batch_size}, "
           f"lr {s.lr:g}, stop at {s.stop_at} or {s.max_steps} steps", "",
           "| model | matched to | accuracy | steps | reached | wall s | channel FLOPs/token "
           "| channel params | total params |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['matched_to'] or '-'} | {r['accuracy']:.4f} | {r['steps']} | "
                 f"{'yes' if r['reached'] else 'no'} | {r['wall_sec']:.1f} | {r['flops']:,} | "
                 f"{r['params']:,} | {r['num_params']:,} |")
  return "\n".join(lines) + "\n"


def run_experiment(s: Setup, out_dir: str, rows: Sequence[str] = ROWS, log=None) -> dict:
  """Runs every row; writes memorization.{json,md} in out_dir; returns paths and rows."""
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  unknown = sorted(set(rows) - set(ROWS))
  if unknown or not rows:
    raise ValueError(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
  results = []
  for spec in row_specs(s, rows):
    r = run_row(s, spec, out_dir)
    log(f"memorization {r['name']}: accuracy {r['accuracy']:.4f} at step {r['steps']} "
        f"({r['wall_sec']:.1f}s, {r['num_params']:,} params)")
    results.append(r)
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f"memorization.{k}") for k in ("json", "md")}
  with open(paths["json"], "w") as f:
    json.dump({"rows": results, "setup": dataclasses.asdict(s)}, f, indent=2)
  with open(paths["md"], "w") as f:
    f.write(markdown_table(s, results))
  log(f"memarch: memorization table {paths['md']}")
  return {"paths": paths, "rows": results}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m memarch.evals.memorization", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  for f in dataclasses.fields(Setup):
    p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
  p.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
  p.add_argument("--out", default="runs/memorization")
  a = p.parse_args(argv)
  s = Setup(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Setup)})
  from memarch.train import TrainingError
  try:
    run_experiment(s, a.out, [r for r in a.rows.split(",") if r])
  except (TrainingError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
