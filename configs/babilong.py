"""BABILong-style recipe: train on generated qa1-qa5 at a short length, evaluate at longer ones.

  python scripts/train.py --config=configs/babilong.py:arch=gated_deltanet --workdir=runs/babilong_gdn
  python scripts/eval.py --workdir=runs/babilong_gdn            # evals.names below, at evals.lengths

Training rows are `data.seq_len` = 512 byte tokens: a BABILong-style context of 442 bytes (the
longest that fits with the question and answer), "\\nQuestion: ...\\nAnswer: " and the answer, with
the loss on the answer tokens only (memarch.data.babilong). scripts/eval.py then scores qa1-qa5 at 512
to 16k context tokens segment by segment through the recurrent state (restricted argmax over the
task's labels, memarch.evals.long_context); on a CPU, full attention's 16k cells take minutes each
(pass e.g. --lengths=512,1024,2048,4096 --num_examples=20). Results are "BABILong-style qaN (memarch generator,
procedural noise, byte tokenizer)", never the official benchmark.

Variants: `arch=gated_deltanet|transformer|swa|mom|titans_mac|titans_mag|titans_mal|titans_lmm` (the
mixer settings of that family's config file), `size=tiny|small|...`, `seq_len=N` (training row
length), `steps=N`, `tasks=qa1+qa2` (a '+'-separated subset).
Parameters (size=tiny, arch=gated_deltanet, byte vocab 259): 127,560.
"""
import os

from memarch import configs_lib

_HERE = os.path.dirname(os.path.abspath(__file__))
ARCHS = {
    "gated_deltanet": "gated_deltanet.py", "transformer": "transformer.py",
    "swa": "transformer.py:window=64", "mom": "mom.py",
    "titans_mac": "titans.py:variant=mac", "titans_mag": "titans.py:variant=mag",
    "titans_mal": "titans.py:variant=mal", "titans_lmm": "titans.py:variant=lmm",
}


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, arch="gated_deltanet", size="tiny", seq_len=512, steps=3000,
                            tasks="qa1+qa2+qa3+qa4+qa5")
  if a.arch not in ARCHS:
    raise ValueError(f"babilong: unknown arch {a.arch!r}; choose from {', '.join(ARCHS)}")
  file, _, family_arg = ARCHS[a.arch].partition(":")
  family_arg = ",".join(filter(None, [family_arg, f"size={a.size}"]))
  c = configs_lib.load_config(os.path.join(_HERE, file) + ":" + family_arg)
  c.unlock()
  c.data.name = "babilong"
  c.data.tokenizer = "byte"
  c.data.seq_len = a.seq_len
  c.data.batch_size = 16
  c.data.babilong_tasks = tuple(a.tasks.split("+"))
  c.data.babilong_length = 0  # the longest context that fits seq_len
  c.model.vocab_size = 0      # from the tokenizer (259 bytes + specials)
  c.opt.lr = 2e-3
  c.opt.warmup_steps = 100
  c.train.num_steps = a.steps
  c.train.stop_at_accuracy = 0.0  # no fixed eval set in the stream; train the full budget
  c.train.eval_every = 0
  c.train.ckpt_every = 500
  c.evals.names = ("babilong",)
  c.evals.lengths = (512, 1024, 2048, 4096, 8192, 16384)
  c.evals.tasks = c.data.babilong_tasks
  c.evals.num_examples = 50
  c.evals.segment_len = 512
  c.evals.depths = (0.0, 0.25, 0.5, 0.75, 1.0)
  return configs_lib.finalize(c)
