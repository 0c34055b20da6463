"""Python reference for bench/teachers.sh: OpenCLIP (PyTorch) encode_image / encode_text on CPU.

open_clip.create_model(NAME, pretrained=None) (random weights), eval, fp32, no autocast, under
torch.inference_mode(), with torch.set_num_threads(THREADS). Images: one random normal tensor
[B, 3, S, S] (already "normalised"); texts: the demo captions (the .txt members of the demo
tars, stripped, in file order) repeated to the text batch and tokenised with
open_clip.get_tokenizer(NAME). Times ITERS calls of each after one untimed warm-up (the median call counts) and
prints one JSON line. With --profile, also prints torch.profiler's per-op table of one image-batch
forward to stderr.

Usage: python bench/teachers_reference.py [--model NAME] [--batch B] [--text-batch N]
           [--iters N] [--threads T] [--demo DIR] [--profile]
"""

import argparse
import json
import os
import sys
import tarfile
import time

import torch
import open_clip


def captions(demo_dir):
    out = []
    for name in sorted(os.listdir(demo_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(demo_dir, name)) as tar:
                for m in tar.getmembers():
                    if m.isfile() and m.name.endswith(".txt"):
                        text = tar.extractfile(m).read().decode("utf-8").strip()
                        if text:
                            out.append(text)
    if not out:
        sys.exit(f"no captions in {demo_dir}")
    return out


def time_per_call(iters, f):
    """Median seconds per call over ITERS calls after one warm-up (the machine drifts)."""
    out = f()  # warm-up
    assert torch.isfinite(out).all(), "non-finite embeddings"
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        out = f()
        seconds.append(time.perf_counter() - start)
        assert torch.isfinite(out).all(), "non-finite embeddings"
    return sorted(seconds)[len(seconds) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-L-14-quickgelu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--demo", default="assets/demo")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = open_clip.create_model(a.model, pretrained=None).eval().float()
    load_s = time.perf_counter() - start
    tokenizer = open_clip.get_tokenizer(a.model)

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(a.batch, 3, size, size)
    caps = captions(a.demo)
    ids = tokenizer([caps[i % len(caps)] for i in range(a.text_batch)])

    with torch.inference_mode():
        image_s = time_per_call(a.iters, lambda: model.encode_image(images))
        text_s = time_per_call(a.iters, lambda: model.encode_text(ids))
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.encode_image(images)
            print(f"\nOpenCLIP profile: one forward of {a.batch} images (torch.profiler, self CPU time)",
                  file=sys.stderr)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12),
                  file=sys.stderr)

    print(json.dumps({
        "impl": "OpenCLIP (PyTorch)",
        "model": a.model,
        "threads": torch.get_num_threads(),
        "batch": a.batch,
        "text_batch": a.text_batch,
        "iters": a.iters,
        "images_per_s": a.batch / image_s,
        "texts_per_s": a.text_batch / text_s,
        "token_sum": int(ids.sum()),
        "load_s": load_s,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }))


if __name__ == "__main__":
    main()
