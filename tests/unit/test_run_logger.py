"""``RunLogger`` on a resumed job: every step appears once in metrics.jsonl and in TensorBoard."""

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_moe_lossfree.training.logger import RunLogger, truncate_jsonl


def rows(path):
    return [(r["kind"], r["step"], r["loss"]) for r in map(json.loads, open(path))]


def log_steps(out, start_step, steps, loss):
    log = RunLogger(str(out), enabled=True, total_steps=6, start_step=start_step, progress=False)
    for step in steps:
        log.record(step, "train", {"loss": loss(step)})
        if step % 2 == 0:
            log.record(step, "valid", {"loss": loss(step) + 0.5})
    log.close()


def test_a_job_resumed_from_step_2_replaces_the_rows_and_events_logged_after_it(tmp_path, capsys):
    # An interrupted job logged steps 1-4 (checkpoint at step 2) and was cut off mid-row.
    log_steps(tmp_path, 0, [1, 2, 3, 4], loss=float)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "st')
    capsys.readouterr()
    log_steps(tmp_path, 2, [3, 4], loss=lambda s: 10.0 * s)
    assert ("metrics.jsonl: removed 4 row(s) logged after step 2, the step this job resumes from"
            in capsys.readouterr().out)
    assert rows(tmp_path / "metrics.jsonl") == [
        ("train", 1, 1.0), ("train", 2, 2.0), ("valid", 2, 2.5), ("train", 3, 30.0), ("train", 4, 40.0),
        ("valid", 4, 40.5)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [(e.step, e.value) for e in events.Scalars("valid/loss")] == [(2, 2.5), (4, 40.5)]


def test_truncate_jsonl_keeps_an_uninterrupted_file_untouched(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert truncate_jsonl(str(path), last_step=3) == 0 and not path.exists()
    path.write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "train", "step": 3, "loss": 3.0}\n')
    before = path.stat().st_mtime_ns
    assert truncate_jsonl(str(path), last_step=3) == 0
    assert path.stat().st_mtime_ns == before
    # A fresh job (step 0) into an old run's directory starts an empty file.
    assert truncate_jsonl(str(path), last_step=0) == 2 and path.read_text() == ""


def test_a_fresh_job_in_an_old_runs_directory_says_it_replaced_its_rows(tmp_path, capsys):
    log_steps(tmp_path, 0, [1, 2], loss=float)
    capsys.readouterr()
    log_steps(tmp_path, 0, [1], loss=lambda s: 5.0)
    assert (f"metrics.jsonl: removed 3 row(s) of an earlier run in {tmp_path} (this job starts at step 0 "
            "without --load; pass --load to continue that run); TensorBoard hides its events too"
            ) in capsys.readouterr().out
    assert rows(tmp_path / "metrics.jsonl") == [("train", 1, 5.0)]
    # TensorBoard shows the new run only: the old run's events (steps 1 and 2) are purged, as the rows are.
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 5.0)]
    assert [(e.step, e.value) for e in events.Scalars("valid/loss")] == []


def test_a_fresh_job_leaves_a_shared_tensorboard_dir_as_megatron_does(tmp_path):
    """--tensorboard-dir is the user's and may hold other runs: only a resumed job purges there."""
    shared = tmp_path / "tb"
    for out, loss in (("a", 1.0), ("b", 2.0)):
        log = RunLogger(str(tmp_path / out), enabled=True, total_steps=1, start_step=0, progress=False,
                        tensorboard_dir=str(shared))
        log.record(1, "train", {"loss": loss})
        log.close()
    events = EventAccumulator(str(shared))
    events.Reload()
    # Both runs' events are kept. Sorted: the reader orders the two files by name, whose last field is the
    # process's writer count (".9" sorts after ".10" once earlier tests have opened nine writers).
    assert sorted((e.step, e.value) for e in events.Scalars("train/loss")) == [(1, 1.0), (1, 2.0)]


def test_loads_file_holds_one_row_per_step_and_a_resumed_job_replaces_the_later_ones(tmp_path):
    from megatron_moe_lossfree.training.logger import LOADS_FILE

    def dump(start_step, steps, scale):
        log = RunLogger(str(tmp_path), enabled=True, total_steps=4, start_step=start_step, progress=False)
        for step in steps:
            log.record_loads(step, {"layers": [2], "loads": [[scale * step, 1]]})
        log.close()

    dump(0, [1, 2, 3], 1)
    dump(2, [3, 4], 10)  # resumed from step 2: step 3 is logged again
    with open(tmp_path / LOADS_FILE) as fh:
        assert [json.loads(line) for line in fh] == [
            {"step": s, "layers": [2], "loads": [[v, 1]]} for s, v in ((1, 1), (2, 2), (3, 30), (4, 40))]
    log = RunLogger(str(tmp_path / "quiet"), enabled=False, total_steps=1, start_step=0, progress=False)
    log.record_loads(1, {"layers": [], "loads": []})  # a rank that does not log writes nothing
    assert not (tmp_path / "quiet").exists()
