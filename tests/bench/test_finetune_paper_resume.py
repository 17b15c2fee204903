"""bench/finetune_paper.py --resume: a stored result is extended, not recomputed — only the missing sweep points
run, the best lr is re-chosen over all of them, the final seeds run only where missing, a stored result of another
setting is refused, and the report states each method's own lr grid."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import finetune_paper


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "cache"))


def stored_result(vals: dict, finals: dict, best: dict) -> dict:
    """A synthetic stored result: seed-0 sweep points {method: {lr: val}}, final runs {method: [seeds]} at
    `best[method]` (seed 0's sweep point carries the held-out and merged losses)."""
    runs = []
    for method, points in vals.items():
        for lr, v in points.items():
            r = {"method": method, "lr": lr, "seed": 0, "steps": 60, "val": v, "phase": "sweep"}
            if lr == best[method] and 0 in finals[method]:
                r.update(held=v + 0.3, merged=v + 0.31, phase="sweep+final")
            runs.append(r)
        runs += [{"method": method, "lr": best[method], "seed": s, "steps": 60, "val": 4.0, "held": 4.3 + s / 100,
                  "merged": 4.31, "phase": "final"} for s in finals[method] if s != 0]
    setting = {"model": "smollm2-135m", "rank": 64, "alpha": 16.0, "dropout": 0.0, "lrs": [2e-4, 2e-3],
               "steps": 60, "batch": 2, "seq": 32, "seeds": [0, 1, 2], "warmup": 0.03, "clip": 0.3, "threads": 1}
    methods = {m: {"label": m.upper(), "base": "INT4-G32", "trainable": 100, "best_lr": best[m]} for m in vals}
    return {"setting": setting, "data": {"task": "shakespeare (hamlet)", "train": 1570, "val": 32, "held_out": 48},
            "dense": {"val": 5.0, "held": 5.1}, "bases": {"INT4-G32": {"val": 5.0, "held": 5.1}},
            "methods": methods, "runs": runs, "wall_s": 600.0}


def test_plan_runs_only_the_missing_points_and_the_missing_seeds():
    stored = stored_result({"qalora": {2e-4: 4.8, 1e-3: 4.2, 2e-3: 4.0}, "qahira": {2e-4: 4.9, 2e-3: 4.5}},
                           {"qalora": [0, 1, 2], "qahira": [0, 1]}, {"qalora": 2e-3, "qahira": 2e-3})
    stored["lr_edge_check"] = {"runs": [{"method": "qahira", "lr": 8e-3, "seed": 0, "steps": 60, "val": 4.06,
                                         "held": 4.3}]}
    args = finetune_paper.options(["--methods", "qalora", "qahira", "--lrs", "1e-3", "4e-3", "8e-3", "--lr-seed", "0"])
    plan = finetune_paper.plan(stored, args)
    assert plan["qalora"]["sweep"] == [4e-3, 8e-3]  # 1e-3 is stored: the same seed-0 run, not re-run
    assert plan["qalora"]["best_lr_stored"] == 2e-3 and plan["qalora"]["final"] == []  # nothing to rerun
    # the edge check's 8e-3 run is a stored sweep point; it is the best so far, and it lacks its merged loss and
    # seeds 1 and 2: seed 0 must be finished (a re-run: finishing needs the trained model), seeds 1, 2 run
    assert plan["qahira"]["sweep"] == [1e-3, 4e-3]
    assert plan["qahira"]["best_lr_stored"] == 8e-3
    assert plan["qahira"]["final"] == [(0, "finish"), (1, "run"), (2, "run")]
    runs = finetune_paper.stored_runs(stored, 0, 60)
    assert finetune_paper.final_todo(runs, "qahira", 2e-3, [0, 1, 2], merge=True) == [(2, "run")]
    assert finetune_paper.final_todo(runs, "qahira", 8e-3, [0, 1, 2], merge=False) == [(1, "run"), (2, "run")]


def test_growth_continues_only_while_the_top_lr_is_the_best():
    runs = finetune_paper.stored_runs(stored_result({"qalora": {1e-3: 4.2, 2e-3: 4.0, 4e-3: 3.9}},
                                                    {"qalora": [0]}, {"qalora": 4e-3}), 0, 60)
    assert finetune_paper.next_growth(runs, "qalora", 0, 1.6e-2) == 8e-3
    assert finetune_paper.next_growth(runs, "qalora", 0, 4e-3) is None  # capped
    runs.append({"method": "qalora", "lr": 8e-3, "seed": 0, "val": 3.95})
    assert finetune_paper.next_growth(runs, "qalora", 0, 1.6e-2) is None  # 8e-3 is worse than 4e-3: stop
    assert finetune_paper.best_sweep_lr(runs, "qalora", 0) == 4e-3


def test_resume_refuses_another_setting():
    stored = stored_result({"qalora": {2e-3: 4.0}}, {"qalora": [0]}, {"qalora": 2e-3})
    for opts, word in ((["--steps", "100"], "steps"), (["--rank", "16"], "rank"), (["--seeds", "0", "1"], "seeds"),
                       (["--batch", "4"], "batch"), (["--held-out", "40"], "held_out")):
        with pytest.raises(SystemExit, match=f"another setting.*{word}"):
            finetune_paper.plan(stored, finetune_paper.options(opts))
    # lrs and methods may differ
    finetune_paper.plan(stored, finetune_paper.options(["--lrs", "9e-3", "--methods", "qbara", "--lr-seed", "0"]))


def test_report_states_each_methods_own_grid_and_edge():
    stored = stored_result({"qalora": {2e-4: 4.8, 2e-3: 4.0, 4e-3: 3.9, 8e-3: 3.95},
                            "qahira": {2e-4: 4.9, 2e-3: 4.5}},
                           {"qalora": [0, 1, 2], "qahira": [0, 1, 2]}, {"qalora": 4e-3, "qahira": 2e-3})
    for m in stored["methods"]:
        for r in stored["runs"]:
            r.setdefault("merge", "fold")
            r.setdefault("step_s", 1.0)
    text = finetune_paper.markdown(stored)
    assert "lr grid per method: QALORA 0.0002, 0.002, 0.004, 0.008; QAHIRA 0.0002, 0.002" in text
    assert "| QAHIRA | 4.9000 | **4.5000** | – | – |" in text
    assert "| QALORA | 4.8000 | 4.0000 | **3.9000** | 3.9500 |" in text
    claim = text.split("QA-HiRA beats QA-LoRA")[1]
    assert "the chosen lr of QAHIRA is at the edge of its grid" in claim  # QA-LoRA's 4e-3 is inside its grid


def test_tiny_resume_reuses_runs_and_reruns_identically(tmp_path):
    """A stored tiny result extended upward: the stored point is not re-run (except the one --verify-lr re-runs,
    which gives the stored validation loss again), the new points run, the best lr moves and gets its seeds."""
    common = ["--model", "tiny-llama", "--rank", "4", "--alpha", "1", "--steps", "2", "--seeds", "0", "1",
              "--seq", "16", "--val", "4", "--held-out", "4", "--out", str(tmp_path), "--methods", "qalora"]
    finetune_paper.main([*common, "--lrs", "1e-4", "--part", "a"])
    stored = tmp_path / "finetune_quality_paper.a.json"
    finetune_paper.main([*common, "--lrs", "1e-4", "1e-2", "--resume", str(stored), "--verify-lr", "1e-4",
                         "--part", "b"])
    import json

    before = json.loads(stored.read_text())
    after = json.loads((tmp_path / "finetune_quality_paper.b.json").read_text())
    def strip(r):  # the old best becomes a sweep point
        return {k: v for k, v in r.items() if k != "phase"}
    old = [strip(r) for r in before["runs"]]
    assert all(r in map(strip, after["runs"]) for r in old)  # reused as stored
    new = [r for r in after["runs"] if strip(r) not in old]
    # 1e-2 beats 1e-4 at 2 steps: its sweep point on the lr seed, then both reported seeds as runs of their own
    assert sorted((r["lr"], r["seed"]) for r in new) == [(1e-2, 0), (1e-2, 1), (1e-2, finetune_paper.LR_SEED)]
    assert after["methods"]["qalora"]["best_lr"] == 1e-2 and after["methods"]["qalora"]["best_lr_before"] == 1e-4
    assert all("merged" in r for r in finetune_paper.final_runs(after, "qalora"))
    (check,) = after["determinism"]
    assert check["lr"] == 1e-4 and check["val_diff"] <= 1e-6 and check["identical"]
    # nothing left to do: a second resume runs nothing (and loads no model)
    finetune_paper.main([*common, "--lrs", "1e-4", "1e-2", "--resume", str(tmp_path / "finetune_quality_paper.b.json"),
                         "--part", "c"])
    again = json.loads((tmp_path / "finetune_quality_paper.c.json").read_text())
    assert again["runs"] == after["runs"]
    with pytest.raises(SystemExit, match="another setting"):
        finetune_paper.main([*common[:-2], "--steps", "3", "--methods", "qalora", "--resume", str(stored)])


def test_the_lr_is_picked_on_the_lr_seed_and_never_reported():
    """With --lr-seed outside the reported seeds (the default), the sweep's seed picks the lr, every reported seed
    is a run of its own at that lr, and the reported mean holds only the reported seeds."""
    args = finetune_paper.options([])
    assert args.lr_seed not in args.seeds  # the default validation seed is not a reported one
    runs = [{"method": "qalora", "lr": lr, "seed": 1000, "steps": 60, "val": v}
            for lr, v in ((1e-3, 4.2), (2e-3, 4.0), (4e-3, 4.1))]
    runs.append({"method": "qalora", "lr": 4e-3, "seed": 0, "steps": 60, "val": 3.0})  # a reported seed's run
    assert finetune_paper.best_sweep_lr(runs, "qalora", 1000) == 2e-3  # seed 0's lower loss does not pick it
    assert finetune_paper.final_todo(runs, "qalora", 2e-3, [0, 1, 2], True, lr_seed=1000) == \
        [(0, "run"), (1, "run"), (2, "run")]
    # the old protocol (lr seed = first reported seed): its sweep run is finished, not re-run
    assert finetune_paper.final_todo(runs, "qalora", 4e-3, [0, 1, 2], True, lr_seed=0) == \
        [(0, "finish"), (1, "run"), (2, "run")]
    finals = [{"method": "qalora", "lr": 2e-3, "seed": s, "val": 4.0, "held": 4.3 + s / 100, "merged": 4.31}
              for s in (0, 1, 2)]
    lr_run = dict(runs[1], held=9.9, merged=9.9)  # the lr seed's run, even if it had held-out losses
    result = {"setting": {"seeds": [0, 1, 2], "lr_seed": 1000}, "runs": [*runs, lr_run, *finals],
              "methods": {"qalora": {"best_lr": 2e-3}}}
    assert sorted(r["seed"] for r in finetune_paper.final_runs(result, "qalora")) == [0, 1, 2]
    assert finetune_paper.summary(result, "qalora")["held"] == pytest.approx(4.31)


def test_a_stored_result_picked_on_a_reported_seed_resumes_only_with_that_lr_seed():
    stored = stored_result({"qalora": {2e-3: 4.0}}, {"qalora": [0]}, {"qalora": 2e-3})  # made before --lr-seed
    with pytest.raises(SystemExit, match="another setting.*lr_seed: stored 0, now 1000"):
        finetune_paper.plan(stored, finetune_paper.options([]))
    finetune_paper.plan(stored, finetune_paper.options(["--lr-seed", "0"]))
    text = finetune_paper.markdown(dict(stored, runs=[dict(r, merge="fold", step_s=1.0) for r in stored["runs"]]))
    assert "seed 0, which is also reported" in text
