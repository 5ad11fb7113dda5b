// `difflora train --validation_prompt` shows its validation (issue #13): a line when each validation run
// starts and ends (images, seconds, folder), and the ETA counts the validation still to come.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main } from '../lib/cli/main.js';
import { fixtures, makeImageFolder } from './helpers.js';

let tmp: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-cli-val-'));
  await makeImageFolder(join(tmp, 'data'), 4);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('difflora train --validation_prompt', () => {
  it('says when validation starts and ends, and the ETA includes it', async () => {
    let err = '';
    const io = { stdout: { write: () => {} }, stderr: { write: (s: string) => { err += s; } } };
    const out = join(tmp, 'out');
    // one step per epoch, two epochs: validation after each, and the final run with the saved LoRA
    const code = await main(['train', `--pretrained_model_name_or_path=${join(fixtures, 'tiny-sd')}`, '--train_data_dir', join(tmp, 'data'),
      '--resolution=32', '--train_batch_size=4', '--max_train_steps=2', '--image_interpolation_mode=bilinear', '--learning_rate=1e-3',
      '--validation_prompt=a blue square', '--num_validation_images=1', '--seed=5', `--output_dir=${out}`], io);
    expect(code, err).toBe(0);
    const lines = err.split('\n');
    expect(lines).toContain("validation: generating 1 image(s) for 'a blue square' (epoch 0)…");
    expect(lines).toContain("validation: generating 1 image(s) for 'a blue square' (epoch 1)…");
    expect(lines).toContain("final validation (the saved LoRA): generating 1 image(s) for 'a blue square' (epoch 1)…");
    const ended = lines.map((l) => /^validation: 1 image\(s\) in (\d+\.\d) s → (.+)$/.exec(l)).filter((m) => m !== null);
    expect(ended.map((m) => m[2])).toEqual([join(out, 'validation', 'epoch-0'), join(out, 'validation', 'epoch-1')]);
    expect(lines.some((l) => new RegExp(`^final validation \\(the saved LoRA\\): 1 image\\(s\\) in \\d+\\.\\d s → ${out}$`).test(l))).toBe(true);
    // step 1: validation not measured yet, said as such; step 2: the two runs left at the first one's duration
    expect(lines.find((l) => l.startsWith('step 1/2 '))).toMatch(/ eta \d+m\d\ds \+ 3 validation run\(s\)$/);
    const eta = /^step 2\/2 .* loss \d+\.\d{4} .* eta (\d+)m(\d\d)s$/.exec(lines.find((l) => l.startsWith('step 2/2 ')) ?? '');
    expect(eta).not.toBeNull();
    const etaSeconds = Number(eta![1]) * 60 + Number(eta![2]);
    expect(etaSeconds).toBeGreaterThanOrEqual(Math.floor(2 * Number(ended[0]![1]) - 1));
  }, 180_000);
});
