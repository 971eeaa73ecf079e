"""export onnx: the encoder as an ONNX graph (fp32, optionally an int8 copy), checked against PyTorch."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from allmpnet.weights import DEFAULT_MODEL

FP32_TOLERANCE = 1e-4  # ONNX Runtime's kernels sum in another order than PyTorch's; real drift is far above this


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export the encoder to another runtime (onnx)")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    q = formats.add_parser("onnx", help="ONNX graph: input_ids + attention_mask -> sentence_embedding")
    q.add_argument("out_dir", type=Path, help="folder for model.onnx and the tokenizer files")
    q.add_argument("--model", "-m", default=DEFAULT_MODEL, help="model name, hub id or directory")
    q.add_argument("--opset", type=int, default=17)
    q.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx (ONNX Runtime dynamic int8); its cosine to fp32 is reported")
    q.set_defaults(func=cmd_export_onnx)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from allmpnet.encode import Encoder
    from allmpnet.export.onnx import check_parity, export_onnx, quantize_int8
    enc = Encoder(args.model, device="cpu", precision="fp32")
    path = export_onnx(enc, args.out_dir, opset=args.opset)
    parity = check_parity(enc, path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB); vs PyTorch fp32: max |diff| "
          f"{parity.max_abs_diff:.2e}, min cosine {parity.min_cosine:.6f}")
    if parity.max_abs_diff > FP32_TOLERANCE:
        print(f"allmpnet export: error: the exported graph differs from PyTorch by {parity.max_abs_diff:.2e} "
              f"(> {FP32_TOLERANCE:g}); do not use it", file=sys.stderr)
        return 1
    if args.int8:
        int8_path = quantize_int8(path)
        parity = check_parity(enc, int8_path)
        print(f"wrote {int8_path} ({int8_path.stat().st_size / 1e6:.0f} MB); vs PyTorch fp32: "
              f"min cosine {parity.min_cosine:.4f}")
        if parity.min_cosine < 0.99:
            print("warning: int8 vectors are far from fp32 (MPNet's feed-forward activations have outliers that "
                  "per-tensor int8 cannot represent); prefer bf16 for quality", file=sys.stderr)
    return 0
