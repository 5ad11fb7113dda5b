"""Loads the LoRA files scripts/interop/make_files.mjs trained with difflora into the real Python diffusers
(`StableDiffusionPipeline.from_pretrained(tiny-sd).load_lora_weights(dir)`, default adapter, float32, CPU) and compares
the UNet (and text encoder) outputs with difflora's. Not part of the test suite (CI has no Python torch).

Run (diffusers 0.31.0 / peft 0.13.2 from the gpu-reference kit, unpacked at $K, on the machine's python3-torch):
  (kit: tar -xJf /work/shared/gpu-reference/refkit-gpu.tar.xz -C /tmp/refkit; files: node scripts/interop/make_files.mjs)
  K=/tmp/refkit/refkit-gpu/py; PYTHONPATH=$K/shims:$K/diffusers:$K/transformers:$K/huggingface_hub:$K/peft:$K/accelerate \
  REFKIT_FALLBACK=$K/fallback /usr/bin/python3 scripts/interop/check_diffusers.py [outDir=/tmp/difflora-interop]

Per case: the load's log records and warnings (any about unexpected/missing keys fail the case), the largest relative
error ‖a − b‖∞ / ‖b‖∞ of diffusers' outputs against difflora's (≤ 1e-4 passes), and how far the LoRA moved the
output from the base model's (must be > 1e-3, so a silently ignored file fails); for DoRA, how far the magnitudes
moved from ‖W‖. A control file (the first case plus one layer the UNet lacks) must be flagged. Exit status 1 when a
case fails or the control is not flagged.
"""
import io
import logging
import os
import shutil
import sys
import warnings

fb = os.environ.get("REFKIT_FALLBACK")
if fb:
    sys.path.append(fb)  # after site-packages: only what the machine lacks
# Not HF_HUB_OFFLINE=1: with it, diffusers 0.31's load_lora_weights(dir) refuses any folder without weight_name=
# ("When using the offline mode, you must specify a `weight_name`", lora_base._best_guess_weight_name). Local folders
# are read without any network access either way.
for k in ("USE_TF", "USE_FLAX", "USE_JAX"):
    os.environ.setdefault(k, "0")

import torch  # noqa: E402
import diffusers  # noqa: E402
import peft  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from diffusers.utils import logging as dlogging  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.path.join(ROOT, "test", "fixtures", "tiny-sd")
OUT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "/tmp/difflora-interop")
CASES = ["lora-r4-a8", "locon-conv2-a8-ca1", "dora", "dora-conv2", "dreambooth-te"]
TOL = 1e-4
BAD = ("unexpected", "missing", "not found", "were not used", "not loaded", "ignored", "no lora", "could not")

torch.set_num_threads(2)
dlogging.set_verbosity_info()  # records every note of the loader, not only warnings


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


RETRIES = []  # (case, what): forwards recomputed because the first gave NaN


def finite(f, tag, tries=3):
    """f() again when it holds NaN/inf: on the machine this was run on, the Debian python3-torch 1.13.0a0 gives NaN
    in about a quarter of the UNet forwards of a freshly loaded diffusers pipeline, mostly before a LoRA is loaded
    (with MKLDNN off or one thread too; never seen with forward hooks on): a Python-side fault. Recomputed (a
    pipeline that keeps giving NaN is loaded again, with the LoRA), recorded and reported; NaN in every try fails."""
    for _ in range(tries):
        out = f()
        if torch.isfinite(out).all():
            return out
        RETRIES.append(tag)
    return out


def run(pipe, ins, with_te, tag):
    with torch.no_grad():
        u = finite(lambda: pipe.unet(ins["sample"], ins["timestep"], encoder_hidden_states=ins["encoder_hidden_states"]).sample,
                   tag + " unet")
        t = finite(lambda: pipe.text_encoder(ins["input_ids"])[0], tag + " text_encoder") if with_te else None
    return u, t


