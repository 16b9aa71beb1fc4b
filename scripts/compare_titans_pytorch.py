"""Wall time to 0.99 MQAR accuracy: our shipped Titans MAC default vs titans-pytorch 0.5.5.

Each side runs alone, in its own process (one after the other, so their thread pools never share
the CPU): ours is `scripts/train.py --config=configs/titans.py`; the peer is lucidrains'
MemoryAsContextTransformer (dim 64, depth 2, segment 32, depth-2 memory MLP) trained on exactly
our MQAR batches and evaluated on the same 1000 held-out examples every 50 steps, once per
learning rate. Prints a markdown table and writes JSON to --out. Run it on an idle machine.

  # the peer, in a separate environment (numpy + torch, no jax needed):
  python -m venv ~/peer-venv && ~/peer-venv/bin/pip install torch==2.13.0 titans-pytorch==0.5.5
  python scripts/compare_titans_pytorch.py --peer_python=~/peer-venv/bin/python --out=runs/compare_titans
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

T_START = time.time()  # this process's start (the peer's wall time counts from here)
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TARGET = 0.99
# The MQAR task of configs/titans.py (the peer trains on the same batches).
TASK = dict(seq_len=64, num_kv_pairs=4, vocab_size=256, batch_size=64, seed=0)
EVAL_EXAMPLES, EVAL_EVERY = 1000, 50


# ---- pure parts (unit-tested without torch or jax) ----

def summarize_ours(rows: list[dict], wall_s: float, target: float = TARGET) -> dict:
  """Our run from its metrics.jsonl rows: steps to `target` (first eval reaching it), the last
  eval accuracy, the median train/step_sec and train/compile_sec."""
  evals = [r for r in rows if "eval/accuracy" in r]
  hit = next((r["step"] for r in evals if r["eval/accuracy"] >= target), None)
  steps = [r["train/step_sec"] for r in rows if "train/step_sec" in r]
  compile_sec = next((r["train/compile_sec"] for r in rows if "train/compile_sec" in r), None)
  return dict(impl="memarch", setting="configs/titans.py (shipped default)",
              steps_to_target=hit, last_step=max((r["step"] for r in rows), default=0),
              final_accuracy=evals[-1]["eval/accuracy"] if evals else None,
              median_step_sec=statistics.median(steps) if steps else None,
              compile_sec=compile_sec, wall_s=wall_s,
              wall_to_target_s=wall_s if hit is not None else None)


def pick_best(peers: list[dict]) -> dict | None:
  """The peer run with the shortest wall time to the target; without one that reached it, the
  one with the highest final accuracy."""
  reached = [p for p in peers if p.get("wall_to_target_s") is not None]
  if reached:
    return min(reached, key=lambda p: p["wall_to_target_s"])
  return max(peers, key=lambda p: p.get("final_accuracy") or 0.0, default=None)


def ratios(ours: dict | None, best: dict | None) -> dict:
  """ours / peer-best for the median step time and the wall time to the target (None where a
  side lacks the number)."""
  def ratio(key):
    a, b = (ours or {}).get(key), (best or {}).get(key)
    return a / b if a is not None and b else None
  return dict(step_time=ratio("median_step_sec"), wall_to_target=ratio("wall_to_target_s"))


def _fmt_s(x: float | None, digits: int = 1) -> str:
  return "-" if x is None else f"{x:.{digits}f} s"


def table(ours: dict | None, peers: list[dict], target: float = TARGET) -> str:
  """The markdown table: one row for ours and one per peer learning rate."""
  lines = [f"| implementation | setting | steps to {target} | median training step | compile | "
           f"wall time to {target} |", "|---|---|---|---|---|---|"]
  for r in [ours, *peers] if ours else peers:
    if r.get("steps_to_target") is not None:
      steps = str(r["steps_to_target"])
    else:
      acc = r.get("final_accuracy")
      steps = f"not reached (accuracy {acc:.3f} at step {r['last_step']})" if acc is not None \
          else f"not reached (no eval by step {r['last_step']})"
    step_ms = "-" if r.get("median_step_sec") is None else f"{1000 * r['median_step_sec']:.1f} ms"
    lines.append(f"| {r['impl']} | {r['setting']} | {steps} | {step_ms} | "
                 f"{_fmt_s(r.get('compile_sec'))} | {_fmt_s(r.get('wall_to_target_s'))} |")
  return "\n".join(lines)


def report(ours: dict | None, peers: list[dict], cpus: int, date: str) -> tuple[str, dict]:
  """The printed report (table, ratios, date, CPU count) and its JSON."""
  best = pick_best(peers)
  rt = ratios(ours, best)
  fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
  text = (f"{table(ours, peers)}\n\nours / peer best ({best['setting'] if best else 'none'}): "
          f"median step {fmt(rt['step_time'])}, wall time to {TARGET} {fmt(rt['wall_to_target'])}"
          f"\n{date}, {cpus} CPUs")
  return text, dict(date=date, cpu_count=cpus, target=TARGET, ours=ours, peers=peers,
                    peer_best=best["setting"] if best else None, ratios=rt)


# ---- the two sides, each in its own process ----

def _env() -> dict:
  """The environment of both sides: this checkout's memarch first on the path (the peer reads our
  MQAR generator from it; a script's own folder, not the repository, heads sys.path)."""
  return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_ours(out: str) -> dict:
  workdir = os.path.join(out, "memarch")
  cmd = [sys.executable, os.path.join(ROOT, "scripts/train.py"), "--config=configs/titans.py",
         f"--workdir={workdir}", "--config.train.progress=False"]
  t0 = time.time()
  subprocess.run(cmd, cwd=ROOT, env=_env(), check=True)
  wall = time.time() - t0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return summarize_ours(rows, wall)


