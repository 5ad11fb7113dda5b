// Model checks on the GPU: tiny-sd CLIP text encoder, VAE and UNet+LoRA against the diffusers goldens on
// CUDA (fp32, TF32 off), bf16 within tolerance, a LoRA training step's gradients, UNet gradient
// checkpointing, then a small-sd timing. Usage: node bench/gpu/models.mjs (after npm run build:ts).
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { torch, loadSafetensors, CLIPTextModel, AutoencoderKL, UNet2DConditionModel, attachLora, AdamW, clipGradNorm } from '../../dist/index.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../..');
const fx = join(root, 'test/fixtures');
const dev = process.env.DEV ?? "cuda:0";
torch.setAllowTF32(false);
let passed = 0, failed = 0;
function check(name, fn) {
  try { torch.tidy(() => { fn(); }); passed++; console.log(`ok   ${name}`); }
  catch (e) { failed++; console.log(`FAIL ${name}: ${String(e && e.message ? e.message : e).slice(0, 400)}`); }
}
function relErr(a, b) {
  return torch.tidy(() => {
    const x = a.detach().to({ dtype: 'float64', device: 'cpu' }), y = b.detach().to({ dtype: 'float64', device: 'cpu' });
    return x.sub(y).norm().item() / (y.norm().item() || 1);
  });
}
function within(a, b, tol, what) { const e = relErr(a, b); console.log(`      ${what}: ${e.toExponential(2)}`); if (!(e < tol)) throw new Error(`${what}: ${e} >= ${tol}`); }
const gold = (f) => { const { tensors } = loadSafetensors(join(fx, 'goldens', f)); for (const t of tensors.values()) torch.keep(t); return tensors; };
const G = (m, k) => { const t = m.get(k); if (!t) throw new Error(`missing golden ${k}`); return t; };

const te = gold('text_encoder.safetensors');
const vae = gold('vae.safetensors');
const un = gold('unet.safetensors');
const lt = gold('lora_train.safetensors');

for (const dtype of ['float32', 'bfloat16']) {
  const tol = dtype === 'float32' ? 1e-4 : 5e-2; // bf16: 8 mantissa bits through a whole network
  check(`CLIP text encoder on CUDA ${dtype}`, () => {
    const m = CLIPTextModel.fromPretrained(join(fx, 'tiny-sd'), { subfolder: 'text_encoder', dtype, device: dev });
    const out = torch.noGrad(() => m.forward(G(te, 'input_ids').to({ device: dev })));
    within(out.lastHiddenState, G(te, 'last_hidden_state'), tol, 'last_hidden_state');
    m.dispose();
  });
  check(`VAE on CUDA ${dtype}`, () => {
    const m = AutoencoderKL.fromPretrained(join(fx, 'tiny-sd'), { subfolder: 'vae', dtype, device: dev });
    torch.noGrad(() => {
      const d = m.encode(G(vae, 'pixel_values').to({ dtype, device: dev }));
      within(d.mean, G(vae, 'mean'), tol, 'encode mean');
      within(m.decode(G(vae, 'mean').to({ dtype, device: dev })), G(vae, 'decoded_from_mean'), tol, 'decode');
    });
    m.dispose();
  });
  check(`UNet on CUDA ${dtype}`, () => {
    const m = UNet2DConditionModel.fromPretrained(join(fx, 'tiny-sd'), { subfolder: 'unet', dtype, device: dev });
    const c = (k) => G(un, k).to({ device: dev, dtype: G(un, k).dtype === 'int64' ? 'int64' : dtype });
    const y = torch.noGrad(() => m.forward(c('sample'), c('timesteps'), c('encoder_hidden_states')));
    within(y, G(un, 'out'), tol, 'unet out');
    m.dispose();
  });
}

check('UNet+LoRA training step on CUDA: prediction, loss, grads, grad norm equal the lora_train goldens', () => {
  const m = UNet2DConditionModel.fromPretrained(join(fx, 'tiny-sd'), { subfolder: 'unet', device: dev });
  const h = attachLora(m, { rank: 4, alpha: 4, init: 'gaussian' });
  torch.noGrad(() => { for (const [n, p] of h.namedParameters()) p.copy_(G(lt, `lora_init/${n}`)); });
  m.train();
  const c = (k) => G(lt, k).to({ device: dev });
  const pred = m.forward(c('inputs/sample'), c('inputs/timesteps'), c('inputs/encoder_hidden_states'));
  within(pred, G(lt, 'plain/model_pred'), 1e-4, 'model_pred');
  const loss = pred.float().sub(c('inputs/plain_target')).square().mean();
  within(loss, G(lt, 'plain/loss'), 1e-5, 'loss');
  loss.backward();
  let worst = 0;
  for (const [n, p] of h.namedParameters()) worst = Math.max(worst, relErr(p.grad, G(lt, `plain/grad/${n}`)));
  console.log(`      worst LoRA grad: ${worst.toExponential(2)}`);
  if (!(worst < 1e-4)) throw new Error(`grad ${worst}`);
  const params = h.parameters();
  const norm = clipGradNorm(params, 1e-3);
  within(torch.tensor([norm]), G(lt, 'plain/grad_norm_preclip').reshape(1), 1e-4, 'grad norm');
  const opt = new AdamW(params, { lr: 1e-4, weightDecay: 1e-2 });
  opt.step();
  let worstUpd = 0;
  for (const [n, p] of h.namedParameters()) worstUpd = Math.max(worstUpd, relErr(p, G(lt, `plain/updated_clipped_1e-3/${n}`)));
  console.log(`      worst updated param: ${worstUpd.toExponential(2)}`);
  if (!(worstUpd < 1e-4)) throw new Error(`update ${worstUpd}`);
  opt.dispose();
  m.dispose();
});

check('UNet gradient checkpointing on CUDA: same LoRA grads, less memory', () => {
  const m = UNet2DConditionModel.fromPretrained(join(fx, 'tiny-sd'), { subfolder: 'unet', device: dev });
  const h = attachLora(m, { rank: 4, alpha: 4, init: 'gaussian' });
  torch.noGrad(() => { for (const [n, p] of h.namedParameters()) p.copy_(G(lt, `lora_init/${n}`)); });
  m.train();
  const c = (k) => G(lt, k).to({ device: dev });
  const run = (on) => {
    m.enableGradientCheckpointing(on);
    m.zeroGrad();
    let peak = 0;
    torch.tidy(() => {
      const mem = () => (dev.startsWith('cuda') ? torch.memory().cuda[0].allocatedBytes : torch.memory().cpu.allocatedBytes);
      const before = mem();
      const pred = m.forward(c('inputs/sample'), c('inputs/timesteps'), c('inputs/encoder_hidden_states'));
      peak = mem() - before;
      pred.sub(c('inputs/plain_target')).square().mean().backward();
    });
    return { grads: h.parameters().map((p) => torch.keep(p.grad)), held: peak };
  };
  const a = run(false), b = run(true);
  let worst = 0;
  a.grads.forEach((g, i) => { worst = Math.max(worst, relErr(b.grads[i], g)); });
  console.log(`      worst grad diff ${worst.toExponential(2)}; activations held ${a.held} -> ${b.held} bytes`);
  if (!(worst < 1e-5) || !(b.held < a.held / 2)) throw new Error('checkpointing mismatch');
  torch.dispose([...a.grads, ...b.grads]);
  m.dispose();
});

console.log(`\n${passed} passed, ${failed} failed`);
process.exitCode = failed ? 1 : 0;
