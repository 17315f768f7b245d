"""The generated protobuf modules in shared/proto are exactly what proto/ generates today."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_regenerating_proto_gives_no_diff(tmp_path: Path):
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    subprocess.run([str(ROOT / "ci" / "generate-proto.sh"), str(tmp_path)], check=True, env=env, cwd=ROOT)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2.py*"))
    assert generated, "protoc produced nothing"
    for relative in generated:
        assert (tmp_path / relative).read_text() == (ROOT / "shared" / "proto" / relative).read_text(), relative


def test_series_ingested_round_trips():
    from shared.proto.voxelflow.v1.ingest_pb2 import SeriesIngested

    message = SeriesIngested(series_instance_uid="2.25.1", shape=[36, 48, 35], spacing_mm=[1.0, 1.0, 1.0])
    assert SeriesIngested.FromString(message.SerializeToString()) == message
