#!/usr/bin/env python3
"""OpenCLIP side of bench/gpu/run.sh (PyTorch on the same GPU as dfndr).

Subcommands (each prints one JSON line):

  teacher  Builds an OpenCLIP CLIP model with random weights (torch.manual_seed), writes its
           state dict and a batch of random normalised images as safetensors for dfndr to
           load (the same weights and inputs on both sides), and times `encode_image` in
           eager mode under bf16 autocast at the given batch. Also writes the float32 and the
           bf16-autocast image embeddings of the batch.
  coca     Builds CoCa with random weights (the decoder's uninitialised `text_projection`
           drawn from N(0, width^-0.5)), writes weights and images, and times RayGen's
           captioning loop: per caption index, what `generate(generation_type="top_p",
           top_p=0.9, fixed_output_length=True)` runs, that is the image encoded, then the
           text tower and decoder over the whole prefix at every step (no cache), a top-p
           draw per row. The loop is written out (same model calls as `generate`) because
           `generate` needs transformers < 4.57 and GPU machines carry 5.x. bf16 autocast.
  compare  Cosine similarity of dfndr's image embeddings to OpenCLIP's (float32 and bf16).
  table    The final table from the JSON files of a run.
"""
import argparse
import json
import os
import sys
import time

import torch

PEAK_TFLOPS = 790.0  # dense bf16 peak of an H200 SXM, measured (see the issue)
VIT_L_GFLOP = 162.0  # per 224 px image (2 x multiply-adds of the tower)


def device_of(name):
    return torch.device("cuda:0" if name.startswith("cuda") else "cpu")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def autocast(dev):
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


