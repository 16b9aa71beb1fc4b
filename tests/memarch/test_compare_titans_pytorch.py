"""scripts/compare_titans_pytorch.py's pure parts (no torch here): reading our run's metrics and the
table and ratios of the report."""
import pytest

from memarch.testing import load_script

cmp = load_script("compare_titans_pytorch")

# A fake metrics.jsonl of ours: logged every 50 steps, evals at 50..150, 0.99 first reached at 150.
OURS_ROWS = [
    {"step": 1, "train/loss": 5.0, "train/step_sec": 0.30, "train/compile_sec": 18.0},
    {"step": 50, "train/loss": 2.0, "train/step_sec": 0.10},
    {"step": 50, "eval/accuracy": 0.40, "eval/compile_sec": 3.0},
    {"step": 100, "train/loss": 0.5, "train/step_sec": 0.12},
    {"step": 100, "eval/accuracy": 0.985},
    {"step": 150, "train/loss": 0.1, "train/step_sec": 0.11},
    {"step": 150, "eval/accuracy": 0.995},
]


def peer(lr, steps, wall, step_sec, acc):
  return dict(impl="titans-pytorch 0.5.5", setting=f"lr {lr:g}", lr=lr, steps_to_target=steps,
              last_step=steps or 400, final_accuracy=acc, median_step_sec=step_sec,
              compile_sec=None, wall_s=wall, wall_to_target_s=wall if steps else None)


def test_summarize_ours():
  s = cmp.summarize_ours(OURS_ROWS, wall_s=60.0)
  assert s["steps_to_target"] == 150 and s["last_step"] == 150
  assert s["median_step_sec"] == pytest.approx(0.115)  # median of 0.30, 0.10, 0.12, 0.11
  assert s["compile_sec"] == 18.0 and s["final_accuracy"] == 0.995
  assert s["wall_to_target_s"] == 60.0
  # not reaching 0.99 (the last eval is 0.985): no steps, no wall time to the target
  short = cmp.summarize_ours(OURS_ROWS[:5], wall_s=40.0)
  assert short["steps_to_target"] is None and short["wall_to_target_s"] is None
  assert short["final_accuracy"] == 0.985


def test_report_picks_the_fastest_peer_and_divides_by_it():
  ours = cmp.summarize_ours(OURS_ROWS, wall_s=60.0)
  peers = [peer(1e-3, 900, 300.0, 0.25, 0.991), peer(3e-3, 600, 200.0, 0.30, 0.993),
           peer(1e-2, None, None, 0.20, 0.31)]
  assert cmp.pick_best(peers)["lr"] == 3e-3  # shortest wall time to 0.99, not the fastest step
  text, js = cmp.report(ours, peers, cpus=2, date="2026-12-06")
  assert js["ratios"]["step_time"] == pytest.approx(0.115 / 0.30)
  assert js["ratios"]["wall_to_target"] == pytest.approx(60.0 / 200.0)
  assert js["peer_best"] == "lr 0.003" and js["cpu_count"] == 2
  lines = text.splitlines()
  assert lines[2] == "| memarch | configs/titans.py (shipped default) | 150 | 115.0 ms | 18.0 s | 60.0 s |"
  assert lines[4] == "| titans-pytorch 0.5.5 | lr 0.003 | 600 | 300.0 ms | - | 200.0 s |"
  assert lines[5].startswith("| titans-pytorch 0.5.5 | lr 0.01 | not reached (accuracy 0.310 at step 400)")
  assert "median step 0.38x, wall time to 0.99 0.30x" in text and "2 CPUs" in text
  # no peer reached 0.99: the most accurate is the reference, and there is no wall-time ratio
  _, js = cmp.report(ours, peers[2:], cpus=2, date="d")
  assert js["ratios"]["wall_to_target"] is None
  assert js["ratios"]["step_time"] == pytest.approx(0.115 / 0.20)
