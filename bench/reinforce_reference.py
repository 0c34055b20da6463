"""Python reference for bench/reinforce.sh: what RayGen does per shard, in one process.

For every input shard (read whole into memory, as RayGen's read_shard does): per sample, PIL
open + convert("RGBA").convert("RGB"); K views of RandomResizedCrop(224, bicubic) +
RandAugment(2, 9, 31) with their parameters recorded (Apple's compressed paug form); the
captioner's eval preprocessing and N top-p captions per image from OpenCLIP's CoCa
`generate()` (called once per caption index on the shard's images, as RayGen calls it), cleaned
as RayGen cleans them; every view through every teacher's image tower (resized to the
teacher's input size), the ground-truth and synthetic captions through every teacher's text
tower, embeddings L2-normalised and concatenated; then a webdataset tar per shard with
KEY.jpg/.txt/.json/.syn.json/.paug.json/.npz.

The models are the tiny ones of configs/demo.toml, built with OpenCLIP from the same numbers
(random weights: only the cost matters here). Prints one JSON line.

Usage: python bench/reinforce_reference.py INPUT_DIR OUTPUT_DIR
"""

import io
import json
import os
import sys
import tarfile
import time

import numpy as np
import open_clip
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms.autoaugment import _apply_op

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
K = 2          # configs/demo.toml: num_augmentations
N = 2          # configs/demo.toml: num_captions
SEQ_LEN = 30
VOCAB = 49408

TEACHERS = [
    dict(embed_dim=32, quick_gelu=True,
         vision_cfg=dict(image_size=224, patch_size=32, width=64, layers=2, head_width=32),
         text_cfg=dict(context_length=77, vocab_size=VOCAB, width=64, heads=2, layers=2)),
    dict(embed_dim=16, quick_gelu=False,
         vision_cfg=dict(image_size=112, patch_size=16, width=32, layers=1, head_width=16),
         text_cfg=dict(context_length=77, vocab_size=VOCAB, width=32, heads=2, layers=1)),
]
CAPTIONER = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=224, patch_size=32, width=64, layers=1, head_width=32,
                    attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=16,
                    output_tokens=True),
    text_cfg=dict(context_length=76, vocab_size=VOCAB, width=32, heads=2, layers=1,
                  embed_cls=True, output_tokens=True),
    multimodal_cfg=dict(context_length=76, vocab_size=VOCAB, width=32, heads=2, layers=1),
)


def rand_augment(img, ra):
    """torchvision's RandAugment forward, recording (op index, signed magnitude) per op."""
    fill = [0.0] * F.get_image_num_channels(img)
    space = ra._augmentation_space(ra.num_magnitude_bins, F.get_image_size(img))
    names = list(space.keys())
    ops = []
    for _ in range(ra.num_ops):
        op_index = int(torch.randint(len(space), (1,)).item())
        name = names[op_index]
        magnitudes, signed = space[name]
        magnitude = float(magnitudes[ra.magnitude].item()) if magnitudes.ndim > 0 else 0.0
        if signed and torch.randint(2, (1,)):
            magnitude *= -1.0
        img = _apply_op(img, name, magnitude, interpolation=ra.interpolation, fill=fill)
        ops.append([op_index, magnitude])
    return img, ops


def views_of(img, ra, normalize):
    tensors, params = [], []
    for _ in range(K):
        i, j, h, w = T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        view = F.resized_crop(img, i, j, h, w, [224, 224], T.InterpolationMode.BICUBIC)
        view, ops = rand_augment(view, ra)
        tensors.append(normalize(F.to_tensor(view)))
        params.append([[i, j, h, w], ops])
    return tensors, params


def clean(text):
    return text.split("<end_of_text>")[0].split("<start_of_text>")[-1].split(".")[0].rstrip()


def read_shard(path):
    with open(path, "rb") as f:
        data = io.BytesIO(f.read())
    samples = {}
    with tarfile.open(fileobj=data) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [(k, v) for k, v in samples.items()]


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def main():
    in_dir, out_dir = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)
    teachers = [open_clip.CLIP(**cfg).eval() for cfg in TEACHERS]
    coca = open_clip.create_model("coca_ViT-L-14", pretrained=None, **CAPTIONER).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    caption_pre = T.Compose([
        T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    normalize = T.Normalize(MEAN, STD)
    ra = T.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31,
                       interpolation=T.InterpolationMode.NEAREST)
    shards = sorted(f for f in os.listdir(in_dir) if f.endswith(".tar"))
    rows = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for shard in shards:
            samples = [(k, s) for k, s in read_shard(os.path.join(in_dir, shard))
                       if "txt" in s and any(e in s for e in ("jpg", "png", "webp"))]
            images, captions, all_views, all_params = [], [], [], []
            for _, s in samples:
                ext = next(e for e in ("jpg", "png", "webp") if e in s)
                img = Image.open(io.BytesIO(s[ext])).convert("RGBA").convert("RGB")
                views, params = views_of(img, ra, normalize)
                images.append(caption_pre(img))
                captions.append(s["txt"].decode().strip())
                all_views.extend(views)
                all_params.append(params)
            batch = torch.stack(images)
            syn = [[] for _ in samples]
            for _ in range(N):
                out = coca.generate(batch, generation_type="top_p", top_p=0.9,
                                    seq_len=SEQ_LEN, fixed_output_length=True)
                for r, ids in enumerate(out):
                    syn[r].append(clean(open_clip.decode(ids)))
            views = torch.stack(all_views)
            texts = [t for c, s in zip(captions, syn) for t in [c] + s]
            tokens = tokenizer(texts)
            image_parts, text_parts = [], []
            for t, cfg in zip(teachers, TEACHERS):
                size = cfg["vision_cfg"]["image_size"]
                v = views if size == 224 else F.resize(
                    views, [size, size], T.InterpolationMode.BICUBIC, antialias=True)
                image_parts.append(t.encode_image(v, normalize=True))
                text_parts.append(t.encode_text(tokens, normalize=True))
            image_emb = torch.cat(image_parts, 1).numpy().reshape(len(samples), K, -1)
            text_emb = torch.cat(text_parts, 1).numpy().reshape(len(samples), 1 + N, -1)
            with tarfile.open(os.path.join(out_dir, shard), "w") as tar:
                for r, (key, s) in enumerate(samples):
                    ext = next(e for e in ("jpg", "png", "webp") if e in s)
                    add(tar, f"{key}.{ext}", s[ext])
                    add(tar, f"{key}.txt", s["txt"])
                    add(tar, f"{key}.json", s.get("json", b"{}"))
                    add(tar, f"{key}.syn.json", json.dumps({"syn_text": syn[r]}).encode())
                    add(tar, f"{key}.paug.json",
                        json.dumps({"param_aug": all_params[r]}).encode())
                    npz = io.BytesIO()
                    np.savez(npz, image_emb=image_emb[r], text_emb=text_emb[r])
                    add(tar, f"{key}.npz", npz.getvalue())
            rows += len(samples)
    seconds = time.perf_counter() - start
    print(json.dumps({"impl": "RayGen-style Python (PIL, torchvision, OpenCLIP)",
                      "samples": rows, "seconds": seconds, "samples_per_s": rows / seconds,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
