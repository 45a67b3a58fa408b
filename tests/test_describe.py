import json

import pytest

from conftest import run_script
from nas.references import REFERENCES


def test_describe_reference_prints_one_json_object():
    result = run_script("describe.py", "mobilenet_v2")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["arch"] == REFERENCES["mobilenet_v2"]
    assert (row["params"], row["flops"], row["resolution"]) == (3_504_872, 314_193_216, 224)


def test_describe_accepts_strings_and_json_files(tmp_path):
    text = REFERENCES["mnasnet1_0"]
    from_string = json.loads(run_script("describe.py", text).stdout)
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"arch": text, "accuracy": 0.9}))
    from_file = json.loads(run_script("describe.py", str(path)).stdout)
    assert from_string == from_file and from_string["params"] == 4_383_312


def test_describe_samples_a_space_deterministically():
    args = ("--space", "search_spaces/mnasnet.yaml", "--sample", "4", "--seed", "3")
    first, second = run_script("describe.py", *args), run_script("describe.py", *args)
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert first.stdout == second.stdout and len(rows) == 4
    assert all({"arch", "params", "flops", "resolution"} <= row.keys() and row["resolution"] == 32 for row in rows)
    assert len({row["arch"] for row in rows}) == 4


@pytest.mark.parametrize("arch", ["i32-conv_k4_c8_re-avg", "i32-conv_k3_s3_c8_re-avg", "nonsense", "i32-blob_k3-avg", "missing.json"])
def test_describe_rejects_bad_architectures_with_one_line(arch):
    result = run_script("describe.py", arch)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and arch in result.stderr
