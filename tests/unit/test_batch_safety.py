"""The batch job never destroys data: not its input, not a file it did not write, not another
input's results; and the job entrypoint is passed to Ray's shell quoted."""

import json
import os
import shlex
import subprocess

import pytest

from jobs.batch import main
from jobs.checkpoint import OutputRefused, ResultLog
from orchestrator.cluster import jobs as cluster_jobs
from tests.unit.test_batch_runner import FakeOpenAI, write_input


@pytest.fixture
def fake():
    server = FakeOpenAI()
    yield server
    server.close()


def snapshot(directory):
    """Every file under `directory` with its bytes: what a refusal must leave as it was."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def job(inp, out, *extra, endpoint="http://127.0.0.1:9/v1"):
    return main(["--input", str(inp), "--output", str(out), "--endpoint", endpoint, "--no-ray",
                 "--progress-interval-s", "0", *extra])


def assert_refused(capsys, code, *words):
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("input_name, output_name, errors_name, reason", [
    ("in.jsonl", "in.jsonl", None, "is the input file"),
    ("in.jsonl", "link-to-in.jsonl", None, "is the input file"),
    ("in.jsonl", "out.jsonl", "in.jsonl", "is the input file"),
    ("out.parquet.partial.jsonl", "out.parquet", None, "is the input file"),
    ("in.jsonl", "out.jsonl", "out.jsonl", "same file"),
])
def test_an_output_that_is_the_input_or_another_output_file_is_refused(tmp_path, capsys, input_name,
                                                                        output_name, errors_name, reason):
    write_input(tmp_path / input_name, 2)
    os.symlink(tmp_path / input_name, tmp_path / "link-to-in.jsonl")
    errors = ["--errors", str(tmp_path / errors_name)] if errors_name else []
    before = snapshot(tmp_path)
    assert_refused(capsys, job(tmp_path / input_name, tmp_path / output_name, *errors), reason)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content", [b"my notes\nkeep these\n", b"no newline at the end", b'{"a": 1}\n'])
def test_a_file_the_job_did_not_write_is_refused_not_truncated(tmp_path, capsys, content):
    write_input(tmp_path / "in.jsonl", 2)
    (tmp_path / "out.jsonl").write_bytes(content)
    before = snapshot(tmp_path)
    assert_refused(capsys, job(tmp_path / "in.jsonl", tmp_path / "out.jsonl"), str(tmp_path / "out.jsonl"))
    assert snapshot(tmp_path) == before


def test_a_results_log_with_a_bad_line_inside_is_refused_by_the_log_itself(tmp_path):
    out = tmp_path / "out.jsonl"
    good = json.dumps({"id": "x", "custom_id": "a", "response": None, "error": None})
    out.write_text(good + "\nnot a record\n" + good.replace('"a"', '"b"') + "\n")
    before = snapshot(tmp_path)
    with pytest.raises(OutputRefused, match="line 2 is not a result record"):
        ResultLog(out).open()
    assert snapshot(tmp_path) == before


def test_results_of_another_input_are_refused_and_left_as_they_were(tmp_path, capsys, fake):
    write_input(tmp_path / "a.jsonl", 3)
    assert job(tmp_path / "a.jsonl", tmp_path / "out.jsonl", endpoint=fake.url) == 0
    # Same custom_ids, other prompts: a different input, whatever the ids say.
    (tmp_path / "b.jsonl").write_text((tmp_path / "a.jsonl").read_text().replace("question", "other question"))
    before = snapshot(tmp_path)
    assert_refused(capsys, job(tmp_path / "b.jsonl", tmp_path / "out.jsonl", endpoint=fake.url),
                   str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "choose another --output")
    assert snapshot(tmp_path) == before
    # The same input resumes, and an input grown by new requests resumes too.
    assert job(tmp_path / "a.jsonl", tmp_path / "out.jsonl", endpoint=fake.url) == 0
    first = (tmp_path / "out.jsonl").read_text()
    write_input(tmp_path / "a.jsonl", 5)
    assert job(tmp_path / "a.jsonl", tmp_path / "out.jsonl", endpoint=fake.url) == 0
    final = (tmp_path / "out.jsonl").read_text()
    assert final.startswith(first)
    assert sorted(json.loads(x)["custom_id"] for x in final.splitlines()) == [f"q{i}" for i in range(5)]


def test_a_results_log_without_its_record_is_refused(tmp_path, capsys, fake):
    write_input(tmp_path / "in.jsonl", 2)
    assert job(tmp_path / "in.jsonl", tmp_path / "out.jsonl", endpoint=fake.url) == 0
    (tmp_path / "out.jsonl.meta.json").unlink()
    before = snapshot(tmp_path)
    assert_refused(capsys, job(tmp_path / "in.jsonl", tmp_path / "out.jsonl", endpoint=fake.url), "meta.json")
    assert snapshot(tmp_path) == before


def test_an_errors_file_that_is_not_this_outputs_is_not_clobbered(tmp_path, capsys):
    write_input(tmp_path / "in.jsonl", 2)
    (tmp_path / "errs.jsonl").write_text("someone else's\n")
    before = snapshot(tmp_path)
    code = job(tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--errors", str(tmp_path / "errs.jsonl"))
    assert_refused(capsys, code, str(tmp_path / "errs.jsonl"))
    assert snapshot(tmp_path) == before


def test_a_parquet_output_of_another_run_is_not_overwritten(tmp_path, capsys, fake):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_input(tmp_path / "in.jsonl", 2)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "theirs.parquet")
    before = snapshot(tmp_path)
    assert_refused(capsys, job(tmp_path / "in.jsonl", tmp_path / "theirs.parquet", endpoint=fake.url),
                   str(tmp_path / "theirs.parquet"))
    assert snapshot(tmp_path) == before
    # Its own Parquet output is rewritten on a rerun; another input's is not.
    assert job(tmp_path / "in.jsonl", tmp_path / "out.parquet", endpoint=fake.url) == 0
    assert job(tmp_path / "in.jsonl", tmp_path / "out.parquet", endpoint=fake.url) == 0
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 2
    (tmp_path / "other.jsonl").write_text((tmp_path / "in.jsonl").read_text().replace("question", "q"))
    before = snapshot(tmp_path)
    assert_refused(capsys, job(tmp_path / "other.jsonl", tmp_path / "out.parquet", endpoint=fake.url),
                   "another input")
    assert snapshot(tmp_path) == before


ARGS = ["--input", "/data/my batch/in.jsonl", "--output", "/data/out $(touch MARKER).jsonl",
        "--model", "it's `id`", "--weight", "1.5"]


def test_the_entrypoint_quotes_every_argument_for_the_shell(tmp_path):
    args = [a.replace("MARKER", str(tmp_path / "marker")) for a in ARGS]
    entrypoint = cluster_jobs.batch_entrypoint(args)
    assert shlex.split(entrypoint) == ["python", "-m", "jobs.batch", *args]
    assert entrypoint.startswith("python ")
    echoed = subprocess.run(["bash", "-c", "echo" + entrypoint.removeprefix("python")],
                            capture_output=True, text=True, timeout=10, check=True).stdout
    assert echoed == " ".join(["-m", "jobs.batch", *args]) + "\n"
    assert not (tmp_path / "marker").exists()


def test_job_rows_read_a_quoted_output_back(monkeypatch):
    class Job:
        submission_id, job_id, status, message, start_time = "raysubmit_1", None, "RUNNING", "", 1
        entrypoint = cluster_jobs.batch_entrypoint(ARGS)

    output = ARGS[ARGS.index("--output") + 1]
    monkeypatch.setattr(cluster_jobs, "_progress_by_output", lambda: {output: {"done": 3, "total": 9}})
    [row] = cluster_jobs.job_rows([Job()])
    assert (row["output"], row["done"], row["total"]) == (output, 3, 9)
