// GPU checks for the device machine (no Node test runner there): CUDA tensors, autograd, autocast,
// AdamW/GradScaler/clipping against the CPU, generators, safetensors to CUDA, flat memory.
// Usage: node bench/gpu/check.mjs   (after building the addon against a CUDA libtorch and `npm run build:ts`)
import { torch, F, AdamW, GradScaler, clipGradNorm, loadSafetensors, saveSafetensors, Linear, checkpoint } from '../../dist/index.js';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

let passed = 0;
let failed = 0;
function check(name, fn) {
  try {
    torch.tidy(() => { fn(); });
    passed++;
    console.log(`ok   ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${String(e && e.message ? e.message : e).slice(0, 400)}`);
  }
}
function assert(cond, msg) { if (!cond) throw new Error(msg); }
function relErr(a, b) {
  return torch.tidy(() => {
    const x = a.detach().to({ dtype: 'float64', device: 'cpu' });
    const y = b.detach().to({ dtype: 'float64', device: 'cpu' });
    const den = y.norm().item();
    return x.sub(y).norm().item() / (den || 1);
  });
}
function close(a, b, tol, what) { const e = relErr(a, b); assert(e < tol, `${what}: relErr ${e} >= ${tol}`); return e; }

const info = torch.info();
console.log(JSON.stringify({ torch: info.torchVersion, cuda: info.cudaAvailable, gpus: info.cudaDeviceCount }));
const dev = 'cuda:0';
torch.setAllowTF32(false);