def run_peer(python: str, lr: float, out: str, budget_s: float, max_steps: int) -> dict:
  path = os.path.join(out, f"peer_lr{lr:g}.json")
  subprocess.run([python, os.path.abspath(__file__), f"--_peer_lr={lr}", f"--out={path}",
                  f"--budget_s={budget_s}", f"--max_steps={max_steps}"], env=_env(), check=True)
  with open(path) as f:
    return json.load(f)


def peer_main(lr: float, path: str, budget_s: float, max_steps: int) -> None:
  """Trains titans-pytorch on our MQAR batches (step s on batch s - 1, as our loop does)."""
  import numpy as np
  import torch
  from titans_pytorch import MemoryAsContextTransformer, MemoryMLP

  from memarch.data import mqar  # numpy only
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  model = MemoryAsContextTransformer(
      num_tokens=TASK["vocab_size"], dim=64, depth=2, segment_len=32, num_persist_mem_tokens=4,
      num_longterm_mem_tokens=4, neural_memory_layers=(1, 2),
      neural_memory_model=MemoryMLP(dim=64, depth=2), num_residual_streams=1)
  opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
  src = mqar.MQARSource(**TASK)
  ev = src.eval_set(EVAL_EXAMPLES)
  step_sec, evals, step, hit = [], [], 0, None
  while time.time() - T_START < budget_s and not (max_steps and step >= max_steps):
    t0 = time.perf_counter()  # the step's time includes making its batch, as in our loop
    b = src.batch(step)
    x, y = torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long()
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                             ignore_index=mqar.IGNORE)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    step_sec.append(time.perf_counter() - t0)
    step += 1
    if step % EVAL_EVERY == 0:
      with torch.no_grad():
        bs = TASK["batch_size"]
        preds = [model(torch.from_numpy(ev["inputs"][i:i + bs]).long()).argmax(-1).numpy()
                 for i in range(0, EVAL_EXAMPLES, bs)]
      evals.append((step, mqar.accuracy(np.concatenate(preds), ev["targets"])))
      print(f"peer lr {lr:g}: step {step} accuracy {evals[-1][1]:.4f}", flush=True)
      if evals[-1][1] >= TARGET:
        hit = step
        break
  wall = time.time() - T_START
  res = dict(impl="titans-pytorch 0.5.5", setting=f"AdamW lr {lr:g}, wd 0.1, clip 1.0", lr=lr,
             steps_to_target=hit, last_step=step, final_accuracy=evals[-1][1] if evals else None,
             median_step_sec=statistics.median(step_sec) if step_sec else None, compile_sec=None,
             wall_s=wall, wall_to_target_s=wall if hit is not None else None, evals=evals,
             step_sec=step_sec, torch=torch.__version__, threads=torch.get_num_threads())
  with open(path, "w") as f:
    json.dump(res, f)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="runs/compare_titans")
  p.add_argument("--torch_lrs", default="1e-3,3e-3", help="the peer's learning rates, one run each")
  p.add_argument("--peer_python", default=sys.executable,
                 help="the Python of the environment with torch and titans-pytorch")
  p.add_argument("--budget_s", type=float, default=1200, help="the peer's wall-clock budget per run")
  p.add_argument("--max_steps", type=int, default=0, help="stop the peer after this many steps "
                 "(0 = at 0.99 or the budget); for a quick check")
  p.add_argument("--only", default="both", choices=["both", "memarch", "pytorch"])
  p.add_argument("--_peer_lr", type=float, default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._peer_lr is not None:
    peer_main(args._peer_lr, args.out, args.budget_s, args.max_steps)
    return
  os.makedirs(args.out, exist_ok=True)
  ours = run_ours(args.out) if args.only != "pytorch" else None
  peers = [] if args.only == "memarch" else [
      run_peer(args.peer_python, float(lr), args.out, args.budget_s, args.max_steps)
      for lr in args.torch_lrs.split(",")]
  text, js = report(ours, [{k: v for k, v in r.items() if k != "step_sec"} for r in peers],
                    os.cpu_count() or 1, datetime.datetime.now(datetime.timezone.utc).isoformat())
  print(text)
  js["peers_step_sec"] = {r["setting"]: r["step_sec"] for r in peers}
  with open(os.path.join(args.out, "compare.json"), "w") as f:
    json.dump(js, f, indent=1)


if __name__ == "__main__":
  main()