# Negative control: the first case's file plus one layer the UNet does not have, which must be flagged (this shows the
# log capture sees diffusers' "unexpected keys" warning).
CONTROL = "control-unknown-layer"
src = os.path.join(OUT, CASES[0])
sd = load_file(os.path.join(src, "pytorch_lora_weights.safetensors"))
bogus = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_zz.lora."
sd[bogus + "down.weight"], sd[bogus + "up.weight"] = torch.ones(4, 32), torch.ones(32, 4)
os.makedirs(os.path.join(OUT, CONTROL), exist_ok=True)
save_file(sd, os.path.join(OUT, CONTROL, "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
shutil.copy(os.path.join(src, "difflora_outputs.safetensors"), os.path.join(OUT, CONTROL))

rows, failed = [], False
for case in CASES + [CONTROL]:
    d = os.path.join(OUT, case)
    rec = load_file(os.path.join(d, "difflora_outputs.safetensors"))
    with_te = "te_out" in rec
    ok_all = lambda *ts: all(x is None or bool(torch.isfinite(x).all()) for x in ts)  # noqa: E731
    nan = float("nan")
    u, t = torch.full_like(rec["unet_out"], nan), torch.full_like(rec["te_out"], nan) if with_te else None
    notes, bad = [], []
    for attempt in range(4):  # a pipeline whose forwards stay NaN (see finite()) is loaded again, the LoRA with it
        pipe = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        base_u, base_t = run(pipe, rec, with_te, case + " base")
        if not ok_all(base_u, base_t):
            continue

        # capture the loader's log and warnings
        buf = io.StringIO()
        handler = logging.StreamHandler(buf)
        for name in ("diffusers", "peft", "transformers"):
            logging.getLogger(name).addHandler(handler)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(d)
        for name in ("diffusers", "peft", "transformers"):
            logging.getLogger(name).removeHandler(handler)
        notes = [line for line in buf.getvalue().splitlines() if line.strip()] + ["%s: %s" % (w.category.__name__, w.message) for w in caught]
        bad = [n for n in notes if any(b in n.lower() for b in BAD)]

        u, t = run(pipe, rec, with_te, case + " lora")
        if ok_all(u, t):
            break
    # what PEFT built: adapters per model, DoRA on?
    n_unet = sum(1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "default_0" in getattr(m, "lora_A", {}))
    n_te = sum(1 for _, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A") and "default_0" in getattr(m, "lora_A", {}))
    dora = any(len(getattr(m, "lora_magnitude_vector", {})) for _, m in pipe.unet.named_modules())
    if dora:  # the trained magnitudes moved away from their initial value, the base weight's row norms
        moved_m = max(rel(m.lora_magnitude_vector["default_0"].weight.detach().reshape(-1),
                          m.base_layer.weight.detach().flatten(1).norm(dim=1))
                      for _, m in pipe.unet.named_modules() if len(getattr(m, "lora_magnitude_vector", {})))
        dora = "yes, m moved %.1e" % moved_m
    n_file = len({k.rsplit(".lora", 1)[0] for k in load_file(os.path.join(d, "pytorch_lora_weights.safetensors"))})
    outs = [("unet", u, rec["unet_out"], base_u, rec["base_unet_out"])]
    if with_te:
        outs.append(("text_encoder", t, rec["te_out"], base_t, rec["base_te_out"]))
    for what, mine, theirs, base_mine, base_theirs in outs:
        err, moved, base_err = rel(mine, theirs), rel(mine, base_mine), rel(base_mine, base_theirs)
        ok = err <= TOL and moved > 1e-3 and not bad
        if case == CONTROL:
            failed |= not bad
            verdict = "flagged, as it must be" if bad else "NOT FLAGGED (capture broken)"
        else:
            failed |= not ok
            verdict = "ok" if ok else "FAIL"
        rows.append((case, what, err, base_err, moved, "%d+%d/%d" % (n_unet, n_te, n_file), dora or "no", verdict))
    print("== %s: %d log/warning lines%s" % (case, len(notes), " (flagged: %d)" % len(bad) if bad else ""))
    for n in notes:
        print("   ", n[:300])
    pipe.unload_lora_weights()
    del pipe

print()
if RETRIES:
    print("forwards recomputed after a NaN (Python torch, see finite()): " + ", ".join(RETRIES))
print("diffusers %s, peft %s, torch %s, python %s" % (diffusers.__version__, peft.__version__, torch.__version__, sys.version.split()[0]))
print("| case | output | rel. error vs difflora | base model rel. error | LoRA moved output by | LoRA layers (unet+te / file) | DoRA | result |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| %s | %s | %.2e | %.2e | %.2e | %s | %s | %s |" % r)
sys.exit(1 if failed else 0)
