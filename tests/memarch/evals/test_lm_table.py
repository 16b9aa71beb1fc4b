"""The LM table (memarch.evals.lm_table): settings, row configs, and a two-row micro-run that is
read back instead of retrained."""
import json
import math
import os
import re
import shutil

import pytest

from memarch.evals import lm_table


def test_parse_tokens_and_settings():
  assert lm_table.parse_tokens("2M") == 2_000_000
  assert lm_table.parse_tokens("50K") == 50_000
  assert lm_table.parse_tokens("1.5e3") == 1500
  assert lm_table.parse_tokens("4096") == 4096
  with pytest.raises(lm_table.TableError, match="not a token count"):
    lm_table.parse_tokens("lots")
  s = lm_table.make_settings(2_000_000)
  assert (s["steps"], s["seq_len"], s["batch_size"]) == (244, 512, 16)
  assert s["tokens"] == 244 * 16 * 512 and s["eval_lengths"] == [512, 2048]
  assert s["warmup_steps"] == 24 and s["eval_every"] == 24 and s["ckpt_every"] == 48
  assert lm_table.make_settings(10)["steps"] == 1  # at least one step


def test_unknown_row_is_one_line(capsys):
  with pytest.raises(lm_table.TableError, match=r"unknown row 'gated_deltnet' \(did you mean "
                                                r"'gated_deltanet'\?\)"):
    lm_table.parse_rows("transformer,gated_deltnet")
  assert lm_table.main(["--rows=transformer,nope", "--out=/nonexistent/never"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: unknown row 'nope'") and "\n" not in err
  assert lm_table.parse_rows("all") == list(lm_table.ROWS)


def test_every_row_config_shares_the_training_settings():
  s = lm_table.make_settings(100_000, seq_len=256)
  mixers = set()
  for name in lm_table.ROWS:
    c = lm_table.row_config(name, s)
    assert c.data.name == "shakespeare" and c.data.tokenizer == "byte" and c.data.pack
    assert (c.data.seq_len, c.data.batch_size, c.train.num_steps) == (256, 16, s["steps"])
    assert (c.opt.lr, c.opt.warmup_steps, c.opt.schedule) == (2e-3, s["warmup_steps"], "cosine")
    assert c.model.d_model == 64 and c.train.stats_every == 0 and c.seed == 0
    mixers.add((tuple(c.model.layer_pattern), tuple(c.model.channel_pattern)))
    lm_table.row_note(name, c)  # every note formats
  assert len(mixers) == len(lm_table.ROWS)  # fifteen different models
  assert lm_table.row_note("swa", lm_table.row_config("swa", s)) == "window 64"


def test_steady_steps_per_sec_skips_compile_and_evals():
  rows = [{"step": 1, "train/elapsed_sec": 30.0}, {"step": 2, "train/elapsed_sec": 31.0},
          {"step": 3, "train/elapsed_sec": 32.0}, {"step": 4, "eval/bits_per_byte": 5.0},
          {"step": 4, "train/elapsed_sec": 40.0}, {"step": 5, "train/elapsed_sec": 41.0}]
  assert lm_table.steady_steps_per_sec(rows) == pytest.approx(1.0)  # (3, 4] holds the eval
  # A resumed run restarts its clock: only the last attempt counts.
  resumed = rows[:3] + [{"step": 3, "train/elapsed_sec": 20.0}, {"step": 4, "train/elapsed_sec": 22.0}]
  assert lm_table.steady_steps_per_sec(resumed) == pytest.approx(0.5)
  assert math.isnan(lm_table.steady_steps_per_sec(rows[:1]))


def _table_rows(md):
  out = {}
  for line in md.splitlines():
    m = re.match(r"\| .* \(`(\w+)`\) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", line)
    if m:
      out[m.group(1)] = [float(m.group(i).replace(",", "")) for i in range(2, 6)]
  return out


@pytest.mark.slow  # about 40 s; the rows' settings and parsing: the tests above
def test_two_rows_end_to_end_then_reused(tmp_path, monkeypatch, capsys):
  # The rows train in subprocesses: one CPU device as a user has (not the suite's 8), and XLA's
  # cheap compile mode as the suite uses.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  out = tmp_path / "table"
  args = ["--tokens=256", "--seq_len=32", "--batch=4", "--max_tokens=128", "--eval_rows=4",
          "--rows=transformer,gated_deltanet", f"--out={out}", "--no_progress"]
  assert lm_table.main(args) == 0
  md = (out / "lm_table.md").read_text()
  assert "--tokens=256" in md and "2 steps x batch 4 x 32 tokens = 256 training tokens" in md
  rows = _table_rows(md)
  assert list(rows) == ["transformer", "gated_deltanet"]
  for params, bpb, bpb4, wall in rows.values():
    assert params > 100_000 and wall > 0
    assert 0 < bpb < 20 and 0 < bpb4 < 20
  assert (out / "lm_table.png").stat().st_size > 0
  for name in rows:
    r = json.loads((out / name / "row.json").read_text())
    assert r["steps"] == 2 and r["settings"]["eval_lengths"] == [32, 128]
    assert [s for s, _ in r["curve"]] == [2]
    assert r["streamed"] == {"32": True, "128": True}
  err = capsys.readouterr().err
  assert len(re.findall(r"^lm_table (transformer|gated_deltanet): ", err, re.M)) == 2

  # A second invocation reads the rows back: nothing is retrained.
  before = {n: ((out / n / "metrics.jsonl").read_text(), os.stat(out / n / "row.json").st_mtime_ns)
            for n in rows}
  assert lm_table.main(args) == 0
  assert before == {n: ((out / n / "metrics.jsonl").read_text(),
                        os.stat(out / n / "row.json").st_mtime_ns) for n in rows}
  assert err.count("kept from an earlier run") == 0
  assert capsys.readouterr().err.count("kept from an earlier run") == 2
  # Other settings in the same folder are refused before any training.
  assert lm_table.main([a if not a.startswith("--tokens") else "--tokens=1K" for a in args]) == 2
  assert "was started with tokens_requested=256, not 1000" in capsys.readouterr().err

  # The table is rebuilt from the row JSONs alone.
  only = tmp_path / "only_json"
  for n in rows:
    (only / n).mkdir(parents=True)
    shutil.copy(out / n / "row.json", only / n / "row.json")
  assert lm_table.main([f"--out={only}", "--report_only"]) == 0
  assert _table_rows((only / "lm_table.md").read_text()) == rows
  assert (only / "lm_table.png").exists()
