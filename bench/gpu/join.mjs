// Joins ref_step_cuda.py's JSON (diffusers) and sd15_step.mjs's (difflora) on the configuration key and prints
// the markdown table bench/RESULTS.md keeps: seconds per step, samples/s, peak memory, MFU, and the ratio
// difflora/diffusers per row (< 1: difflora faster).
//   node bench/gpu/join.mjs ref-gpu.json difflora-gpu.json [ref-pipeline.json]
import { existsSync, readFileSync } from 'node:fs';

const [refFile, oursFile, refPipeFile] = process.argv.slice(2);
const read = (f) => (f && existsSync(f) ? JSON.parse(readFileSync(f, 'utf8')) : null);
const ref = read(refFile);
const ours = read(oursFile);
if (!ours) { console.error(`usage: node bench/gpu/join.mjs REF.json DIFFLORA.json [REF_PIPELINE.json] (missing ${oursFile})`); process.exit(2); }

const gib = (b) => (typeof b === 'number' ? (b / 2 ** 30).toFixed(2) : '-');
const ms = (s) => (typeof s === 'number' ? (s * 1000).toFixed(1) : '-');
const pct = (x) => (typeof x === 'number' ? (100 * x).toFixed(1) : '-');
const refRows = new Map((ref?.results ?? []).filter((r) => r.status === 'ok').map((r) => [r.key, r]));
const refPeak = ref?.matmul_peak?.denominator_tflops;

console.log(`difflora: ${ours.device}, libtorch ${ours.torch}, ${ours.date}; bf16 ${ours.matmul?.n}³ matmul ${ours.matmul?.tflops_median?.toFixed(1)} TFLOP/s`);
if (ref) console.log(`diffusers: torch ${ref.versions?.torch ?? ref.host_distributions?.torch}, stack ${ref.stack}; bf16 matmul ${refPeak?.toFixed?.(1)} TFLOP/s`);
console.log('');
console.log('| config | diffusers ms/step | difflora ms/step | ratio | diffusers samples/s | difflora samples/s | diffusers peak GiB | difflora peak GiB | diffusers MFU % | difflora MFU % |');
console.log('|---|---|---|---|---|---|---|---|---|---|');
for (const r of ours.rows) {
  const p = refRows.get(r.id) ?? refRows.get(String(r.id).replace(/:graph$/, '')); // a captured step against diffusers' eager one
  const ratio = p && r.status === 'ok' ? (r.median_s / p.median_s).toFixed(2) : '-';
  const refMfu = p?.achieved_tflops && refPeak ? p.achieved_tflops / refPeak : undefined;
  if (r.status !== 'ok') { console.log(`| ${r.id} | ${ms(p?.median_s)} | ${r.status} | - | | | | | | |`); continue; }
  console.log(`| ${r.id} | ${ms(p?.median_s)} | ${ms(r.median_s)} | ${ratio} | ${p?.samples_per_s?.toFixed(2) ?? '-'} | ${r.samples_per_s.toFixed(2)} | ${gib(p?.peak_mem_bytes)} | ${gib(r.peak_mem_bytes)} | ${pct(refMfu)} | ${pct(r.mfu)} |`);
}
const refPipe = read(refPipeFile);
if (ours.pipeline?.length) {
  console.log('');
  console.log('| pipeline | diffusers s/image | difflora s/image | ratio | difflora peak GiB |');
  console.log('|---|---|---|---|---|');
  for (const r of ours.pipeline) {
    const p = refPipe?.rows?.find((x) => x.lora === r.lora && x.status === 'ok');
    const ratio = p && typeof r.median_s === 'number' ? (r.median_s / p.median_s).toFixed(2) : '-';
    console.log(`| ${r.id ?? (r.lora ? 'lora' : 'base')} | ${p?.median_s?.toFixed(3) ?? '-'} | ${typeof r.median_s === 'number' ? r.median_s.toFixed(3) : r.status} | ${ratio} | ${gib(r.peak_mem_bytes)} |`);
  }
}
