"""The Colab notebooks (notebooks/*.ipynb): paired with their jupytext source, stripped of outputs,
and (with `-m slow`) executed top to bottom at tiny budgets (MEMARCH_NOTEBOOK_FAST=1) in a python3
kernel of the current interpreter.

The notebooks are generated from `notebooks/<name>.py` (jupytext percent format, the source of
truth) with `jupytext --to ipynb notebooks/<name>.py`.
"""
import concurrent.futures
import json
import os
import re
import sys

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NB_DIR = os.path.join(ROOT, "notebooks")
NAMES = ("quickstart", "zoo_tour", "kernels")
BADGE = "https://colab.research.google.com/github/memarch/memarch/blob/main/notebooks/{}.ipynb"
INSTALL = '!pip install -q "git+https://github.com/memarch/memarch"'


def _read_pair(name):
  py = jupytext.read(os.path.join(NB_DIR, f"{name}.py"))
  ipynb = nbformat.read(os.path.join(NB_DIR, f"{name}.ipynb"), as_version=4)
  return py, ipynb


@pytest.mark.parametrize("name", NAMES)
def test_pairing_and_stripped_outputs(name):
  py, ipynb = _read_pair(name)
  nbformat.validate(ipynb)
  # Paired: the same cells, in order, with the same sources (magics un-commented by jupytext).
  assert [c.cell_type for c in py.cells] == [c.cell_type for c in ipynb.cells], (
      f"{name}.ipynb is out of date: run jupytext --to ipynb notebooks/{name}.py")
  for i, (a, b) in enumerate(zip(py.cells, ipynb.cells)):
    assert a.source.strip() == b.source.strip(), f"{name} cell {i} differs between .py and .ipynb"
  assert ipynb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
  assert ipynb.metadata["kernelspec"]["name"] == "python3"
  # Stripped: no outputs, execution counts or execution metadata anywhere.
  for i, c in enumerate(ipynb.cells):
    if c.cell_type == "code":
      assert c.outputs == [] and c.execution_count is None, f"{name} cell {i} has outputs"
    assert "execution" not in c.metadata, f"{name} cell {i} has execution metadata"
  assert "widgets" not in ipynb.metadata
  # Colab front matter: the badge first, then an install cell guarded for an existing install.
  assert BADGE.format(name) in ipynb.cells[0].source
  install = next(c.source for c in ipynb.cells if c.cell_type == "code")
  assert INSTALL in install and 'find_spec("memarch") is None' in install
  assert any("MEMARCH_NOTEBOOK_FAST" in c.source for c in ipynb.cells)


def _execute(name, cwd):
  """Runs the notebook in a fresh python3 kernel of this interpreter; returns the executed copy and
  its stdout text."""
  nb = nbformat.read(os.path.join(NB_DIR, f"{name}.ipynb"), as_version=4)
  env = dict(os.environ, MEMARCH_NOTEBOOK_FAST="1", JAX_PLATFORMS="cpu")
  # One CPU device, as in Colab (conftest forces 8 for sharding tests); the faster-compiling emitters.
  env["XLA_FLAGS"] = "--xla_cpu_use_fusion_emitters=false"
  env.pop("MPLBACKEND", None)
  # As in tests/conftest.py: the fast budgets are all compile time, which XLA's optimisation
  # passes lengthen (docs/results.md, "Test suite time"; the notebooks' numbers are checked to
  # tolerances far above the effect).
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  # The kernelspec launches "python": make it this venv's interpreter.
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                   resources={"metadata": {"path": str(cwd)}})
  client.execute(env=env)
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.output_type == "stream" and o.get("name") == "stdout")
  return nb, text


def _images(nb):
  return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.outputs)


