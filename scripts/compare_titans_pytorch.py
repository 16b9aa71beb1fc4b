"""Titans MAC here vs the public PyTorch implementation (titans-pytorch 0.5.5), in one run.

Both train on the same MQAR batches (vocab 256, batch 64, seq_len 64, 4 kv pairs unless changed),
evaluated on the same held-out examples every `--eval_every` steps, until accuracy >= 0.99 or the
time budget runs out; prints steps and wall time to 0.99 for each, and writes JSON.

  pip install torch==2.13.0 titans-pytorch==0.5.5   # in any environment that also has memarch
  python scripts/compare_titans_pytorch.py --budget_s=600

The PyTorch model is lucidrains' MemoryAsContextTransformer with dim 64, depth 2, segment 32 and a
depth-2 memory MLP (the setting of the README's comparison); it is run as published, deviations and
all (docs/architectures/titans.md, "Against titans-pytorch").
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from memarch.data import mqar


def run_ours(args):
  from memarch import configs_lib
  from memarch.train import train_and_evaluate
  cfg = configs_lib.load_config(f"configs/titans.py:variant={args.variant}")
  cfg.unlock()
  cfg.data.seq_len, cfg.data.num_kv_pairs = args.seq_len, args.kv
  cfg.data.batch_size, cfg.data.eval_examples = args.batch, args.eval_examples
  cfg.train.eval_every = args.eval_every
  cfg.train.time_budget_s = args.budget_s
  cfg.train.num_steps = max(cfg.train.num_steps, args.max_steps)
  cfg.train.progress = False
  cfg.lock()
  workdir = os.path.join(args.out, f"memarch_{args.variant}_{args.seq_len}_{args.kv}")
  t = time.time()
  out = train_and_evaluate(cfg, workdir, quiet=True)
  return dict(impl="memarch", steps=out["step"], wall_s=time.time() - t,
              accuracy=out.get("eval/accuracy"), reached=bool(out["stopped_early"]))


def run_pytorch(args):
  import torch
  from titans_pytorch import MemoryAsContextTransformer, MemoryMLP
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  model = MemoryAsContextTransformer(
      num_tokens=args.vocab, dim=64, depth=2, segment_len=32, num_persist_mem_tokens=4,
      num_longterm_mem_tokens=4, neural_memory_layers=(1, 2),
      neural_memory_model=MemoryMLP(dim=64, depth=2))
  opt = torch.optim.AdamW(model.parameters(), lr=args.torch_lr, weight_decay=0.1)
  src = mqar.MQARSource(args.seq_len, args.kv, args.vocab, args.batch, seed=0)
  ev = src.eval_set(args.eval_examples)
  t0, step, acc = time.time(), 0, 0.0
  while time.time() - t0 < args.budget_s:
    b = src.batch(step)
    x, y = torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long()
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab), y.reshape(-1),
                                             ignore_index=-100)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    step += 1
    if step % args.eval_every == 0:
      with torch.no_grad():
        preds = []
        for i in range(0, len(ev["inputs"]), args.batch):
          preds.append(model(torch.from_numpy(ev["inputs"][i:i + args.batch]).long()).argmax(-1).numpy())
      acc = mqar.accuracy(np.concatenate(preds), ev["targets"])
      if acc >= 0.99:
        break
  return dict(impl="titans-pytorch 0.5.5", steps=step, wall_s=time.time() - t0, accuracy=acc,
              reached=acc >= 0.99)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="mac")
  p.add_argument("--seq_len", type=int, default=64)
  p.add_argument("--kv", type=int, default=4)
  p.add_argument("--vocab", type=int, default=256)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--eval_examples", type=int, default=1000)
  p.add_argument("--eval_every", type=int, default=50)
  p.add_argument("--budget_s", type=float, default=600)
  p.add_argument("--max_steps", type=int, default=0, help="ours: at least this many steps "
                 "(the cosine schedule's length); 0 = the config's")
  p.add_argument("--torch_lr", type=float, default=3e-3)
  p.add_argument("--only", default="both", choices=["both", "memarch", "pytorch"])
  p.add_argument("--out", default="runs/compare_titans")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rows = []
  if args.only in ("both", "memarch"):
    rows.append(run_ours(args))
    print(rows[-1], flush=True)
  if args.only in ("both", "pytorch"):
    rows.append(run_pytorch(args))
    print(rows[-1], flush=True)
  print("\nimpl | steps | wall s | accuracy | reached 0.99")
  for r in rows:
    print(f"{r['impl']} | {r['steps']} | {r['wall_s']:.0f} | {r['accuracy']:.3f} | {r['reached']}")
  with open(os.path.join(args.out, f"compare_{args.seq_len}_{args.kv}.json"), "w") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
