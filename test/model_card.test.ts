// The model card (README.md next to the LoRA): its title names the model trained, not the data folder (issue #13).
import { describe, expect, it } from 'vitest';
import { modelCard, modelTitle } from '../lib/training/model_card.js';

const card = { baseModel: 'runwayml/stable-diffusion-v1-5', dataset: '/data/pokemon', rank: 4, steps: 10, learningRate: 1e-4, resolution: 512 };

describe('model card', () => {
  it('the title names the base model, not the data folder', () => {
    const title = modelCard(card).split('\n').find((l) => l.startsWith('# '));
    expect(title).toBe('# LoRA text2image fine-tuning - runwayml/stable-diffusion-v1-5');
    expect(title).not.toContain('pokemon');
    expect(modelCard(card)).toContain('fine-tuned on the /data/pokemon dataset');
  });

  it('a local model folder is named by its folder name, not the path on this machine', () => {
    expect(modelTitle('/home/me/models/tiny-sd/')).toBe('tiny-sd');
    expect(modelTitle('./models/tiny-sd')).toBe('tiny-sd');
    expect(modelTitle('CompVis/stable-diffusion-v1-4')).toBe('CompVis/stable-diffusion-v1-4');
    expect(modelCard({ ...card, baseModel: '/srv/sd15' })).toContain('# LoRA text2image fine-tuning - sd15\n');
  });
});
