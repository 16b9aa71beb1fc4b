"""HCAM (Lampinen et al. 2021, arXiv 2105.14039) in a language model on MQAR: causal attention
inside segments of S tokens plus a top-k read of the C-token chunks of earlier segments
(layers/hcam.py; docs/architectures/hcam.md).

  python scripts/train.py --config=configs/hcam.py
  python scripts/train.py --config=configs/hcam.py:chunk=8,segment=16,k=2 --workdir=runs/hcam

Variants: `size=tiny|small|base|170m|...`; `chunk=C`, `segment=S` (a multiple of C), `k=N` (chunks
read per query, 0 = all), `max_chunks=M` (memory size in chunks); CPU sizes default to C=8, S=16,
k=2, M=64, the others to C=64, S=512, k=4, M=512. `seq_len=L,kv=K` set the MQAR task; a short
segment makes recall depend on the memory rather than on the local attention.
`task=mqar|passkey|text` (passkey and text: CPU sizes default to C=16, S=64 and max_chunks to 1024,
i.e. 16k tokens of memory; text: the embedded Shakespeare plays, configs_lib.text_task),
`steps=N`.
Parameters (size=tiny, MQAR vocab 256): 158,016.

Passkey (byte tokens, 512-token training rows, evaluated to 16k through the chunk memory):
  python scripts/train.py --config=configs/hcam.py:task=passkey --workdir=runs/hcam_passkey
  python scripts/eval.py --workdir=runs/hcam_passkey            # passkey at evals.lengths
"""
from memarch import configs_lib


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, size="tiny", chunk=0, segment=0, k=-1, max_chunks=0, seq_len=0,
                            kv=0, task="mqar", recipe="", accum=0, steps=0)
  c = configs_lib.base_config(a.size)
  cpu = a.size in ("tiny", "small")
  long = a.task in ("passkey", "text")
  c.model.layer_pattern = ("hcam",)
  c.model.mixer = {"hcam": dict(
      # task=passkey on CPU sizes: chunks of 16 and segments of 64 (the 8/16 MQAR default leaves
      # the key line's own copy to the memory).
      chunk_size=a.chunk or (64 if not cpu else 16 if long else 8),
      segment_len=a.segment or (512 if not cpu else 64 if long else 16),
      top_k=a.k if a.k >= 0 else (2 if cpu else 4),
      # task=passkey keeps 1024 chunks (16k tokens at C = 16), so evaluation never forgets the key.
      max_chunks=a.max_chunks or (1024 if long else 64 if cpu else 512),
      implementation=configs_lib.impl_field())}
  if a.seq_len:
    c.data.seq_len = a.seq_len
  if a.kv:
    c.data.num_kv_pairs = a.kv
  c.train.num_steps = 1500
  c.train.stop_at_accuracy = 0.99
  configs_lib.apply_task(c, a, "hcam")
  return configs_lib.finalize(c)
