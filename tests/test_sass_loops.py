"""bench/sass_loops.py's reading of the decode kernels' names and its per-M model (no compiler involved)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sass_loops as sl  # noqa: E402


def _loop(kind, tokens, per_2k=500.0):
    return sl.Loop(label=f"{kind} bf16 nf4-dq M<={tokens}", kind=kind, dtype="bf16", scheme="nf4-dq", tokens=tokens,
                   per_2k=per_2k, top="")


def test_kernel_labels_name_each_kernel_and_its_tokens():
    name = "_ZN9fusedlora12_GLOBAL__N_1{}I13__nv_bfloat16LNS_6FormatE1ELi{}EEEvNS_10DecodeArgsE"
    assert sl.kernel_label(name.format("21gemv_lora_wide_kernel", 8)).split() == ["128-row", "bf16", "nf4-dq",
                                                                                  "M<=64"]
    assert sl.kernel_label(name.format("20gemv_lora_mma_kernel", 2)).split() == ["tensor-core", "bf16", "nf4-dq",
                                                                                 "M<=16"]
    assert sl.kernel_label(name.format("16gemv_lora_kernel", 4)).split() == ["GEMV", "bf16", "nf4-dq", "M<=4"]
    assert sl.kernel_label("_Z10xa_kernelI6__halfEvPKT_") is None


def test_decode_model_picks_the_kernel_the_dispatcher_runs():
    """The 128-row kernel from wide_min_m on (M = 10 on 4096 -> 14336), the 16-row one below; the mma time
    counts every token of the picked instantiation's tiles, and a K split adds its fp32 partials' bytes."""
    from fusedlora.ops.decode import wide_min_m, wide_splits

    loops = [_loop("tensor-core", 8), _loop("tensor-core", 16), _loop("128-row", 16, 510.0),
             _loop("128-row", 32, 600.0), _loop("128-row", 64, 850.0)]
    assert wide_min_m(4096, 14336) == 10 and wide_min_m(4096, 4096) == 17
    assert sl.picked(loops, 9, 1, 10).label == "tensor-core bf16 nf4-dq M<=16"
    assert sl.picked(loops, 10, 1, 10).label == "128-row bf16 nf4-dq M<=16"
    assert sl.picked(loops, 17, 1, 17).label == "128-row bf16 nf4-dq M<=32"
    assert sl.picked(loops, 33, 1, 17).label == "128-row bf16 nf4-dq M<=64"
    rows = {m: sl.decode_row(loops, "H100-SXM", 4096, 14336, m) for m in (9, 10, 33, 64)}
    assert rows[9]["loop"].startswith("tensor-core") and rows[10]["loop"].startswith("128-row")
    assert rows[64]["tensor_us"] == rows[33]["tensor_us"] > 0  # 64 tokens of tiles either way
    assert rows[33]["tensor_us"] == 4 * rows[10]["tensor_us"]  # 64 tokens of tiles against 16
    # 4096 -> 4096 splits K over 4 blocks per 128 rows: the partials' bytes go into the time
    assert wide_splits(4096, 4096, 132) == 4
    split = sl.decode_row(loops, "H100-SXM", 4096, 4096, 64)
    assert split["ours_us"] > max(split["issue_us"], split["copy_us"], split["tensor_us"]) + 3.0


def test_reach_line_counts_cases_no_kernel_can_meet():
    """The best case has only the bytes and the launch: 3 µs of each is 50 % of copy, below the 75 % target
    whatever the loop; 12 µs of bytes against 3 of launch is 80 %."""
    rows = [{"copy_us": 3.0, "cublas_us": 14.0}, {"copy_us": 12.0, "cublas_us": 50.0}]
    line = sl.reach_line(rows, 3.0)
    assert "% of copy 50-80" in line and "speedup 2.33-3.33" in line
    assert line.endswith("out of any kernel's reach in 1 of 2")
    assert sl.reach_line(rows[1:], 3.0).endswith("every case can meet both targets")


def test_objects_from_names_the_missing_object(tmp_path):
    """--objects-from reads the CMake build's object of each .cu; a folder without exactly one says which
    object it looked for, how many it found and how to build them, before running any tool."""
    source = Path(sl.ROOT) / "csrc" / "decode_lora.cu"
    with pytest.raises(SystemExit, match=r"expected one decode_lora\.cu\.o under it, found 0 .*cmake --build"):
        sl.disassemble(source, "90", tmp_path, objects=tmp_path)
    for sub in ("a", "b"):  # two builds under one folder: ambiguous
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "decode_lora.cu.o").write_bytes(b"")
    with pytest.raises(SystemExit, match="found 2"):
        sl.disassemble(source, "90", tmp_path, objects=tmp_path)
