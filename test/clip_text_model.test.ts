// CLIPTextModel against transformers 4.45: goldens for tiny-sd's text encoder, the checkpoint's key set,
// SD 1.5's CLIP-L key set at full scale (meta device), the activations, masks, pooling and lifetimes.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLIPTextModel, parseCLIPTextConfig } from '../lib/models/clip_text_model.js';
import { CLIP_ACTIVATIONS } from '../lib/models/clip_encoder.js';
import { loadSafetensors, readSafetensorsHeader } from '../lib/io/safetensors.js';
import { readConfig } from '../lib/models/loading.js';
import { noGrad } from '../lib/autograd.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { fixtures, relErr } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');
const encoderDir = join(tinySd, 'text_encoder');
const golden = loadSafetensors(join(fixtures, 'goldens', 'text_encoder.safetensors')).tensors;
const ref = (name: string): Tensor => {
  const t = golden.get(name);
  if (!t) throw new Error(`golden tensor '${name}' missing`);
  return t;
};

let model: CLIPTextModel;
beforeAll(() => {
  model = CLIPTextModel.fromPretrained(tinySd, { subfolder: 'text_encoder' });
});
afterAll(() => {
  model.dispose();
  dispose([...golden.values()]);
});

/** The tiny-sd model rebuilt with some config fields changed, same weights. */
function variant(changes: Record<string, unknown>): CLIPTextModel {
  const m = new CLIPTextModel({ ...readConfig(encoderDir), ...changes });
  m.loadStateDict(model.stateDict());
  return m.eval();
}

describe('CLIPTextModel parity with transformers (tiny-sd)', () => {
  it('matches last_hidden_state, pooler_output and the embeddings', () => {
    const ids = ref('input_ids');
    const errors = tidy(() => noGrad(() => {
      const out = model.forward(ids);
      return {
        last: relErr(out.lastHiddenState, ref('last_hidden_state')),
        pooled: relErr(out.poolerOutput, ref('pooler_output')),
        embeddings: relErr(model.text_model.embeddings.forward(ids), ref('embeddings')),
      };
    }));
    console.log('CLIPTextModel relative errors vs transformers:', errors);
    expect(errors.embeddings).toBeLessThan(1e-6);
    expect(errors.last).toBeLessThan(1e-4);
    expect(errors.pooled).toBeLessThan(1e-4);
  });

  it('returns every hidden state (clip skip): embeddings first, the last one before final_layer_norm', () => {
    tidy(() => noGrad(() => {
      const out = model.forward(ref('input_ids'), { outputHiddenStates: true });
      const hs = out.hiddenStates!;
      expect(hs.length).toBe(model.config.num_hidden_layers + 1);
      expect(relErr(hs[0]!, ref('embeddings'))).toBeLessThan(1e-6);
      expect(relErr(model.text_model.final_layer_norm.forward(hs[hs.length - 1]!), out.lastHiddenState)).toBe(0);
      // each entry is a distinct layer output
      expect(relErr(hs[hs.length - 2]!, hs[hs.length - 1]!)).toBeGreaterThan(1e-3);
      expect(model.forward(ref('input_ids')).hiddenStates).toBeUndefined();
    }));
  });
});

describe('CLIPTextModel keys and sizes', () => {
  it('has exactly the tiny-sd checkpoint keys and shapes; position_ids is a non-persistent buffer', () => {
    const file = readSafetensorsHeader(join(encoderDir, 'model.safetensors'));
    const expected = Object.fromEntries(file.tensors.map((t) => [t.name, t.shape]));
    const ours = Object.fromEntries([...model.stateDict()].map(([k, t]) => [k, t.shape]));
    expect(ours).toEqual(expected);
    expect(Object.keys(expected)).not.toContain('text_model.embeddings.position_ids');
    const buffers = model.namedBuffers();
    expect(buffers.map(([k]) => k)).toEqual(['text_model.embeddings.position_ids']);
    expect(buffers[0]![1].dtype).toBe('int64');
    expect(buffers[0]![1].shape).toEqual([1, 77]);
  });

  it('builds SD 1.5 CLIP-L on the meta device with transformers\' keys, shapes, order and 123 M parameters', () => {
    const config = JSON.parse(readFileSync(join(fixtures, 'sd15-shape', 'text_encoder', 'config.json'), 'utf8')) as Record<string, unknown>;
    const keys = JSON.parse(readFileSync(join(fixtures, 'sd15-shape', 'text_encoder_keys.json'), 'utf8')) as Record<string, number[]>;
    const clipL = torch.withDefaultDevice('meta', () => new CLIPTextModel(config));
    try {
      expect([...clipL.stateDict()].map(([k, t]) => [k, t.shape])).toEqual(Object.entries(keys));
      expect(clipL.numParameters()).toBe(123_060_480);
      expect(clipL.parameters()[0]!.device).toBe('meta');
    } finally {
      clipL.dispose();
    }
  });

  it('loads strictly: a missing key is an error', () => {
    const sd = new Map(model.stateDict());
    sd.delete('text_model.final_layer_norm.bias');
    const m = new CLIPTextModel(readConfig(encoderDir));
    expect(() => m.loadStateDict(sd)).toThrow(/missing key\(s\) \(1\): "text_model.final_layer_norm.bias"/);
    m.dispose();
  });
});

