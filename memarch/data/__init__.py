"""Data sources. Contract: `vocab_size` and `batch(step, rows=None) -> {inputs, targets,
segment_ids}` (int32 [B, L], targets -100 where ignored), a pure function of (seed, step): resuming
at a step is exact. `rows=(start, stop)` builds only those rows of the batch (the share of one
process in a multi-host run), equal to the same rows of the whole batch."""
from __future__ import annotations

import os

import numpy as np

TEXT_SOURCES = ("text", "shakespeare", "tfds")
BPE_SAMPLE_DOCS = 20_000  # TFDS documents a BPE is trained on (a seeded sample of the split)


def row_range(rows: tuple[int, int] | None, batch_size: int) -> range:
  """The rows of a batch to build: `rows=(start, stop)`, or every row when None."""
  if rows is None:
    return range(batch_size)
  start, stop = int(rows[0]), int(rows[1])
  if not 0 <= start < stop <= batch_size:
    raise ValueError(f"rows {rows} are not a non-empty range inside a batch of {batch_size}")
  return range(start, stop)


def _get(data_cfg, key, default):
  """Keys added after a workdir's config.json was written read as their defaults."""
  return data_cfg.get(key, default) if hasattr(data_cfg, "get") else default


def text_tokenizer(data_cfg, *, workdir: str | None, train_texts, may_train: bool = True):
  """The tokenizer named by data.tokenizer for a text source.

  'bpe': `<workdir>/tokenizer.json` when it exists (resume, evaluation), else a byte-level BPE of
  data.vocab_size ids trained on `train_texts()` (the training split) and saved there (kept in memory
  without a workdir). `may_train=False` (evaluation) refuses to train one. Anything else:
  `tokenizer.get_tokenizer` (byte, sentencepiece with data.spm_model, a path to a tokenizer.json).
  """
  from memarch.data import tokenizer
  name = data_cfg.tokenizer
  if name != "bpe":
    return tokenizer.get_tokenizer(name, data_cfg.spm_model or None)
  path = os.path.join(workdir, "tokenizer.json") if workdir else None
  if path and os.path.exists(path):
    return tokenizer.HFTokenizer(path)
  if not may_train:
    raise FileNotFoundError(f"data.tokenizer=bpe but {path or 'the workdir'} has no tokenizer.json "
                            "(it is written when training starts)")
  return tokenizer.train_bpe(train_texts(), int(data_cfg.vocab_size), path)


def _decoded(documents):
  from memarch.data.tokenizer import decode_utf8
  for origin, data in documents:
    yield decode_utf8(data, origin)


