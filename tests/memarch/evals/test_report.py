"""results.jsonl rows of every eval and the cross-workdir report (table + plots)."""
import json
import os

import pytest

from memarch.evals import report

BABILONG = {"tasks": ["qa1", "qa2"], "lengths": [512, 1024],
            "accuracy": {"qa1": {"512": 1.0, "1024": 0.5}, "qa2": {"512": 0.5, "1024": 0.0}},
            "mean": {"512": 0.75, "1024": 0.25}}
PASSKEY = {"depths": [0.0, 1.0], "lengths": [512, 1024],
           "accuracy": {"0.0": {"512": 1.0, "1024": 1.0}, "1.0": {"512": 0.5, "1024": 0.0}}}
PERPLEXITY = [{"source": "held-out", "length": 512, "bits_per_byte": 2.5, "loss": 1.7},
              {"source": "held-out", "length": 2048, "bits_per_byte": 2.25, "loss": 1.6}]
HARNESS = {"rows": [{"task": "piqa", "metric": "acc", "value": 0.625, "stderr": 0.01}]}


def test_rows_of_every_eval():
  rows = report.rows_of("babilong", BABILONG)
  assert len(rows) == 6 and rows[0] == {"eval": "babilong", "setting": "qa1 @ 512",
                                        "metric": "accuracy", "value": 1.0, "task": "qa1",
                                        "length": 512}
  assert rows[-1]["setting"] == "mean @ 1024" and rows[-1]["value"] == 0.25
  pk = report.rows_of("passkey", PASSKEY)
  assert [(r["depth"], r["length"], r["value"]) for r in pk] == [
      (0.0, 512, 1.0), (0.0, 1024, 1.0), (1.0, 512, 0.5), (1.0, 1024, 0.0)]
  niah = report.rows_of("niah", dict(PASSKEY, score={"0.0": {"512": 100, "1024": 50},
                                                     "1.0": {"512": 0, "1024": 0}}))
  assert {r["metric"] for r in niah} == {"accuracy", "string_match_all"} and len(niah) == 8
  mq = report.rows_of("mqar", {"rows": [{"seq_len": 64, "num_kv_pairs": 4, "accuracy": 0.9}]})
  assert mq == [{"eval": "mqar", "setting": "L=64 K=4", "metric": "accuracy", "value": 0.9,
                 "length": 64}]
  ppl = report.rows_of("perplexity", PERPLEXITY)
  assert [(r["metric"], r["length"], r["value"]) for r in ppl][:2] == [
      ("bits_per_byte", 512, 2.5), ("loss", 512, 1.7)]
  assert report.rows_of("harness", HARNESS)[0]["setting"] == "piqa"


def test_report_compares_two_workdirs(tmp_path, capsys):
  a, b = str(tmp_path / "gdn"), str(tmp_path / "titans")
  for w, arch, scale in ((a, "gated_deltanet", 1.0), (b, "titans_mac", 0.5)):
    report.append(w, report.rows_of("babilong", BABILONG), step=100, arch=arch)
    report.append(w, report.rows_of("passkey", PASSKEY), step=100, arch=arch)
    ppl = [dict(r, bits_per_byte=r["bits_per_byte"] * scale) for r in PERPLEXITY]
    report.append(w, report.rows_of("perplexity", ppl), step=100, arch=arch)
  # A later run of the same eval appends; the report shows the newest value.
  report.append(a, report.rows_of("harness", HARNESS), step=100, arch="gated_deltanet")
  report.append(a, report.rows_of("harness", {"rows": [dict(HARNESS["rows"][0], value=0.75)]}),
                step=200, arch="gated_deltanet")
  lines = open(os.path.join(a, "eval", "results.jsonl")).read().splitlines()
  assert len(lines) == 6 + 4 + 4 + 2
  first = json.loads(lines[0])
  assert first["step"] == 100 and first["arch"] == "gated_deltanet" and first["date"][:2] == "20"

  out = str(tmp_path / "report")
  assert report.main([a, b, f"--out={out}"]) == 0
  md = capsys.readouterr().out
  assert "| eval | setting | metric | gdn (gated_deltanet) | titans (titans_mac) |" in md
  assert "| harness | piqa | acc | 0.7500 (step 200) |  |" in md
  # gdn's newest values come from two steps, so its cells name them; titans has one.
  assert "- gdn (gated_deltanet): step 100, 200" in md
  assert "| perplexity | held-out @ 2048 | bits_per_byte | 2.2500 (step 100) | 1.1250 |" in md
  assert "| babilong | mean @ 1024 | accuracy | 0.2500 (step 100) | 0.2500 |" in md
  # perplexity rows come first, then harness, then babilong
  assert md.index("| perplexity |") < md.index("| harness |") < md.index("| babilong |")
  for name in ("report.md", "babilong_gdn_gated_deltanet.png", "babilong_titans_titans_mac.png",
               "accuracy_vs_length.png", "bits_per_byte_vs_length.png"):
    assert os.path.getsize(os.path.join(out, name)) > 500, name
  assert report.main([a, str(tmp_path / "missing"), f"--out={out}"]) == 2
  assert "has no eval/results.jsonl" in capsys.readouterr().err
  with pytest.raises(ValueError, match="no result rows"):
    report.rows_of("other", {})
