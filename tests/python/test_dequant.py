"""Dequantization vs gguf-py: mn_ref_dequant_row must reproduce gguf.quants.dequantize
bit for bit for every weight type mneme loads.

Writes random blocks (random quant bytes, sane fp16 scales) with the values gguf-py
computes for them into a file (format in tests/tools/dequant_check.c), runs the
dequant_check tool on it and asserts it exits 0. A second run plants one wrong value to
show the check can fail.
"""
import os
import struct
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

BUILD = os.environ.get("MNEME_BUILD_DIR", "/work/main/build")
TOOL = os.path.join(BUILD, "dequant_check")

# type id, elements per block, bytes per block, byte offsets of fp16 scales in a block
TYPES = {
    Q.F32: (1, 4, []),
    Q.F16: (1, 2, []),
    Q.BF16: (1, 2, []),
    Q.Q4_0: (32, 18, [0]),
    Q.Q4_1: (32, 20, [0, 2]),
    Q.Q5_0: (32, 22, [0]),
    Q.Q5_1: (32, 24, [0, 2]),
    Q.Q8_0: (32, 34, [0]),
    Q.Q2_K: (256, 84, [80, 82]),
    Q.Q3_K: (256, 110, [108]),
    Q.Q4_K: (256, 144, [0, 2]),
    Q.Q5_K: (256, 176, [0, 2]),
    Q.Q6_K: (256, 210, [208]),
}


def random_row(rng, qtype, n_blocks):
    be, bb, scale_offs = TYPES[qtype]
    if qtype == Q.F32:
        return rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        f = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32)
        return (f >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, size=(n_blocks, bb), dtype=np.uint8)
    for off in scale_offs:
        # sane scales: normal fp16 values of either sign, plus a few zeros and subnormals
        s = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        s[::7] = np.float16(0.0)
        s[3::11] = np.float16(3e-6)
        raw[:, off:off + 2] = s.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def write_records(path, rng, corrupt=False):
    with open(path, "wb") as f:
        for qtype, (be, bb, _) in TYPES.items():
            for n_blocks in (1, 3, 40):
                row = random_row(rng, qtype, n_blocks)
                want = dequantize(row, qtype).astype(np.float32).reshape(-1)
                assert want.size == n_blocks * be
                if corrupt and qtype == Q.Q5_K and n_blocks == 3:
                    want = want.copy()
                    want[100] = np.nextafter(want[100], np.float32(np.inf))
                f.write(struct.pack("<IQ", int(qtype), want.size))
                f.write(row.tobytes())
                f.write(want.tobytes())


@pytest.fixture(scope="module")
def tool():
    if not os.path.exists(TOOL):
        pytest.fail(f"{TOOL} not built (set MNEME_BUILD_DIR)")
    return TOOL


def test_dequant_matches_gguf(tool, tmp_path):
    path = tmp_path / "dq.bin"
    write_records(path, np.random.default_rng(1234))
    r = subprocess.run([tool, str(path)], capture_output=True, text=True)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok") == 3 * len(TYPES)


def test_dequant_check_detects_mismatch(tool, tmp_path):
    path = tmp_path / "dq_bad.bin"
    write_records(path, np.random.default_rng(99), corrupt=True)
    r = subprocess.run([tool, str(path)], capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Q5_K" in r.stdout and "MISMATCH" in r.stdout
