"""Data sources. Contract: `vocab_size` and `batch(step) -> {inputs, targets, segment_ids}` (int32
[B, L], targets -100 where ignored), a pure function of (seed, step): resuming at a step is exact."""
from __future__ import annotations




def make_source(data_cfg, *, seed: int):
  """The data source named by `data.name` (mqar | text | tfds | babilong | passkey | memorization)."""
  name = data_cfg.name
  if data_cfg.get("landmark_block", 0) and name not in ("passkey", "niah"):
    raise ValueError(f"data.landmark_block is supported for passkey and niah rows, not data.name="
                     f"{name!r}; set data.landmark_block=0")
  if name == "mqar":
    from memarch.data.mqar import MQARSource
    return MQARSource(seq_len=data_cfg.seq_len, num_kv_pairs=data_cfg.num_kv_pairs,
                      vocab_size=data_cfg.vocab_size, batch_size=data_cfg.batch_size, seed=seed,
                      power_a=data_cfg.power_a, random_non_queries=data_cfg.random_non_queries)
  if name in ("text", "tfds"):
    from memarch.data import text, tokenizer
    tok = tokenizer.get_tokenizer(data_cfg.tokenizer, data_cfg.spm_model or None)
    if name == "text":
      if not data_cfg.paths:
        raise ValueError("data.name=text needs data.paths (local text files), e.g. "
                         "--config.data.paths=\"('corpus.txt',)\"")
      return text.LocalTextSource(list(data_cfg.paths), seq_len=data_cfg.seq_len,
                                  batch_size=data_cfg.batch_size, tokenizer=tok, seed=seed,
                                  pack=data_cfg.pack)
    if not data_cfg.tfds_name:
      raise ValueError("data.name=tfds needs data.tfds_name (a TFDS dataset you have prepared)")
    return text.TFDSTextSource(data_cfg.tfds_name, split=data_cfg.tfds_split,
                               data_dir=data_cfg.tfds_data_dir or None, text_key=data_cfg.text_key,
                               seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size,
                               tokenizer=tok, seed=seed, pack=data_cfg.pack)
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
  raise ValueError(f"unknown data.name {name!r}; choose mqar, text, tfds, babilong, passkey, niah "
                   "or memorization")
