#!/usr/bin/env python3
"""diffusers' side of the inference row of issue #15: StableDiffusionPipeline (diffusers 0.31 from the refkit-gpu
kit) on SD 1.5 shapes with random weights, one 512x512 image, 30 PNDM steps, CFG 7.5, fp16, with and without a
PEFT LoRA r=4 on to_q/to_k/to_v/to_out.0 (what load_lora_weights builds). Prompt embeddings come from the text
encoder on fixed token ids (the kit carries no tokenizer files); difflora's row tokenizes, a negligible cost.

  python3 bench/gpu/ref_pipeline.py --kit KIT/refkit-gpu --out $OUT/ref-pipeline.json [--device cuda] [--tiny]
"""
import argparse
import json
import os
import statistics
import sys
import time


def import_kit(kit):
    py = os.path.join(kit, "py")
    paths = [os.path.join(py, "shims")] + [os.path.join(py, lib) for lib in ("diffusers", "transformers", "huggingface_hub", "peft", "accelerate")]
    sys.path[:0] = [p for p in paths if os.path.isdir(p)]
    sys.path.append(os.path.join(py, "fallback"))
    for k in ("HF_HUB_OFFLINE", "USE_TF", "USE_FLAX", "USE_JAX"):
        os.environ[k] = "1" if k == "HF_HUB_OFFLINE" else "0"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kit", required=True)
    ap.add_argument("--out", default="ref-pipeline.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny-sd configs at 64 px, 4 steps, fp32 (CPU self-test)")
    ap.add_argument("--configs", default=None, help="folder with unet/ vae/ text_encoder/ config.json (default the kit's sd15)")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    out = {"what": "diffusers 0.31 StableDiffusionPipeline timing (bench/gpu/ref_pipeline.py)", "argv": sys.argv[1:], "rows": []}

    def save():
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)

    try:
        import_kit(a.kit)
        import torch
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextConfig, CLIPTextModel
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        out["error"] = "import: %r" % (e,)
        save()
        raise
    cfgdir = a.configs or os.path.join(a.kit, "configs", "tiny-sd" if a.tiny else "sd15")
    dev = torch.device(a.device)
    dtype = torch.float16 if dev.type == "cuda" and not a.tiny else torch.float32
    res, steps = (64, 4) if a.tiny else (512, 30)
    out.update({"torch": torch.__version__, "device": str(dev), "dtype": str(dtype), "res": res, "steps": steps, "configs": cfgdir})
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)

    def cfg(sub):
        with open(os.path.join(cfgdir, sub, "config.json")) as f:
            return json.load(f)

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg("unet")).to(dev, dtype)
    vae = AutoencoderKL.from_config(cfg("vae")).to(dev, dtype)
    te_cfg = {k: v for k, v in cfg("text_encoder").items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    te = CLIPTextModel(CLIPTextConfig(**te_cfg)).to(dev, dtype)
    sched_file = os.path.join(cfgdir, "scheduler", "scheduler_config.json")
    sched = PNDMScheduler.from_config(json.load(open(sched_file))) if os.path.exists(sched_file) else PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, te.config.vocab_size, (1, 77), generator=g).to(dev)
    neg = torch.randint(0, te.config.vocab_size, (1, 77), generator=g).to(dev)

    def run():
        with torch.no_grad():
            pe = te(ids)[0]
            ne = te(neg)[0]
            lat = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=res, width=res, num_inference_steps=steps,
                       guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="latent").images
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return lat

    for lora in (False, True):
        row = {"lora": lora}
        try:
            if lora:
                unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
                with torch.no_grad():
                    for n, p in unet.named_parameters():
                        if "lora_B" in n:
                            p.normal_(0, 0.01)
            run()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            times = []
            for _ in range(a.runs):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            row.update({"status": "ok", "median_s": statistics.median(times), "times_s": times})
            if dev.type == "cuda":
                row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(dev)
        except Exception as e:  # noqa: BLE001 - reported in the JSON
            row.update({"status": "error: %r" % (e,)})
        out["rows"].append(row)
        save()
        print(json.dumps(row))


if __name__ == "__main__":
    main()
