"""Writes a copy of a GGUF model with its Q4_1 tensors requantized to Q8_0 or Q4_0, with gguf-py (llama.cpp's
own Python library): the same model in a type llama.cpp has batched matrix kernels for on x86 (llamafile's
tinyBLAS covers Q8_0 and Q4_0, not Q4_1), to measure how much batching gains with them.

Each Q4_1 tensor is dequantized and quantized again, so the copy's weights are the Q4_1 weights rounded to
the new type: a model for timing, not a better model. Metadata and every other tensor are copied as they are
(``general.file_type`` says the new type).

Run: python bench/requantize.py SRC.gguf DST.gguf Q8_0
"""

from __future__ import annotations

import argparse
from typing import Any

import gguf

#: llama.cpp's ``general.file_type`` of a model mostly in each type.
FILE_TYPES = {gguf.GGMLQuantizationType.Q8_0: 7, gguf.GGMLQuantizationType.Q4_0: 2}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("type", choices=[t.name for t in FILE_TYPES])
    args = parser.parse_args()
    target = gguf.GGMLQuantizationType[args.type]
    reader = gguf.GGUFReader(args.source)
    writer = gguf.GGUFWriter(args.destination, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        # The architecture and the GGUF.* header fields are the writer's own.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value: Any = FILE_TYPES[target] if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    tensors = []
    for tensor in reader.tensors:
        data, kind = tensor.data, tensor.tensor_type
        if kind == gguf.GGMLQuantizationType.Q4_1:
            data, kind = gguf.quants.quantize(gguf.quants.dequantize(data, kind), target), target
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, kind)
        tensors.append(data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in tensors:
        writer.write_tensor_data(data)
    writer.close()
    print(f"wrote {args.destination}: {sum(d.nbytes for d in tensors) / 1e6:.1f} MB of tensors")


if __name__ == "__main__":
    main()
