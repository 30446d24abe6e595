"""bf16 autocast vs fp32 image embedding on this machine's CPU (or GPU with --device cuda):
throughput and the minimum cosine similarity between the two embeddings of the same batch.

    python benchmarks/bf16_bench.py --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch

from histoindex._compat import import_timm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "resnet18", "resnet50"])
    args = ap.parse_args()
    timm = import_timm()
    device = torch.device(args.device)
    print("| backbone | precision | img/s | min cosine to fp32 |\n|---|---|---|---|")
    for name in args.backbones:
        model = timm.create_model(name, pretrained=False, num_classes=0).eval().to(device).to(memory_format=torch.channels_last)
        x = torch.randn(args.batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
        with torch.inference_mode():
            reference = model(x)
            for precision in ("fp32", "bf16"):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    model(x)  # warm-up
                    started = time.perf_counter()
                    for _ in range(2):
                        y = model(x)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    rate = 2 * args.batch / (time.perf_counter() - started)
                cosine = torch.nn.functional.cosine_similarity(y.float(), reference, dim=1).min().item()
                print(f"| {name} | {precision} | {rate:.1f} | {cosine:.6f} |", flush=True)


if __name__ == "__main__":
    main()
