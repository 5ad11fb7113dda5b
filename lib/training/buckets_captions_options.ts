// The options of captions and aspect-ratio buckets (kohya sd-scripts' flags, same names and defaults), shared by
// `train`, `train-sdxl` and `train-dreambooth`: caption files and sd-scripts' N_name repeat folders, caption dropout
// and tag shuffling (lib/data/captions.ts), and buckets (lib/data/buckets.ts). Their domains, defaults and the
// checks between them are here once; the flags are lib/cli/buckets_captions_flags.ts.
// options.ts spreads these rules into its tables: only types come from it (no import cycle at load time)
import type { OptionNaming, Rule } from './options.js';

export interface BucketsCaptionsOptions {
  /** Caption files `<image stem><ext>` next to the images (sd-scripts' default '.caption'). */
  captionExtension?: string;
  /** sd-scripts' misspelled alias of captionExtension (wins when given, as there). */
  captionExtention?: string | null;
  /** What --shuffle_caption and --keep_tokens split captions at (default ','). */
  captionSeparator?: string;
  /** Shuffle the caption's tags (comma-separated) for every item drawn. */
  shuffleCaption?: boolean;
  /** With shuffleCaption: the first N tags stay in front, unshuffled. */
  keepTokens?: number;
  /** Probability that an item's whole caption is replaced by "". */
  captionDropoutRate?: number;
  /** Aspect-ratio buckets instead of square crops. */
  enableBucket?: boolean;
  minBucketReso?: number;
  maxBucketReso?: number;
  /** Bucket sides are multiples of it (a multiple of 8: the VAE works on 8×8 pixel blocks). */
  bucketResoSteps?: number;
  /** Buckets from the images' own sizes, never enlarging an image. */
  bucketNoUpscale?: boolean;
}

/** Largest bucket side: --resolution's limit. */
const MAX_BUCKET_SIDE = 4096;

const EXTENSION: [RegExp, string] = [/^\.?[^/\\\0]+$/, "a file name ending such as '.txt' (no folder)"];
const bool: Rule = { kind: 'boolean' };
const side: Rule = { kind: 'int', min: 8, max: MAX_BUCKET_SIDE };

export const BUCKETS_CAPTIONS_RULES: Readonly<Record<keyof BucketsCaptionsOptions, Rule>> = {
  captionExtension: { kind: 'string', pattern: EXTENSION },
  captionExtention: { kind: 'string', nullable: true, pattern: EXTENSION },
  captionSeparator: { kind: 'string' },
  shuffleCaption: bool,
  keepTokens: { kind: 'int', min: 0 },
  captionDropoutRate: { kind: 'float', domain: 'nonNegative' },
  enableBucket: bool,
  minBucketReso: side,
  maxBucketReso: side,
  bucketResoSteps: { kind: 'int', min: 8, max: MAX_BUCKET_SIDE, multipleOf: 8, why: 'the VAE works on 8×8 pixel blocks' },
  bucketNoUpscale: bool,
};

/** sd-scripts' defaults. */
export const BUCKETS_CAPTIONS_DEFAULTS = Object.freeze({
  captionExtension: '.caption',
  captionSeparator: ',',
  shuffleCaption: false,
  keepTokens: 0,
  captionDropoutRate: 0,
  enableBucket: false,
  minBucketReso: 256,
  maxBucketReso: 1024,
  bucketResoSteps: 64,
  bucketNoUpscale: false,
} as const satisfies { [K in keyof BucketsCaptionsOptions]?: NonNullable<BucketsCaptionsOptions[K]> });

/** The options with their values (the defaults filled in). */
export type ResolvedBucketsCaptions = {
  readonly captionExtension: string;
  readonly captionExtention: string | null;
  readonly captionSeparator: string;
  readonly shuffleCaption: boolean;
  readonly keepTokens: number;
  readonly captionDropoutRate: number;
  readonly enableBucket: boolean;
  readonly minBucketReso: number;
  readonly maxBucketReso: number;
  readonly bucketResoSteps: number;
  readonly bucketNoUpscale: boolean;
};

/** The caption extension in use: the misspelled alias wins when given (sd-scripts' verify_training_args). */
export function captionExtensionOf(o: Pick<ResolvedBucketsCaptions, 'captionExtension' | 'captionExtention'>): string {
  return o.captionExtention ?? o.captionExtension;
}

/**
 * The checks between these options (and --resolution), each naming its flag: the dropout rate a probability,
 * min ≤ resolution ≤ max bucket side (sd-scripts asserts the same), and keep_tokens only with shuffling.
 */
export function bucketsCaptionsProblems(o: Readonly<Record<string, unknown>>, naming: OptionNaming): string[] {
  const name = (k: string, flag: string) => (naming === 'flag' ? flag : `${k} (${flag})`);
  const num = (k: string, d: number) => (typeof o[k] === 'number' ? (o[k] as number) : d);
  const D = BUCKETS_CAPTIONS_DEFAULTS;
  const problems: string[] = [];
  const rate = o.captionDropoutRate;
  if (typeof rate === 'number' && Number.isFinite(rate) && rate > 1) problems.push(`${name('captionDropoutRate', '--caption_dropout_rate')} must be a probability in [0, 1], got ${rate}`);
  const keep = o.keepTokens;
  if (typeof keep === 'number' && keep > 0 && o.shuffleCaption !== true) {
    problems.push(`${name('keepTokens', '--keep_tokens')}=${keep} only acts with ${name('shuffleCaption', '--shuffle_caption')} (the tags it keeps in front are those not shuffled)`);
  }
  const sep = o.captionSeparator;
  if (sep === '') problems.push(`${name('captionSeparator', '--caption_separator')} must not be empty`);
  if (o.enableBucket === true && o.bucketNoUpscale !== true) {
    const min = num('minBucketReso', D.minBucketReso);
    const max = num('maxBucketReso', D.maxBucketReso);
    const steps = num('bucketResoSteps', D.bucketResoSteps);
    const resolution = typeof o.resolution === 'number' ? o.resolution : undefined;
    if (min > max) problems.push(`${name('minBucketReso', '--min_bucket_reso')}=${min} is larger than ${name('maxBucketReso', '--max_bucket_reso')}=${max}`);
    if (steps > 0 && min % steps !== 0) problems.push(`${name('minBucketReso', '--min_bucket_reso')}=${min} must be a multiple of ${name('bucketResoSteps', '--bucket_reso_steps')}=${steps}`);
    if (steps > 0 && max % steps !== 0) problems.push(`${name('maxBucketReso', '--max_bucket_reso')}=${max} must be a multiple of ${name('bucketResoSteps', '--bucket_reso_steps')}=${steps}`);
    if (resolution !== undefined && min > resolution) problems.push(`${name('minBucketReso', '--min_bucket_reso')}=${min} must be at most ${name('resolution', '--resolution')}=${resolution}`);
    if (resolution !== undefined && max < resolution) problems.push(`${name('maxBucketReso', '--max_bucket_reso')}=${max} must be at least ${name('resolution', '--resolution')}=${resolution}`);
  }
  return problems;
}
