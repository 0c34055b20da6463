#!/usr/bin/env python3
"""OpenCLIP CoCa captioning throughput on CPU, called the way RayGen calls it.

Builds `coca_ViT-L-14` with random weights (torch.manual_seed(SEED); the decoder's
`text_projection`, which OpenCLIP leaves uninitialised, drawn from N(0, width^-0.5)), saves the
state dict and the input images to --weights / --images if those files do not exist yet (so
dfndr's bench loads exactly the same weights and images), then times RayGen's loop: for each of
--captions captions, `model.generate(images, generation_type="top_p", top_p=0.9,
fixed_output_length=True)` on the whole image batch, under torch.inference_mode(), fp32.

Also times `_encode_image` alone (the part of each generate() call that encodes the images) and
one image at batch 1. Prints one JSON line.
"""
import argparse
import json
import os
import time

import torch
import open_clip
from safetensors.torch import load_file, save_file


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--captions", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = open_clip.create_model("coca_ViT-L-14", pretrained=None)
    with torch.no_grad():
        width = model.text_decoder.width
        torch.nn.init.normal_(model.text_decoder.text_projection, std=width ** -0.5)
    model.eval()
    if os.path.exists(a.weights):
        model.load_state_dict(load_file(a.weights))
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.weights)
    images = load_file(a.images)["images"] if os.path.exists(a.images) else None
    if images is None or images.shape[0] < a.batch:
        # A fixed pool (at least 32 images) both sides slice the batch from.
        pool = max(32, a.batch)
        images = torch.randn(pool, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        save_file({"images": images}, a.images)
    images = images[: a.batch]

    def captions(batch):
        out = []
        for _ in range(a.captions):
            out.append(model.generate(batch, generation_type="top_p", top_p=0.9,
                                      fixed_output_length=True))
        return out

    with torch.inference_mode():
        model._encode_image(images[:1])  # warm-up
        t0 = time.perf_counter()
        ids = captions(images)
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        model._encode_image(images)
        encode = time.perf_counter() - t0
        t0 = time.perf_counter()
        captions(images[:1])
        batch1 = time.perf_counter() - t0
    n = a.batch * a.captions
    print(json.dumps({
        "impl": "OpenCLIP generate (RayGen loop)",
        "images": a.batch, "captions_per_image": a.captions, "threads": a.threads,
        "seq_len": int(ids[0].shape[1]),
        "seconds": total, "captions_per_s": n / total,
        "encode_seconds": encode * a.captions, "decode_seconds": total - encode * a.captions,
        "batch1_seconds_per_image": batch1,
    }))


if __name__ == "__main__":
    main()
