"""Python reference for bench/augment.sh: Apple's DR augmentation chain with PIL + torchvision.

Per image, exactly what RayGen does before the teachers: PIL open, convert("RGBA").convert("RGB"),
RandomResizedCrop(224, bicubic) -> RandAugment(2 ops, magnitude 9, 31 bins) -> ToTensor ->
Normalize (OpenAI CLIP). Prints one JSON line: images/s on one core (one process, one torch
thread) and on all cores (a process per core, as DataLoader workers would run it).

Usage: python bench/augment_reference.py DEMO_DIR IMAGES
"""

import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
import time

import torch
import torchvision.transforms as T
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def load(demo_dir):
    images = []
    for name in sorted(os.listdir(demo_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(demo_dir, name)) as tar:
                for m in tar.getmembers():
                    ext = m.name.split(".", 1)[1]
                    if ext in ("jpg", "jpeg", "png", "webp"):
                        images.append(tar.extractfile(m).read())
    return images


def chain():
    return T.Compose([
        T.RandomResizedCrop(224, interpolation=T.InterpolationMode.BICUBIC),
        T.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def run(images, indices):
    torch.set_num_threads(1)
    transform = chain()
    total = 0.0
    for i in indices:
        img = Image.open(io.BytesIO(images[i % len(images)])).convert("RGBA").convert("RGB")
        total += float(transform(img)[0, 112, 112])
    return total


def main():
    demo_dir, n = sys.argv[1], int(sys.argv[2])
    images = load(demo_dir)
    run(images, range(len(images)))  # warm-up
    t = time.perf_counter()
    run(images, range(n))
    one_core = n / (time.perf_counter() - t)
    cores = os.cpu_count() or 1
    chunks = [list(range(k, n, cores)) for k in range(cores)]
    with mp.get_context("fork").Pool(cores) as pool:
        pool.starmap(run, [(images, range(len(images)))] * cores)  # warm-up
        t = time.perf_counter()
        pool.starmap(run, [(images, c) for c in chunks])
        all_cores = n / (time.perf_counter() - t)
    print(json.dumps({"impl": "PIL+torchvision", "images": n, "threads": cores,
                      "one_core_images_per_s": one_core, "all_cores_images_per_s": all_cores}))


if __name__ == "__main__":
    main()
