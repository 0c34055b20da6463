#!/usr/bin/env python3
"""clip_benchmark's zero-shot classification of MobileCLIP2-S0 on an image folder, timed: the
reference side of bench/eval.sh.

OpenCLIP's model with its eval preprocessing (256 px, bilinear, mean 0, std 1), torchvision's
ImageFolder and a DataLoader (as clip_benchmark's CLI builds them), and
`clip_benchmark.metrics.zeroshot_classification.evaluate` (the classifier from OpenAI's 80
ImageNet templates, then the images). Prints one JSON line: seconds (classifier + images, model
loading excluded), images, and the metrics.

On first use it creates the shared inputs:
- --weights: MobileCLIP2-S0 with random weights re-drawn so that image features differ
  between images (N(0, 1/fan_in) matrices and kernels, layer scales U(0.05, 0.2), BatchNorm
  statistics and affine randomised; a fresh init gives nearly one feature for every image);
- --data: an image folder of --classes ImageNet class names x --per-class images, cycling
  through the demo shards' images (JPEG, PNG, WebP of assorted sizes).
"""

import argparse
import io
import json
import os
import tarfile
import time

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

import open_clip
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from clip_benchmark.metrics import zeroshot_classification as zc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_weights(path):
    torch.manual_seed(0)
    model = open_clip.create_model("MobileCLIP2-S0", pretrained=None)
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, (m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]) ** -0.5)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.05, 0.2)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    save_file(sd, path)


def make_folder(path, classes, per_class):
    images = []
    for shard in ["demo-00000.tar", "demo-00001.tar"]:
        with tarfile.open(os.path.join(ROOT, "assets", "demo", shard)) as tar:
            for m in tar.getmembers():
                ext = m.name.rsplit(".", 1)[-1]
                if ext in ("jpg", "png", "webp"):
                    images.append((ext, tar.extractfile(m).read()))
    k = 0
    for c in range(classes):
        d = os.path.join(path, f"{c:03d}_" + IMAGENET_CLASSNAMES[c].replace(" ", "_"))
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            ext, data = images[k % len(images)]
            k += 1
            with open(os.path.join(d, f"{i:04d}.{ext}"), "wb") as f:
                f.write(data)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--workers", type=int, default=os.cpu_count())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if not os.path.exists(a.weights):
        make_weights(a.weights)
    if not os.path.isdir(a.data):
        make_folder(a.data, a.classes, a.per_class)
    model, _, preprocess = open_clip.create_model_and_transforms(
        "MobileCLIP2-S0", pretrained=a.weights, image_mean=(0.0, 0.0, 0.0),
        image_std=(1.0, 1.0, 1.0), image_interpolation="bilinear", image_resize_mode="shortest")
    model.eval()
    tokenizer = open_clip.get_tokenizer("MobileCLIP2-S0")
    dataset = ImageFolder(a.data, transform=preprocess)
    # clip_benchmark names a folder's classes by their folder names with spaces, as dfndr does.
    classnames = [c.replace("_", " ") for c in dataset.classes]
    loader = DataLoader(dataset, batch_size=a.batch, shuffle=False, num_workers=a.workers)
    templates = [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]
    t0 = time.perf_counter()
    metrics = zc.evaluate(model, loader, tokenizer, classnames, templates, "cpu", amp=False)
    seconds = time.perf_counter() - t0
    print(json.dumps(dict(seconds=seconds, images=len(dataset), **metrics)))


if __name__ == "__main__":
    main()
