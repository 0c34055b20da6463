#!/usr/bin/env python3
"""OpenCLIP MobileCLIP2 training steps on CPU (S0 unless --model names another student; S0 is
timm `fastvit_mci0` + OpenCLIP text tower): Apple's DRClipLoss (distillation weights 0/1,
teacher scales 70/60, two 768-d teachers), AdamW with OpenCLIP's decay groups, gradient
clipping 1.0, logit-scale clamp: the step of Apple's training patch, fp32.

Builds the model with random weights (torch.manual_seed(SEED)) and a random batch in memory,
and saves both to --weights / --data if those files do not exist yet, so dfndr's bench trains
exactly the same model on the same data (images at the model's size). --perturb re-draws the
new weights' image-trunk convolutions and linear layers, BatchNorm statistics and layer-scale
gammas first (see perturb()). Times --steps steps after one warm-up step and prints one
JSON line: samples_per_s (median step), step_seconds (all steps), loss (the last step's).

--forward instead times the image tower in evaluation mode under torch.no_grad() on the batch's
images: model.encode_image, then (FastViT trunks) again with timm's reparameterize_model'd
trunk; one JSON line: images_per_s, fused_images_per_s (null for ViT trunks),
features_abs_mean, fused_max_diff.
"""
import argparse
import contextlib
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


@contextlib.contextmanager
def no_random_init():
    """Skips drawing initial values (most of create_model's time: 10 s for MobileCLIP2-S4) when
    a weights file sets every tensor right after; main() checks that it does."""
    names = ("uniform_", "normal_", "erfinv_")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    for n in names:
        setattr(torch.Tensor, n, lambda self, *args, **kwargs: self)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def perturb(model):
    """Modest randomisation so that random-init image features are not degenerate (with
    OpenCLIP's init a FastViT's features hardly depend on the image: timm's small conv weights
    shrink the signal stage by stage, eval-mode BatchNorm does not restore it, and its 1e-5
    layer scales make every block nearly the identity): the image trunk's Conv2d and Linear
    weights re-drawn from N(0, 1/fan_in), BatchNorm running statistics (mean ~ U(-0.1, 0.1),
    var ~ U(0.5, 1.5)) and layer-scale gammas ~ U(0.05, 0.2)."""
    with torch.no_grad():
        for m in model.visual.trunk.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0.0, (m.in_channels // m.groups * math.prod(m.kernel_size)) ** -0.5)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        for n, p in model.named_parameters():
            if n.endswith(".gamma"):
                p.uniform_(0.05, 0.2)


def time_forward(model, images, iters):
    """images/s of model.encode_image in eval mode under no_grad, branched and fused."""
    from timm.models import reparameterize_model

    model.eval()

    def rate():
        times = []
        with torch.no_grad():
            for i in range(iters + 1):
                t0 = time.perf_counter()
                f = model.encode_image(images)
                if i > 0:
                    times.append(time.perf_counter() - t0)
        return len(images) / statistics.median(times), f

    r, f = rate()
    out = {"images_per_s": r, "features_abs_mean": f.abs().mean().item(),
           "fused_images_per_s": None, "fused_max_diff": None}
    if any(hasattr(m, "reparameterize") for m in model.visual.trunk.modules()):
        model.visual.trunk = reparameterize_model(model.visual.trunk)
        r, g = rate()
        out["fused_images_per_s"], out["fused_max_diff"] = r, (g - f).abs().max().item()
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="MobileCLIP2-S0", help="OpenCLIP model name")
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
    p.add_argument("--perturb", action="store_true",
                   help="when creating --weights, re-draw the image trunk's weights, BatchNorm "
                        "statistics and layer-scale gammas so that its features depend on the image")
    p.add_argument("--forward", action="store_true",
                   help="time the image tower's eval forward (branched and fused), not training")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if os.path.exists(a.weights):
        with no_random_init():
            model = open_clip.create_model(a.model, pretrained=None)
        missing, unexpected = model.load_state_dict(load_file(a.weights), strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            sys.exit(f"{a.weights} does not fit {a.model}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    else:
        model = open_clip.create_model(a.model, pretrained=None)
        if a.perturb:
            perturb(model)
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
        save_file(sd, a.weights)
    # The same random state for training (L-14's stochastic depth) whether the weights were
    # drawn or loaded.
    torch.manual_seed(a.seed + 2)
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
        d = {"images": torch.rand(b, 3, *model.visual.image_size, generator=g), "texts": ids,
             "teacher_image": emb(), "teacher_gt": emb(), "teacher_syn": emb()}
        save_file(d, a.data)
    if a.forward:
        time_forward(model, d["images"], a.steps)
        return
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
