"""The ahead-of-time compile report (bench/compile_report.py): its subset compiles for sm_90 on this
machine, with or without a GPU, and the kernels it compiles use warpgroup MMA without spilling.

The suite runs under TRITON_INTERPRET=1 on CPU; the report compiles in worker processes that drop the
variable, so this also checks that it works from an interpreting process.
"""
import csv

import pytest

from bench import compile_report

pytestmark = pytest.mark.skipif(compile_report.cuobjdump_path() is None,
                                reason="cuobjdump not found (Triton's wheel ships it in triton/backends/nvidia/bin)")


def test_subset_compiles_for_sm90_with_hgmma_and_no_spills(tmp_path):
    rows, summary = compile_report.run(tmp_path, arch=90, subset=True, workers=2, log=lambda line: None)

    with open(tmp_path / "compile_report.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) == summary["rows"]
    kernels = {case.kernel for case in compile_report.CASES}
    assert {row["kernel"] for row in written} == kernels
    matmuls = {case.kernel for case in compile_report.CASES if any(v.matmul for v in case.variants)}
    assert matmuls and matmuls != kernels  # the column-sum, loss and optimizer kernels have no matmul
    for row in written:
        assert row["status"] == "ok", row
        assert int(row["spill_bytes"]) == 0 and int(row["stl"]) == 0, row
        assert int(row["registers"]) > 0, row
        assert int(row["shared_memory_bytes"]) > 0 or row["kernel"] not in matmuls, row  # MMA operands staged

    def rows_of(**match):
        return [row for row in written if row["kernel"] in matmuls and all(row[k] == v for k, v in match.items())]

    bf16 = rows_of(dtype="bfloat16")
    assert {row["kernel"] for row in bf16} == matmuls and all(int(row["hgmma"]) > 0 for row in bf16)
    ieee = rows_of(precision="ieee")
    assert ieee and all(int(row["hgmma"]) == int(row["hmma"]) == 0 < int(row["ffma"]) for row in ieee)
    fp64 = rows_of(dtype="float64")
    assert {row["kernel"] for row in fp64} == matmuls and all(int(row["dmma"]) > 0 for row in fp64)
    assert summary["failures"] == summary["spills"] == summary["missing_tensor_cores"] == 0


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        compile_report.main(["--help"])
    assert exit_info.value.code == 0
    assert "--subset" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--out", "FILE"], "a file, not a directory"),
                                           (["--out", "DIR", "--workers", "0"], "--workers: at least 1")])
def test_bad_options_are_refused_before_compiling(tmp_path, capsys, argv, message):
    (tmp_path / "FILE").touch()
    with pytest.raises(SystemExit) as exit_info:
        compile_report.main([str(tmp_path / a) if a in ("FILE", "DIR") else a for a in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_compare_matches_rows_by_compile_and_reports_what_changed():
    """compare() pairs the rows of two reports that describe one compile (the CSV's text against a run's
    values), and counts per kernel those with other registers or spills and those only one report has."""
    def row(kernel, tile, registers, spill, **extra):
        return dict(kernel=kernel, variant="v", dtype="bfloat16", precision="", sizes="odd", tile=tile, stages=3,
                    warps=4, registers=registers, spill_bytes=spill, **extra)

    base = [{k: str(v) for k, v in r.items()} for r in (
        row("a_kernel", "64x64x16", 62, 0), row("a_kernel", "64x64x32", 80, 0), row("a_kernel", "32x32x32", 40, 8),
        row("gone_kernel", "16x16x16", 30, 0))]
    rows = [row("a_kernel", "64x64x16", 62, 0), row("a_kernel", "64x64x32", 95, 0), row("a_kernel", "32x32x32", 40, 0),
            row("a_kernel", "128x64x64", 120, 0)]
    table = compile_report.compare(base, rows).splitlines()
    assert table[1].split() == ["a_kernel", "3", "1", "1", "1", "0"]
    assert table[2].split() == ["gone_kernel", "0", "0", "0", "0", "1"]
    assert table[3] == "spills changed:"
    assert table[4].strip() == "a_kernel v bfloat16 odd 32x32x32 3 4: 40 registers, 8 B spilled -> 40, 0 B"
    assert len(table) == 5
