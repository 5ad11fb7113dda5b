// bfloat16 weights on CPU stay within bf16 tolerance of the fp32 goldens (8 mantissa bits through a
// whole network: a few percent), for the three models.
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import { loadSafetensors } from '../lib/io/safetensors.js';
import { AutoencoderKL } from '../lib/models/autoencoder_kl.js';
import { UNet2DConditionModel } from '../lib/models/unet_2d_condition.js';
import { dispose, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import { fixtures, relErr } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');
const loaded: Tensor[] = [];
function goldens(name: string): (k: string) => Tensor {
  const { tensors } = loadSafetensors(join(fixtures, 'goldens', name));
  loaded.push(...tensors.values());
  return (k) => { const t = tensors.get(k); if (!t) throw new Error(`missing ${k}`); return t; };
}
afterAll(() => dispose(loaded));

describe('bfloat16 on CPU', () => {
  it('UNet forward within 5e-2 of the fp32 golden', () => {
    const g = goldens('unet.safetensors');
    const unet = UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet', dtype: 'bfloat16' });
    tidy(() => {
      const out = noGrad(() => unet.forward(g('sample').to('bfloat16'), g('timesteps'), g('encoder_hidden_states').to('bfloat16')));
      expect(out.dtype).toBe('bfloat16');
      const err = relErr(out, g('out'));
      expect(err).toBeLessThan(5e-2);
      expect(err).toBeGreaterThan(1e-4); // really computed in bf16
    });
    unet.dispose();
  });

  it('VAE encode and decode within 5e-2 of the fp32 goldens', () => {
    const g = goldens('vae.safetensors');
    const vae = AutoencoderKL.fromPretrained(tinySd, { subfolder: 'vae', dtype: 'bfloat16' });
    tidy(() => noGrad(() => {
      expect(relErr(vae.encode(g('pixel_values').to('bfloat16')).mean, g('mean'))).toBeLessThan(5e-2);
      expect(relErr(vae.decode(g('mean').to('bfloat16')), g('decoded_from_mean'))).toBeLessThan(5e-2);
    }));
    vae.dispose();
  });
});
