#!/usr/bin/env python3
"""OpenCLIP MobileCLIP2-S0 training steps on CPU: timm `fastvit_mci0` + OpenCLIP text tower,
Apple's DRClipLoss (distillation weights 0/1, teacher scales 70/60, two 768-d teachers), AdamW
with OpenCLIP's decay groups, gradient clipping 1.0, logit-scale clamp: the step of Apple's
training patch, fp32.

Builds the model with random weights (torch.manual_seed(SEED)) and a random batch in memory,
and saves both to --weights / --data if those files do not exist yet, so dfndr's bench trains
exactly the same model on the same data. Times --steps steps after one warm-up step and prints
one JSON line: samples_per_s (median step), step_seconds (all steps).
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import open_clip
from safetensors.torch import load_file, save_file

DIMS = (768, 768)
SCALES = (70.0, 60.0)


def targets(a, b):
    out, start = 0, 0
    for d, t in zip(DIMS, SCALES):
        out = out + F.softmax(t * a[:, start:start + d] @ b[:, start:start + d].T, dim=1)
        start += d
    return out / len(DIMS)


def caption_set(f_i, f_x, s, e_i, e_x):
    l_i2t, l_t2i = s * f_i @ f_x.T, s * f_x @ f_i.T
    with torch.no_grad():
        p_i2t, p_t2i = targets(e_i, e_x), targets(e_x, e_i)
    kd = lambda p, l: -(p * l.log_softmax(dim=1)).sum(dim=1).mean()  # noqa: E731
    return (kd(p_i2t, l_i2t) + kd(p_t2i, l_t2i)) / 2


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--towers", action="store_true",
                   help="time each tower's forward and backward alone (sum of squares as the loss)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile one more step with torch.profiler and "
                        "print its operators by self CPU time to stderr")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="OpenCLIP's --grad-checkpointing (activation recomputation)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = open_clip.create_model("MobileCLIP2-S0", pretrained=None)
    if os.path.exists(a.weights):
        model.load_state_dict(load_file(a.weights), strict=False)
    else:
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
        save_file(sd, a.weights)
    b = a.batch
    if os.path.exists(a.data):
        d = load_file(a.data)
    else:
        g = torch.Generator().manual_seed(a.seed + 1)
        ids = torch.randint(1, 49406, (2 * b, 77), generator=g)
        ids[:, 0] = 49406
        ids[:, 20] = 49407
        ids[:, 21:] = 0
        emb = lambda: torch.cat([F.normalize(torch.randn(b, 768, generator=g), dim=1) for _ in DIMS], 1)  # noqa: E731
        d = {"images": torch.rand(b, 3, 256, 256, generator=g), "texts": ids,
             "teacher_image": emb(), "teacher_gt": emb(), "teacher_syn": emb()}
        save_file(d, a.data)
    model.train()
    if a.grad_checkpointing:
        model.set_grad_checkpointing(True)
    named = list(model.named_parameters())
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    if a.towers:
        out = {}
        for tower in ("image", "text"):
            rows = []
            for _ in range(a.steps + 1):
                model.zero_grad()
                t0 = time.perf_counter()
                f = model.encode_image(d["images"]) if tower == "image" else model.encode_text(d["texts"])
                loss = f.square().sum()
                t1 = time.perf_counter()
                loss.backward()
                rows.append((t1 - t0, time.perf_counter() - t1))
            f_s, b_s = sorted(rows, key=lambda r: r[0] + r[1])[len(rows) // 2]
            out[f"{tower}_forward_seconds"], out[f"{tower}_backward_seconds"] = f_s, b_s
        print(json.dumps(out))
        return
    def step():
        opt.zero_grad()
        f_i, f_t, s = model(d["images"], d["texts"])
        loss = caption_set(f_i, f_t[:b], s, d["teacher_image"], d["teacher_gt"]) + \
            caption_set(f_i, f_t[b:], s, d["teacher_image"], d["teacher_syn"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss

    times = []
    for i in range(a.steps + 1):
        t0 = time.perf_counter()
        loss = step()
        if i > 0:
            times.append(time.perf_counter() - t0)
    if a.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    print(json.dumps({"samples_per_s": b / statistics.median(times), "step_seconds": times,
                      "loss": float(loss.item())}))


if __name__ == "__main__":
    main()
