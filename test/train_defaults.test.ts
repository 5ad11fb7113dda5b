// The training options' defaults are defined once (TRAIN_DEFAULTS): the CLI's flag table shows and applies
// them, and resolveTrainOptions fills them in for the library, so the two cannot drift (issue #13).
import { LORA_VARIANT_FLAGS } from '../lib/cli/lora_variant_flags.js';
import { describe, expect, it } from 'vitest';
import { DIFFLORA_FLAGS, TRAIN_FLAGS } from '../lib/cli/train_args.js';
import { TRAIN_DEFAULTS, resolveTrainOptions } from '../lib/training/options.js';

const camel = (flag: string) => flag.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
const CLI_ONLY = new Set(['use8bitAdam', 'pushToHub', 'localRank']);

describe('training defaults', () => {
  it('every flag default is TRAIN_DEFAULTS\'s, and every TRAIN_DEFAULTS entry but mixedPrecision is a flag default', () => {
    const flagDefaults = Object.fromEntries(Object.entries({ ...TRAIN_FLAGS, ...DIFFLORA_FLAGS, ...LORA_VARIANT_FLAGS })
      .filter(([, spec]) => spec.default !== undefined)
      .map(([flag, spec]) => [camel(flag), spec.default])
      .filter(([key]) => !CLI_ONLY.has(key as string)));
    const { mixedPrecision, ...rest } = TRAIN_DEFAULTS;
    expect(flagDefaults).toEqual(rest);
    expect(mixedPrecision).toBe('no'); // --mixed_precision has no flag default (accelerate's is 'no')
  });

  it('resolveTrainOptions fills in every default, keeps given values and a null --max_grad_norm', () => {
    const r = resolveTrainOptions({ pretrainedModelNameOrPath: 'm', trainDataDir: 'd', learningRate: 3e-4, maxGradNorm: null, seed: 7 });
    expect(r).toMatchObject({ ...TRAIN_DEFAULTS, learningRate: 3e-4, maxGradNorm: null, seed: 7, pretrainedModelNameOrPath: 'm', trainDataDir: 'd' });
    expect(r.maxTrainSteps).toBeNull();
    expect(r.validationPrompt).toBeNull();
    expect(resolveTrainOptions({ pretrainedModelNameOrPath: 'm', trainDataDir: 'd' }).maxGradNorm).toBe(1.0);
    // null turns checkpoints off (the library's way; the CLI always has a number)
    expect(resolveTrainOptions({ pretrainedModelNameOrPath: 'm', trainDataDir: 'd', checkpointingSteps: null }).checkpointingSteps).toBeNull();
    expect(resolveTrainOptions({ pretrainedModelNameOrPath: 'm', trainDataDir: 'd' }).checkpointingSteps).toBe(500);
    // null where the option has a default means the default, as `??` did in the loop before
    expect(resolveTrainOptions({ pretrainedModelNameOrPath: 'm', trainDataDir: 'd', mixedPrecision: null }).mixedPrecision).toBe('no');
  });
});
