// --cache_text_embeddings (sd-scripts' cache_text_encoder_outputs): with the text encoders frozen, each distinct
// caption of the data is encoded once before training, alone (a batch of 1), and a batch's conditioning is put
// together from the kept outputs (SD: the last hidden state; SDXL: both encoders' penultimate hidden states,
// concatenated, and the pooled embedding). Captions chosen at random from an item's list are all cached; an empty
// caption (caption dropout) is just another caption. The text encoders then leave the device (cache_run.ts).
import { noGrad } from '../autograd.js';
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';

/** Captions encoded since the process started (tests count them). */
export const textCacheStats = { encodes: 0 };

export class TextEmbeddingCache {
  readonly #byCaption = new Map<string, Tensor[]>();

  /**
   * Encodes every caption not yet kept with `encode` (its outputs for one caption, each [1, …]), without gradients;
   * `onProgress` after each.
   */
  fill(captions: Iterable<string>, encode: (caption: string) => Tensor[], onProgress?: (done: number, total: number) => void): void {
    const todo = [...new Set(captions)].filter((c) => !this.#byCaption.has(c));
    for (const [i, caption] of todo.entries()) {
      const outputs = noGrad(() => tidy(() => encode(caption)));
      this.#byCaption.set(caption, outputs.map((t) => keep(t)));
      textCacheStats.encodes += 1;
      onProgress?.(i + 1, todo.length);
    }
  }

  /** Output `part` of a batch's captions, concatenated along the batch ([B, …], the caller disposes it). */
  gather(captions: readonly string[], part = 0): Tensor {
    const parts = captions.map((c) => {
      const kept = this.#byCaption.get(c);
      if (!kept) throw new Error(`the text embedding cache has no entry for the caption ${JSON.stringify(c.slice(0, 80))}`);
      const t = kept[part];
      if (!t) throw new Error(`internal: the text embedding cache has no output ${part}`);
      return t;
    });
    return parts.length === 1 ? parts[0]!.clone() : torch.cat(parts);
  }

  /** Captions kept. */
  get size(): number { return this.#byCaption.size; }

  dispose(): void {
    for (const outputs of this.#byCaption.values()) for (const t of outputs) t.dispose();
    this.#byCaption.clear();
  }
}

/**
 * Every caption an epoch can show: each item's list of captions, and the empty caption when the options drop
 * captions at random (`captionDropoutRate` > 0, sd-scripts' --caption_dropout_rate). The spot where caption transforms
 * meet the cache: a shuffled caption cannot be cached (cache_options.ts's captionCachingProblems refuses it).
 */
export function distinctCaptions(items: Iterable<{ captions: readonly string[] }>, options: object = {}): string[] {
  const out = new Set<string>();
  for (const item of items) for (const c of item.captions) out.add(c);
  const dropout = (options as { captionDropoutRate?: unknown }).captionDropoutRate;
  if (typeof dropout === 'number' && dropout > 0) out.add('');
  return [...out];
}