check('cuda is available', () => assert(info.cudaAvailable && info.cudaDeviceCount >= 1, 'no CUDA device'));
check('create on cuda, read back', () => {
  const t = torch.arange(0, 6, 1, { dtype: 'float32', device: dev }).reshape(2, 3);
  assert(t.device === 'cuda:0', `device ${t.device}`);
  assert(JSON.stringify(t.tolist()) === '[[0,1,2],[3,4,5]]', JSON.stringify(t.tolist()));
  assert(torch.tensor([1, 2, 3], { device: dev }).sum().item() === 6, 'sum');
});
check('ops on cuda equal cpu (fp32, TF32 off)', () => {
  torch.manualSeed(0);
  const x = torch.randn([2, 8, 16, 16]);
  const w = torch.randn([12, 8, 3, 3]);
  const b = torch.randn([12]);
  const c = (t) => t.to({ device: dev });
  const errs = {
    conv: close(F.conv2d(c(x), c(w), c(b), { padding: 1 }), F.conv2d(x, w, b, { padding: 1 }), 1e-5, 'conv2d'),
    gn: close(F.groupNorm(c(x), 4), F.groupNorm(x, 4), 1e-5, 'group_norm'),
    ln: close(F.layerNorm(c(x), [16]), F.layerNorm(x, [16]), 1e-5, 'layer_norm'),
    gelu: close(c(x).gelu('tanh'), x.gelu('tanh'), 1e-6, 'gelu'),
    up: close(F.interpolate(c(x), { scaleFactor: 2, mode: 'nearest' }), F.interpolate(x, { scaleFactor: 2, mode: 'nearest' }), 1e-7, 'nearest'),
    mm: close(c(x).reshape(16, 256).matmul(c(x).reshape(256, 16)), x.reshape(16, 256).matmul(x.reshape(256, 16)), 1e-5, 'matmul'),
  };
  console.log('     ', JSON.stringify(errs));
});
check('scaled-dot-product attention: native kernel equals the composition', () => {
  torch.manualSeed(1);
  const q = torch.randn([2, 8, 64, 40], { device: dev });
  const k = torch.randn([2, 8, 77, 40], { device: dev });
  const v = torch.randn([2, 8, 77, 40], { device: dev });
  const ours = F.scaledDotProductAttention(q, k, v);
  const ref = q.matmul(k.transpose(-1, -2)).mul(1 / Math.sqrt(40)).softmax(-1).matmul(v);
  close(ours, ref, 1e-5, 'sdpa');
  const h = (t) => t.to('float16');
  close(F.scaledDotProductAttention(h(q), h(k), h(v)), ref, 5e-3, 'sdpa fp16');
});
check('autograd on cuda equals cpu', () => {
  torch.manualSeed(2);
  const xc = torch.randn([4, 8]);
  const wc = torch.randn([8, 8], { requiresGrad: true });
  const wg = wc.detach().to({ device: dev });
  wg.requiresGrad = true;
  xc.matmul(wc).silu().square().mean().backward();
  xc.to({ device: dev }).matmul(wg).silu().square().mean().backward();
  close(wg.grad, wc.grad, 1e-5, 'grad');
});
check('autocast cuda: fp16 and bf16 matmuls, state restored after a throw', () => {
  const a = torch.randn([8, 8], { device: dev });
  const r16 = torch.autocast({ deviceType: 'cuda', dtype: 'float16' }, () => a.matmul(a));
  assert(r16.dtype === 'float16', r16.dtype);
  const rbf = torch.autocast({ deviceType: 'cuda', dtype: 'bfloat16' }, () => a.matmul(a));
  assert(rbf.dtype === 'bfloat16', rbf.dtype);
  try { torch.autocast({ deviceType: 'cuda' }, () => { a.matmul(torch.ones([3, 3], { device: dev })); }); } catch { /* expected */ }
  assert(!torch.isAutocastEnabled('cuda'), 'autocast left on');
  assert(a.matmul(a).dtype === 'float32', 'fp32 after region');
});
check('AdamW on cuda equals cpu; bf16 params with fp32 masters', () => {
  torch.manualSeed(3);
  const p0 = torch.randn([64, 32]);
  const g = torch.randn([64, 32]);
  const pc = torch.keep(p0.clone()); pc.requiresGrad = true;
  const pg = torch.keep(p0.to({ device: dev })); pg.requiresGrad = true;
  const oc = new AdamW([pc], { lr: 1e-3 });
  const og = new AdamW([pg], { lr: 1e-3 });
  for (let i = 0; i < 3; i++) {
    pc.grad = g.clone(); pg.grad = g.to({ device: dev });
    oc.step(); og.step();
  }
  close(pg, pc, 1e-6, 'adamw');
  const pb = torch.keep(p0.to({ dtype: 'bfloat16', device: dev })); pb.requiresGrad = true;
  const ob = new AdamW([pb], { lr: 1e-3 });
  pb.grad = g.to({ dtype: 'bfloat16', device: dev });
  ob.step();
  assert(ob.stateDict().tensors.get('0.master').dtype === 'float32', 'master dtype');
  for (const o of [oc, og, ob]) o.dispose();
  torch.dispose([pc, pg, pb]);
});
check('GradScaler on cuda: fused unscale finds inf and backs off', () => {
  const p = torch.keep(torch.zeros([4], { device: dev, requiresGrad: true }));
  const opt = { params: [p], step: () => {} };
  const s = new GradScaler({ initScale: 1024 });
  p.grad = torch.tensor([1024, 2048, 0, -1024], { device: dev });
  assert(s.step(opt) === true, 'finite step skipped');
  assert(JSON.stringify(Array.from(p.grad.toFloat64Array())) === '[1,2,0,-1]', 'unscale');
  s.update();
  p.grad = torch.tensor([1, Infinity, 0, 0], { device: dev });
  assert(s.step(opt) === false, 'inf step taken');
  s.update();
  assert(s.scale === 512, `scale ${s.scale}`);
  p.dispose();
});
check('clipGradNorm on cuda', () => {
  const p = torch.keep(torch.zeros([4], { device: dev, requiresGrad: true }));
  p.grad = torch.tensor([3, 4, 0, 0], { device: dev });
  const n = clipGradNorm([p], 1);
  assert(Math.abs(n - 5) < 1e-6, `norm ${n}`);
  assert(Math.abs(p.grad.norm().item() - 1) < 1e-5, 'clipped norm');
  p.dispose();
});
check('cuda generators: seeded, state replay', () => {
  const g = new torch.Generator(dev).manualSeed(42);
  const a = torch.randn([1000], { generator: g, device: dev });
  const state = g.getState();
  const b = torch.randn([1000], { generator: g, device: dev });
  g.setState(state);
  const c = torch.randn([1000], { generator: g, device: dev });
  assert(relErr(b, c) === 0, 'replay differs');
  const g2 = new torch.Generator(dev).manualSeed(42);
  assert(relErr(torch.randn([1000], { generator: g2, device: dev }), a) === 0, 'reseed differs');
});
check('safetensors: save from cuda, load to cuda', () => {
  const dir = mkdtempSync(join(tmpdir(), 'difflora-gpu-'));
  const t = torch.randn([3, 5], { device: dev }).to('bfloat16');
  saveSafetensors(join(dir, 'x.safetensors'), { t }, { format: 'pt' });
  const { tensors, metadata } = loadSafetensors(join(dir, 'x.safetensors'), { device: dev });
  assert(metadata.format === 'pt', 'metadata');
  const u = tensors.get('t');
  assert(u.device === 'cuda:0' && u.dtype === 'bfloat16', `${u.device} ${u.dtype}`);
  assert(relErr(u, t) === 0, 'values');
});
check('gradient checkpointing on cuda: replay on the device thread gives the same grads (with dropout)', () => {
  torch.manualSeed(5);
  const l1 = new Linear(64, 128).to(dev);
  const l2 = new Linear(128, 64).to(dev);
  const params = [...l1.parameters(), ...l2.parameters()];
  const f = (x) => l2.forward(F.dropout(l1.forward(x).gelu(), 0.3, true)).add(x);
  const x = torch.keep(torch.randn([16, 64], { device: dev, requiresGrad: true }));
  const run = (useCkpt) => {
    for (const p of params) p.grad = null;
    x.grad = null;
    torch.manualSeed(11);
    torch.tidy(() => { (useCkpt ? checkpoint(f, checkpoint(f, x)) : f(f(x))).square().mean().backward(); });
    return [...params, x].map((p) => torch.keep(p.grad));
  };
  const a = run(false);
  const b = run(true);
  a.forEach((g, i) => assert(relErr(b[i], g) === 0, `grad ${i} differs: ${relErr(b[i], g)}`));
  torch.dispose([...a, ...b, x]);
  l1.dispose(); l2.dispose();
});
check('memory flat over 2,000 cuda training steps', () => {
  const lin = new Linear(64, 64).to(dev);
  const opt = new AdamW(lin.parameters(), { lr: 1e-3 });
  const step = () => torch.tidy(() => {
    const loss = lin.forward(torch.randn([32, 64], { device: dev })).square().mean();
    loss.backward();
    opt.step();
    opt.zeroGrad();
  });
  for (let i = 0; i < 50; i++) step();
  const before = torch.memory().numTensors;
  for (let i = 0; i < 2000; i++) step();
  assert(torch.memory().numTensors === before, `${torch.memory().numTensors} vs ${before}`);
  const cudaMem = torch.memory().cuda[0];
  assert(cudaMem && cudaMem.allocatedBytes > 0 && cudaMem.reservedBytes >= cudaMem.allocatedBytes, `cuda memory ${JSON.stringify(cudaMem)}`);
  console.log('      cuda memory', JSON.stringify(cudaMem));
  opt.dispose();
  lin.dispose();
});

console.log(`\n${passed} passed, ${failed} failed`);
process.exitCode = failed ? 1 : 0;
