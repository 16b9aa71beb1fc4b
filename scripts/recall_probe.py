"""Does an MQAR-trained memory model read with the key it wrote? A probe of a training workdir.

  python scripts/recall_probe.py --workdir=runs/yaad

MQAR puts the pairs k_1 v_1 ... k_n v_n first and asks for v_i at later occurrences of k_i. A
memory layer can only answer if its read query at such a query token matches the memory key it
wrote at pair i (at the key token 2i, or at the value token 2i + 1, whose causal convolution sees the
key just before it) better than the other pairs' keys. For every memory layer (Titans, Miras) and
head the probe prints the mean cosine between the query q_t and the key k_j of the matching pair,
and the mean over the other pairs, on held-out examples. Models that solve MQAR show a clear gap
at the value token of one layer; models on the 0.25 "bag of values" plateau show none
(docs/results.md).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def key_alignment(inputs_BT, q_BTHD, k_BTHD, num_pairs: int, offset: int):
  """(matching [H], others [H]): mean cos(q_t, k_j) over query tokens t (non-zero tokens after the
  context) with j = 2i + offset for the pair i whose key is inputs[t], and over the other pairs."""
  def cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-9)

  context = 2 * num_pairs
  matching, others = [], []
  for b in range(inputs_BT.shape[0]):
    keys = inputs_BT[b, 0:context:2]
    for t in range(context, inputs_BT.shape[1]):
      hit = np.flatnonzero(keys == inputs_BT[b, t])
      if inputs_BT[b, t] == 0 or hit.size == 0:
        continue
      c = cos(q_BTHD[b, t][None], k_BTHD[b, 2 * np.arange(num_pairs) + offset])   # [pairs, H]
      matching.append(c[hit[0]])
      others.append(np.delete(c, hit[0], axis=0).mean(0))
  return np.mean(matching, axis=0), np.mean(others, axis=0)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="an MQAR training workdir with a checkpoint")
  p.add_argument("--examples", type=int, default=64, help="held-out examples")
  args = p.parse_args(argv)
  if args.examples < 1:
    p.error(f"--examples must be >= 1, got {args.examples}")
  import jax.numpy as jnp

  import layers.titans as titans
  from memarch.sampling import load_trained
  try:
    cfg, data, model = load_trained(args.workdir)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"recall_probe: {e}")
  if cfg.data.name != "mqar":
    sys.exit(f"recall_probe: {args.workdir} trained on {cfg.data.name!r}; the probe needs MQAR")
  calls = []
  project = titans.NeuralMemory.project

  def recording(self, x, *a, **k):   # every memory layer's q, k (persistent-token calls included)
    out = project(self, x, *a, **k)
    calls.append((np.asarray(out[0]), np.asarray(out[1])))
    return out

  titans.NeuralMemory.project = recording
  try:
    ev = data.eval_set(args.examples)
    model(jnp.asarray(ev["inputs"]))
  finally:
    titans.NeuralMemory.project = project
  seq = [c for c in calls if c[0].shape[1] == ev["inputs"].shape[1]]
  if not seq:
    sys.exit("recall_probe: the model has no Titans/Miras memory layer that reads the sequence")
  print(f"{args.workdir}: {len(seq)} memory layer(s), {args.examples} held-out examples\n")
  print("| layer | memory key at | head | cos(q, k) matching pair | other pairs | gap |")
  print("|---|---|---|---|---|---|")
  for layer, (q, k) in enumerate(seq):
    for name, offset in (("key token", 0), ("value token", 1)):
      m, o = key_alignment(ev["inputs"], q, k, cfg.data.num_kv_pairs, offset)
      for h in range(m.shape[0]):
        print(f"| {layer} | {name} | {h} | {m[h]:.3f} | {o[h]:.3f} | {m[h] - o[h]:+.3f} |")


if __name__ == "__main__":
  main()
