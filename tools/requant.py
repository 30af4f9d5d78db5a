#!/usr/bin/env python3
"""tools/requant.py — rewrite a GGUF with its 2-D weight matrices in another type.

Used to make a Q8_0 (or F16 / Q4_0) copy of the default model for speed comparisons:
    python3 tools/requant.py IN.gguf OUT.gguf --type Q8_0
Every tensor is dequantized with the `gguf` package and quantized again; norms and other
1-D tensors stay F32. Metadata is copied unchanged except general.file_type.
"""
import argparse
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}


def copy_metadata(reader, writer, file_type):
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_uint32(key, file_type)
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
        else:
            writer.add_key_value(key, field.contents(), vtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--type", default="Q8_0", choices=sorted(FILE_TYPE))
    a = ap.parse_args()
    target = QT[a.type]
    r = gguf.GGUFReader(a.input)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(a.output, arch)
    copy_metadata(r, w, FILE_TYPE[a.type])
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in reversed(t.shape)]  # numpy order: rows first
        data = data.reshape(shape)
        if len(shape) == 2 and shape[-1] % gguf.GGML_QUANT_SIZES[target][0] == 0:
            q = gguf.quants.quantize(data, target)
            w.add_tensor(t.name, q, raw_dtype=target)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