describe('CLIPTextModel config', () => {
  it('errors on an unsupported hidden_act, naming the field', () => {
    expect(() => new CLIPTextModel({ ...readConfig(encoderDir), hidden_act: 'relu' })).toThrow(/hidden_act "relu"/);
    expect(() => new CLIPTextModel({ ...readConfig(encoderDir), num_attention_heads: 5 })).toThrow(/num_attention_heads/);
    expect(() => new CLIPTextModel({ ...readConfig(encoderDir), num_hidden_layers: '5' })).toThrow(/num_hidden_layers/);
    expect(() => new CLIPTextModel({ ...readConfig(encoderDir), layer_norm_eps: -1 })).toThrow(/layer_norm_eps/);
  });

  it('fills transformers\' CLIPTextConfig defaults', () => {
    const c = parseCLIPTextConfig({});
    expect(c).toMatchObject({ hidden_size: 512, intermediate_size: 2048, num_attention_heads: 8, num_hidden_layers: 12,
      hidden_act: 'quick_gelu', eos_token_id: 49407, pad_token_id: 1, max_position_embeddings: 77, layer_norm_eps: 1e-5 });
  });
});

describe('CLIP activations', () => {
  const xs = Array.from({ length: 81 }, (_, i) => (i - 40) / 8);
  const erf = (x: number): number => {
    // Maclaurin series of erf, good to ~1e-11 for |x| ≤ 3.6 (here |x/√2| ≤ 3.54)
    let sum = 0;
    let term = x;
    for (let n = 0; n < 200; n++) {
      sum += term / (2 * n + 1);
      term *= (-x * x) / (n + 1);
    }
    return (2 / Math.sqrt(Math.PI)) * sum;
  };
  const formulas: Record<keyof typeof CLIP_ACTIVATIONS, (x: number) => number> = {
    quick_gelu: (x) => x / (1 + Math.exp(-1.702 * x)),
    gelu: (x) => 0.5 * x * (1 + erf(x / Math.SQRT2)),
    gelu_new: (x) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3))),
    gelu_pytorch_tanh: (x) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3))),
  };
  const apply = (name: keyof typeof CLIP_ACTIVATIONS): number[] =>
    tidy(() => Array.from(CLIP_ACTIVATIONS[name](torch.tensor(xs, { dtype: 'float64' })).toFloat64Array()));

  for (const name of Object.keys(formulas) as (keyof typeof CLIP_ACTIVATIONS)[]) {
    it(`${name} matches its formula`, () => {
      const got = apply(name);
      xs.forEach((x, i) => expect(got[i]).toBeCloseTo(formulas[name](x), 9));
    });
  }

  it('quick_gelu and gelu differ, and the model uses the configured one', () => {
    const q = apply('quick_gelu');
    const g = apply('gelu');
    expect(Math.max(...q.map((v, i) => Math.abs(v - g[i]!)))).toBeGreaterThan(1e-2);
    const gelu = variant({ hidden_act: 'gelu' });
    try {
      const err = tidy(() => noGrad(() => relErr(gelu.forward(ref('input_ids')).lastHiddenState, ref('last_hidden_state'))));
      expect(err).toBeGreaterThan(1e-3);
    } finally {
      gelu.dispose();
    }
  });
});