def make_source(data_cfg, *, seed: int, workdir: str | None = None, may_train_tokenizer: bool = True):
  """The data source named by `data.name` (mqar | text | shakespeare | tfds | babilong | passkey |
  niah | memorization). `workdir` holds a trained BPE (`text_tokenizer`)."""
  name = data_cfg.name
  if data_cfg.get("landmark_block", 0) and name not in ("passkey", "niah"):
    raise ValueError(f"data.landmark_block is supported for passkey and niah rows, not data.name="
                     f"{name!r}; set data.landmark_block=0")
  if name == "mqar":
    from memarch.data.mqar import MQARSource
    return MQARSource(seq_len=data_cfg.seq_len, num_kv_pairs=data_cfg.num_kv_pairs,
                      vocab_size=data_cfg.vocab_size, batch_size=data_cfg.batch_size, seed=seed,
                      power_a=data_cfg.power_a, random_non_queries=data_cfg.random_non_queries)
  if name in TEXT_SOURCES:
    from memarch.data import text
    tok_args = dict(workdir=workdir, may_train=may_train_tokenizer)
    common = dict(seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size, seed=seed,
                  pack=data_cfg.pack)
    if name == "shakespeare":
      from memarch.data import shakespeare
      tok = text_tokenizer(data_cfg, train_texts=lambda: _decoded(shakespeare.documents("train")),
                           **tok_args)
      return shakespeare.ShakespeareSource(tokenizer=tok, **common)
    if name == "text":
      if not data_cfg.paths:
        raise ValueError("data.name=text needs data.paths (local text files), e.g. "
                         "--config.data.paths=\"('corpus.txt',)\"")
      docs = text.read_documents(list(data_cfg.paths))
      eval_paths = list(_get(data_cfg, "eval_paths", ()) or ())
      eval_docs = text.read_documents(eval_paths) if eval_paths else []
      if not docs:
        raise ValueError(f"LocalTextSource: the files {list(data_cfg.paths)} hold no text")
      tok = text_tokenizer(data_cfg, train_texts=lambda: _decoded(docs), **tok_args)
      return text.DocumentSource(docs, tokenizer=tok, eval_documents=eval_docs,
                                 name="LocalTextSource", **common)
    if not data_cfg.tfds_name:
      raise ValueError("data.name=tfds needs data.tfds_name (a TFDS dataset you have prepared)")
    tfds_args = dict(data_dir=data_cfg.tfds_data_dir or None, text_key=data_cfg.text_key, **common)
    def tfds_texts():
      # A BPE is trained on a seeded sample of the training split, read with the byte tokenizer.
      from memarch.data.tokenizer import ByteTokenizer
      src = text.TFDSTextSource(data_cfg.tfds_name, split=data_cfg.tfds_split,
                                tokenizer=ByteTokenizer(), docs_per_row=1, **tfds_args)
      m = min(BPE_SAMPLE_DOCS, src.num_documents)
      return (src.text(int(i)) for i in text.permute_indices(np.arange(m), src.num_documents,
                                                              seed, -2))

    tok = text_tokenizer(data_cfg, train_texts=tfds_texts, **tok_args)
    source = text.TFDSTextSource(data_cfg.tfds_name, split=data_cfg.tfds_split, tokenizer=tok,
                                 **tfds_args)
    eval_split = _get(data_cfg, "tfds_eval_split", "")
    if eval_split:
      source.eval_source = text.TFDSTextSource(data_cfg.tfds_name, split=eval_split,
                                               tokenizer=tok, **tfds_args)
    return source
  if name in ("babilong", "passkey", "niah"):
    from memarch.data import tokenizer
    tok = tokenizer.get_tokenizer(data_cfg.tokenizer, data_cfg.spm_model or None)
    if name == "babilong":
      from memarch.data.babilong import BabilongSource, default_seq_len
      tasks = tuple(data_cfg.babilong_tasks)
      length = int(data_cfg.babilong_length)
      if length <= 0:
        # 0: the longest context whose rows (context + question + answer) fit data.seq_len.
        length = data_cfg.seq_len - default_seq_len(tasks, 0, tok)
        if length < 1:
          raise ValueError(f"data.seq_len={data_cfg.seq_len} leaves no room for a BABILong context; "
                           "raise data.seq_len or set data.babilong_length")
      return BabilongSource(tasks, length, batch_size=data_cfg.batch_size, seed=seed, tokenizer=tok,
                            seq_len=data_cfg.seq_len)
    from memarch.data.needle import NIAHSource, PasskeySource
    depth = None if data_cfg.needle_depth < 0 else float(data_cfg.needle_depth)
    if name == "passkey":
      return PasskeySource(data_cfg.seq_len, batch_size=data_cfg.batch_size, seed=seed,
                           tokenizer=tok, depth=depth, prompt_loss=data_cfg.get("prompt_loss", False),
                           landmark_block=data_cfg.get("landmark_block", 0))
    return NIAHSource(data_cfg.seq_len, num_needles=data_cfg.niah_needles,
                      num_queries=data_cfg.niah_queries, batch_size=data_cfg.batch_size, seed=seed,
                      tokenizer=tok, depth=depth, prompt_loss=data_cfg.get("prompt_loss", False),
                      landmark_block=data_cfg.get("landmark_block", 0))
  if name == "memorization":
    from memarch.data.memorization import MemorizationSource
    return MemorizationSource(seq_len=data_cfg.seq_len, vocab_size=data_cfg.vocab_size,
                              batch_size=data_cfg.batch_size, seed=seed,
                              num_facts=data_cfg.num_facts or None)
  raise ValueError(f"unknown data.name {name!r}; choose mqar, text, shakespeare, tfds, babilong, "
                   "passkey, niah or memorization")
