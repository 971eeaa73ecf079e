"""export onnx: the encoder as an ONNX export folder (sentence-transformers' layout; fp32, optionally an int8 graph
beside it), checked against PyTorch."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from allmpnet.weights import DEFAULT_MODEL

FP32_TOLERANCE = 1e-5  # ONNX Runtime's kernels sum in another order than PyTorch's (~3e-7 measured); drift is far above
INT8_MIN_COSINE = 0.99  # the int8 graph's worst cosine to fp32 on the parity texts below which it is refused


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export the encoder to another runtime (onnx)")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    q = formats.add_parser("onnx", help="ONNX export folder (loads in sentence-transformers backend='onnx', fastembed, "
                                        "ONNX Runtime): input_ids + attention_mask -> last_hidden_state, "
                                        "sentence_embedding")
    q.add_argument("out_dir", type=Path, help="the export folder (onnx/model.onnx, tokenizer and config files)")
    q.add_argument("--model", "-m", default=DEFAULT_MODEL, help="model name, hub id or directory")
    q.add_argument("--opset", type=int, default=17)
    q.add_argument("--int8", action="store_true",
                   help="also write onnx/model_int8.onnx: int8 weights and per-token int8 activations, smoothed "
                        "(stock ONNX Runtime ops); its cosine to fp32 is reported")
    q.set_defaults(func=cmd_export_onnx)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from allmpnet.encode import Encoder
    from allmpnet.export.int8 import export_int8
    from allmpnet.export.onnx import check_parity, export_onnx
    enc = Encoder(args.model, device="cpu", precision="fp32")
    path = export_onnx(enc, args.out_dir, opset=args.opset)
    parity = check_parity(enc, args.out_dir)
    print(f"wrote {args.out_dir} ({path.relative_to(args.out_dir)}: {path.stat().st_size / 1e6:.0f} MB); vs PyTorch "
          f"fp32: max |diff| {parity.max_abs_diff:.2e}, min cosine {parity.min_cosine:.6f}")
    if parity.max_abs_diff > FP32_TOLERANCE:
        print(f"allmpnet export: error: the exported graph differs from PyTorch by {parity.max_abs_diff:.2e} "
              f"(> {FP32_TOLERANCE:g}); do not use it", file=sys.stderr)
        return 1
    if args.int8:
        int8_path = export_int8(enc, path)
        parity = check_parity(enc, int8_path)
        print(f"wrote {int8_path.relative_to(args.out_dir)} ({int8_path.stat().st_size / 1e6:.0f} MB); vs PyTorch "
              f"fp32: min cosine {parity.min_cosine:.4f}")
        if parity.min_cosine < INT8_MIN_COSINE:
            print(f"allmpnet export: error: the int8 graph's vectors are far from fp32 (min cosine "
                  f"{parity.min_cosine:.4f} < {INT8_MIN_COSINE}); do not use it", file=sys.stderr)
            return 1
    return 0
