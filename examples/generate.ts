// Generate images from TypeScript: a Stable Diffusion pipeline, a LoRA (or several, with weights), a seed.
//   npx tsx examples/generate.ts [--model=dir-or-hub-id] [--lora=file[:weight]]... [--prompt=text] [--steps=N]
//                                [--scheduler=pndm|ddim|euler|euler_a|dpmpp_2m] [--output=image.png]
// With no --model it uses the built-in tiny random-weight pipeline that `difflora train` trains by default (its
// pictures are noise-like: the point is the code path).
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { prepareBuiltinDefault } from '../lib/builtin/default.js';
import { StableDiffusionPipeline } from '../lib/index.js';

const { values } = parseArgs({
  options: {
    model: { type: 'string' }, lora: { type: 'string', multiple: true, default: [] }, prompt: { type: 'string', default: 'a pokemon with blue eyes' },
    steps: { type: 'string', default: '20' }, scheduler: { type: 'string' }, seed: { type: 'string', default: '0' }, output: { type: 'string', default: 'image.png' },
  },
});
const model = values.model ?? (await prepareBuiltinDefault()).model;
const pipe = StableDiffusionPipeline.fromPretrained(model, { scheduler: values.scheduler });
try {
  // each LoRA as a named adapter; setAdapters combines them with their weights
  const names = values.lora.map((spec, i) => {
    const [file, weight] = spec.split(/:(?=[\d.]+$)/);
    return { name: pipe.loadLoraWeights(file!, { adapterName: `lora${i}` }).adapterName, weight: weight === undefined ? 1 : Number(weight) };
  });
  if (names.length) pipe.setAdapters(names.map((n) => n.name), names.map((n) => n.weight));
  const out = await pipe.generate({
    prompt: values.prompt, numInferenceSteps: Number(values.steps), seed: Number(values.seed),
    callbackOnStepEnd: ({ step, numSteps }) => process.stdout.write(`\rstep ${step + 1}/${numSteps}`),
  });
  writeFileSync(values.output, out.images![0]!);
  console.log(`\nwrote ${values.output} (adapters: ${pipe.getActiveAdapters().join(', ') || 'none'})`);
} finally {
  pipe.dispose();
}