def teacher(a):
    import open_clip
    from safetensors.torch import save_file

    dev = device_of(a.device)
    torch.manual_seed(a.seed)
    model = open_clip.create_model(a.model, pretrained=None).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.weights)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    images = torch.randn(a.batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    save_file({"images": images}, a.images)
    model = model.to(dev)
    x = images.to(dev)
    with torch.inference_mode():
        emb32 = model.encode_image(x).float().cpu()
        with autocast(dev):
            emb16 = model.encode_image(x).float().cpu()
            for _ in range(2):  # warm-up (cuBLAS heuristics, allocator)
                model.encode_image(x)
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(a.iters):
                model.encode_image(x)
            sync(dev)
            seconds = (time.perf_counter() - t0) / a.iters
    save_file({"fp32": emb32, "bf16": emb16}, a.out)
    print(json.dumps({
        "impl": "OpenCLIP eager bf16 autocast", "model": a.model, "batch": a.batch,
        "images_per_s": a.batch / seconds, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }))


def top_p_draw(logits, top_p, gen):
    """One token per row from the smallest set of tokens whose probability reaches top_p
    (Hugging Face's TopPLogitsWarper, as `generate` applies it)."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, idx = torch.sort(probs, descending=True, dim=-1)
    keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
    return idx.gather(-1, choice)


def coca(a):
    import open_clip
    from safetensors.torch import save_file

    dev = device_of(a.device)
    torch.manual_seed(a.seed)
    model = open_clip.create_model(a.model, pretrained=None)
    with torch.no_grad():
        width = model.text_decoder.width
        torch.nn.init.normal_(model.text_decoder.text_projection, std=width ** -0.5)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.weights)
    images = torch.randn(a.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    save_file({"images": images}, a.images)
    model = model.to(dev)
    x = images.to(dev)
    sot, seq_len = 49406, 30
    gen = torch.Generator(device=dev).manual_seed(0)

    def one_caption(batch):
        # What generate() does per call: encode, then the full prefix at every step.
        image_latent, image_embs = model._encode_image(batch)
        text = torch.full((batch.shape[0], 1), sot, dtype=torch.long, device=dev)
        for _ in range(seq_len - 1):
            out = model(batch, text, image_latent=image_latent, image_embs=image_embs,
                        output_labels=False)
            nxt = top_p_draw(out["logits"][:, -1], 0.9, gen)
            text = torch.cat([text, nxt], dim=1)
        return text

    with torch.inference_mode(), autocast(dev):
        one_caption(x[:1])  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(a.captions):
            one_caption(x)
        sync(dev)
        seconds = time.perf_counter() - t0
    n = a.batch * a.captions
    print(json.dumps({
        "impl": "OpenCLIP CoCa, generate()'s full-prefix loop, bf16 autocast", "model": a.model,
        "images": a.batch, "captions_per_image": a.captions, "seconds": seconds,
        "captions_per_s": n / seconds,
    }))


def compare(a):
    from safetensors.torch import load_file

    ours = load_file(a.ours)["image_features"].float()
    ref = load_file(a.ref)
    out = {}
    for key in ("fp32", "bf16"):
        cos = torch.nn.functional.cosine_similarity(ours, ref[key].float(), dim=-1)
        out[f"cosine_to_openclip_{key}_min"] = cos.min().item()
        out[f"cosine_to_openclip_{key}_mean"] = cos.mean().item()
    print(json.dumps(out))


def table(a):
    runs = {}
    for path in a.files:
        name = os.path.splitext(os.path.basename(path))[0]
        with open(path) as f:
            runs[name] = json.loads(f.read().strip().splitlines()[-1])
    t_ref, t_ours = runs["teacher_ref"], runs["teacher_ours"]
    c_ref, c_ours = runs["coca_ref"], runs["coca_ours"]
    cos, e2e = runs["compare"], runs["reinforce"]
    peak = lambda ips: ips * VIT_L_GFLOP / (PEAK_TFLOPS * 1e3)
    rows = [
        ("device", t_ref.get("gpu", "?"), ""),
        (f"teacher {t_ref['model']} images/s, batch {t_ref['batch']}",
         f"dfndr {t_ours['images_per_s']:.4g} | OpenCLIP {t_ref['images_per_s']:.4g}",
         f"{t_ours['images_per_s'] / t_ref['images_per_s']:.2f}x"),
        ("  share of dense bf16 peak (790 TFLOP/s, 162 GFLOP/image)",
         f"dfndr {100 * peak(t_ours['images_per_s']):.0f}% | OpenCLIP {100 * peak(t_ref['images_per_s']):.0f}%", ""),
        (f"CoCa {c_ref['model']} captions/s ({c_ref['images']} images x {c_ref['captions_per_image']})",
         f"dfndr {c_ours['captions_per_s']:.3g} | OpenCLIP {c_ref['captions_per_s']:.3g}",
         f"{c_ours['captions_per_s'] / c_ref['captions_per_s']:.1f}x"),
        ("reinforce samples/s (2 teachers, captioner, K=2)",
         f"dfndr {e2e['samples_per_s']:.3g} ({e2e['samples']} samples, {e2e['seconds']:.0f} s)", ""),
        ("image embeddings: cosine to OpenCLIP fp32 (min / mean)",
         f"{cos['cosine_to_openclip_fp32_min']:.5f} / {cos['cosine_to_openclip_fp32_mean']:.5f}", ""),
        ("image embeddings: cosine to OpenCLIP bf16 (min / mean)",
         f"{cos['cosine_to_openclip_bf16_min']:.5f} / {cos['cosine_to_openclip_bf16_mean']:.5f}", ""),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher")
    c = sub.add_parser("coca")
    for q in (t, c):
        q.add_argument("--model", required=True)
        q.add_argument("--weights", required=True)
        q.add_argument("--images", required=True)
        q.add_argument("--batch", type=int, required=True)
        q.add_argument("--device", default="cuda:0")
        q.add_argument("--seed", type=int, default=0)
    t.add_argument("--iters", type=int, default=5)
    t.add_argument("--out", required=True)
    c.add_argument("--captions", type=int, default=5)
    m = sub.add_parser("compare")
    m.add_argument("--ours", required=True)
    m.add_argument("--ref", required=True)
    tb = sub.add_parser("table")
    tb.add_argument("files", nargs="+")
    a = p.parse_args()
    {"teacher": teacher, "coca": coca, "compare": compare, "table": table}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
