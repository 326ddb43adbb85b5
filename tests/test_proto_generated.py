"""The committed protobuf/gRPC code is exactly what the .proto generates."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "client" / "klservice_client" / "_proto"


def test_generated_code_matches_proto(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_proto.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(p.name for p in COMMITTED.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    for name in generated:
        assert (tmp_path / name).read_text() == (COMMITTED / name).read_text(), (
            f"{name} is stale: run `make proto` (python scripts/generate_proto.py) and commit the result"
        )


def test_every_proto_field_and_enum_value_is_commented():
    lines = (ROOT / "proto" / "klservice" / "v1" / "klservice.proto").read_text().splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("syntax", "option"))
        is_declaration = stripped.startswith(("message ", "enum ", "rpc ", "service ", "oneof "))
        if is_field or is_declaration:
            previous = lines[number - 1].strip()
            assert previous.startswith("//"), f"line {number + 1} has no comment: {stripped}"


def test_enums_start_with_unspecified():
    from klservice_client._proto import klservice_pb2 as pb

    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name
