// Load a Stable Diffusion pipeline folder, attach a LoRA to the UNet, run one training step by hand, and
// save the LoRA in diffusers and Kohya formats. Runs on the tiny test pipeline by default:
//   npx tsx examples/lora_basics.ts [path/to/diffusers-folder-or-hub-id] [output-dir]
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  AdamW, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDPMScheduler, UNet2DConditionModel, attachLora, clipGradNorm,
  diffusionLoss, saveLoraWeights, setPeftModelStateDict, torch,
} from '../lib/index.js';

const sd = process.argv[2] ?? join(import.meta.dirname, '../test/fixtures/tiny-sd');
const out = process.argv[3] ?? mkdtempSync(join(tmpdir(), 'difflora-example-'));

const tokenizer = CLIPTokenizer.fromPretrained(sd, { subfolder: 'tokenizer' });
const textEncoder = CLIPTextModel.fromPretrained(sd, { subfolder: 'text_encoder' });
const vae = AutoencoderKL.fromPretrained(sd, { subfolder: 'vae' });
const unet = UNet2DConditionModel.fromPretrained(sd, { subfolder: 'unet' });
const scheduler = DDPMScheduler.fromPretrained(sd, { subfolder: 'scheduler' });

torch.manualSeed(0);
const lora = attachLora(unet, { rank: 4 });
unet.train();
const opt = new AdamW(lora.parameters(), { lr: 1e-4 });

const loss = torch.tidy(() => {
  const pixels = torch.rand([1, 3, 64, 64]).mul(2).sub(1);            // an image in [-1, 1]
  const latents = torch.noGrad(() => vae.encode(pixels).sample().mul(vae.scalingFactor));
  const ids = tokenizer.inputIdsTensor(['a photo of a cat']);
  const context = torch.noGrad(() => textEncoder.forward(ids).lastHiddenState);
  const noise = torch.randnLike(latents);
  const timesteps = torch.randint(0, scheduler.config.num_train_timesteps, [1]);
  const noisy = scheduler.addNoise(latents, noise, timesteps);
  const pred = unet.forward(noisy, timesteps, context);
  const l = diffusionLoss(pred, noise, { scheduler, timesteps });
  l.backward();
  clipGradNorm(lora.parameters(), 1.0);
  opt.step();
  opt.zeroGrad();
  return l.item();
});
console.log(`loss ${loss.toFixed(4)}`);

const file = saveLoraWeights(out, unet);
saveLoraWeights(out, unet, { format: 'kohya', weightName: 'lora_kohya.safetensors' });
setPeftModelStateDict(unet, join(out, 'lora_kohya.safetensors'));      // round trip through the Kohya format, into the trained adapter
console.log(`saved ${file}`);