def _check_quickstart(nb, text, tmp_path):
  assert "fast mode: True" in text
  workdir = tmp_path / "runs" / "quickstart_fast"
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in rows) == 4
  assert any("eval/accuracy" in r for r in rows)
  surprise = [r[k] for r in rows for k in r if k.endswith("memory.surprise_norm")]
  assert surprise and all(s > 0 for s in surprise)
  assert "greedy decode == parallel argmax for all 16 prompts" in text
  acc = float(re.search(r"recall accuracy on these 16 queries: ([\d.]+)", text).group(1))
  assert 0.0 <= acc <= 1.0
  # The Shakespeare section: held-out bits per byte at every step, then three samples.
  text_rows = [json.loads(l) for l in
               (tmp_path / "runs" / "quickstart_text_fast" / "metrics.jsonl").read_text().splitlines()]
  bpb = [r["eval/bits_per_byte"] for r in text_rows if "eval/bits_per_byte" in r]
  assert len(bpb) == 3 and all(0.0 < b < 20.0 for b in bpb)
  m = re.search(r"held-out bits per byte after 3 steps: ([\d.]+)", text)
  assert m and float(m.group(1)) == pytest.approx(bpb[-1], abs=1e-3)
  assert all(f"--- sample {i}\n**MACBETH**" in text for i in (1, 2, 3))
  assert _images(nb) == 4  # curves, memory statistics, surprise over positions, bits per byte


def _check_zoo_tour(nb, text, tmp_path):
  out = tmp_path / "runs" / "zoo_tour_fast"
  sweep = json.loads((out / "mqar" / "mqar_sweep.json").read_text())
  assert [r["config"] for r in sweep["best"]] == ["attention", "gated_deltanet"]
  for r in sweep["best"]:
    assert r["steps"] == 2 and 0.0 <= r["accuracy"] <= 1.0 and r["state_bytes_per_layer"] > 0
  # Attention's cache grows with the context, the delta rule's state does not.
  sizes = re.findall(r"seq_len\s+(\d+): attention ([\d,]+) B, gated_deltanet ([\d,]+) B", text)
  assert len(sizes) == 3
  att = [int(a.replace(",", "")) for _, a, _ in sizes]
  gdn = {int(g.replace(",", "")) for _, _, g in sizes}
  assert att[0] < att[1] < att[2] and len(gdn) == 1
  for arch in ("transformer", "gated_deltanet"):
    res = json.loads((out / "babilong" / arch / "eval" / "babilong.json").read_text())
    assert res["lengths"] == [340] and res["tasks"] == ["qa1"]
    assert res["accuracy"]["qa1"]["340"] in (0.0, 0.5, 1.0)  # 2 examples
  assert _images(nb) == 3  # accuracy vs state, two heatmaps


def _check_kernels(nb, text, tmp_path):
  for op in ("gated_delta_rule", "linear_attention", "titans_memory", "expert_gather",
             "expert_mlp", "block_retrieval_attention"):
    assert f"{op}: implementation" in text, op
  # Pallas kernels ran in interpret mode and agree with the reference.
  errs = re.findall(r"pallas_(?:gpu|tpu) \(interpret\)\s+([\d.e+-]+)\s+([\d.e+-]+)", text)
  assert len(errs) == 4, text  # gated_delta_rule and linear_attention, GPU and TPU kernels
  assert all(float(e) < 1e-5 and float(g) < 1e-5 for e, g in errs)
  assert "pallas_gpu, explicit:" in text and "chunk_size" in text
  worst = float(re.search(r"across all ops and paths: ([\d.e+-]+)", text).group(1))
  assert worst < 1e-5
  assert _images(nb) == 1


CHECKS = {"quickstart": _check_quickstart, "zoo_tour": _check_zoo_tour, "kernels": _check_kernels}


def _execute_and_check(names, tmp_path):
  """Executes the notebooks concurrently (each kernel spends most of its time in single-threaded
  XLA compilation), then checks what each computed. Every notebook's failure is reported, not only
  the first."""
  cwds = {name: tmp_path / name for name in names}
  for cwd in cwds.values():
    cwd.mkdir()
  with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
    futures = {name: pool.submit(_execute, name, cwds[name]) for name in names}
  failures = []
  for name, future in futures.items():
    try:
      nb, text = future.result()
      CHECKS[name](nb, text, cwds[name])
    except Exception as e:  # noqa: BLE001 - collect every notebook's failure
      failures.append(f"{name}.ipynb: {type(e).__name__}: {e}")
  assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_notebooks_execute(tmp_path):
  """About 90 s for the quickstart alone, so with `python -m pytest -m slow`; the pieces the
  notebooks call (training, decoding, the MQAR sweep, BABILong, the kernels) have unit tests, and
  the pairing test above runs by default. One test, so pytest-xdist never runs them twice."""
  _execute_and_check(NAMES, tmp_path)