describe('CLIPTextModel masks and pooling', () => {
  const ids = (): Tensor => ref('input_ids');

  it('is causal: changing a later token leaves earlier positions unchanged', () => {
    tidy(() => noGrad(() => {
      const a = ids().slice(0, 0, 1);
      const b = a.clone();
      b.narrow(1, 5, 1).fill_(320);
      const ha = model.forward(a).lastHiddenState;
      const hb = model.forward(b).lastHiddenState;
      expect(relErr(hb.narrow(1, 0, 5), ha.narrow(1, 0, 5))).toBe(0);
      expect(relErr(hb.narrow(1, 5, 72), ha.narrow(1, 5, 72))).toBeGreaterThan(1e-3);
    }));
  });

  it('combines an attention mask with the causal mask', () => {
    tidy(() => noGrad(() => {
      const x = ids().slice(0, 0, 2);
      const plain = model.forward(x).lastHiddenState;
      const ones = model.forward(x, { attentionMask: torch.ones([2, 77], { dtype: 'int64' }) }).lastHiddenState;
      expect(relErr(ones, plain)).toBe(0);
      // right padding: the causal mask already hides later keys, so real tokens are unchanged and padded
      // positions no longer see the padding before them
      const mask = torch.ones([2, 77], { dtype: 'int64' });
      mask.narrow(1, 10, 67).fill_(0);
      const padded = model.forward(x, { attentionMask: mask }).lastHiddenState;
      expect(relErr(padded.narrow(1, 0, 10), plain.narrow(1, 0, 10))).toBeLessThan(1e-6);
      expect(relErr(padded.narrow(1, 11, 66), plain.narrow(1, 11, 66))).toBeGreaterThan(1e-3);
      // left padding: masking key 0 changes every later position
      const left = torch.ones([2, 77], { dtype: 'bool' });
      left.narrow(1, 0, 1).fill_(false);
      const shifted = model.forward(x, { attentionMask: left }).lastHiddenState;
      expect(relErr(shifted.narrow(1, 1, 1), plain.narrow(1, 1, 1))).toBeGreaterThan(1e-3);
      expect(() => model.forward(x, { attentionMask: torch.ones([2, 76]) })).toThrow(/attentionMask must be \[2, 77\]/);
    }));
  });

  it('pools at argmax(ids) for the legacy eos_token_id 2, else at the first eos_token_id', () => {
    tidy(() => noGrad(() => {
      const x = ids();
      const rows = x.tolist() as number[][];
      const pick = (h: Tensor, positions: number[]): Tensor => torch.stack(positions.map((p, b) => h.select(0, b).select(0, p)));
      const legacy = model.forward(x);
      const argmax = rows.map((r) => r.indexOf(Math.max(...r)));
      expect(relErr(legacy.poolerOutput, pick(legacy.lastHiddenState, argmax))).toBe(0);

      // a token that every prompt has (the start token 49406 is the smallest id there, never the argmax)
      const bos = rows[0]![0]!;
      const m = variant({ eos_token_id: bos });
      try {
        const out = m.forward(x);
        const first = rows.map((r) => r.indexOf(bos));
        expect(first.every((p) => p === 0)).toBe(true);
        expect(argmax.every((p) => p > 0)).toBe(true);
        expect(relErr(out.poolerOutput, pick(out.lastHiddenState, first))).toBe(0);
      } finally {
        m.dispose();
      }
    }));
  });

  it('refuses sequences longer than max_position_embeddings', () => {
    expect(() => tidy(() => model.forward(torch.zeros([1, 78], { dtype: 'int64' })))).toThrow(/max_position_embeddings 77/);
  });
});

describe('CLIPTextModel lifetimes, autograd and dtypes', () => {
  it('tidy leaves memory().numTensors unchanged', () => {
    const x = ref('input_ids');
    tidy(() => model.forward(x, { outputHiddenStates: true })); // warm-up: lazily created state
    const before = memory().numTensors;
    tidy(() => {
      model.forward(x, { outputHiddenStates: true });
    });
    expect(memory().numTensors).toBe(before);
    const kept = tidy(() => noGrad(() => model.forward(x, { attentionMask: torch.ones([8, 77]) }).lastHiddenState));
    expect(memory().numTensors).toBe(before + 1);
    kept.dispose();
    expect(memory().numTensors).toBe(before);
  });

  it('runs frozen under noGrad with no autograd graph', () => {
    const x = ref('input_ids');
    // fromPretrained returns the model frozen, as the training script freezes it
    expect(model.parameters().every((p) => !p.requiresGrad)).toBe(true);
    model.requiresGrad_(true);
    tidy(() => {
      // control: trainable parameters outside noGrad do record a graph
      expect(model.forward(x).lastHiddenState.requiresGrad).toBe(true);
      model.requiresGrad_(false);
      try {
        const out = noGrad(() => model.forward(x, { outputHiddenStates: true }));
        expect(out.lastHiddenState.requiresGrad).toBe(false);
        expect(out.poolerOutput.requiresGrad).toBe(false);
        expect(out.hiddenStates!.some((h) => h.requiresGrad)).toBe(false);
        expect(model.parameters().every((p) => !p.requiresGrad)).toBe(true);
        expect(model.forward(x).lastHiddenState.requiresGrad).toBe(false);
        expect(relErr(out.lastHiddenState, ref('last_hidden_state'))).toBeLessThan(1e-4);
      } finally {
        model.requiresGrad_(true);
      }
      expect(noGrad(() => model.forward(x).lastHiddenState.requiresGrad)).toBe(false);
    });
    model.requiresGrad_(false);
  });

  it('casts to bfloat16 (fromPretrained dtype and Module.to) keeping position_ids int64', () => {
    const bf = CLIPTextModel.fromPretrained(encoderDir, { dtype: 'bfloat16' });
    const moved = variant({}).to('bfloat16');
    try {
      for (const m of [bf, moved]) {
        expect(m.parameters().every((p) => p.dtype === 'bfloat16')).toBe(true);
        expect(m.text_model.embeddings.position_ids.dtype).toBe('int64');
        const err = tidy(() => noGrad(() => {
          const out = m.forward(ref('input_ids'));
          expect(out.lastHiddenState.dtype).toBe('bfloat16');
          return relErr(out.lastHiddenState, ref('last_hidden_state'));
        }));
        expect(err).toBeLessThan(3e-2);
      }
    } finally {
      bf.dispose();
      moved.dispose();
    }
  });
});
