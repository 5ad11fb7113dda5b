// The flags of captions and aspect-ratio buckets: kohya sd-scripts' names, defaults and meaning
// (lib/training/buckets_captions_options.ts), for `train`, `train-sdxl` and `train-dreambooth`.
import { BUCKETS_CAPTIONS_DEFAULTS as D } from '../training/buckets_captions_options.js';
import type { FlagSpec } from './train_args.js';

const CAPTIONS = 'Captions (sd-scripts)';
const BUCKETS = 'Aspect-ratio buckets (sd-scripts)';

export const BUCKETS_CAPTIONS_FLAGS: Readonly<Record<string, FlagSpec>> = Object.freeze({
  caption_extension: { kind: 'string', group: CAPTIONS, default: D.captionExtension, describe: "Caption files <image stem><ext> next to the images (e.g. '.txt'): used for --train_data_dir folders without metadata.jsonl (sd-scripts' N_name repeat folders or a flat folder), and by train-dreambooth over --instance_prompt." },
  caption_extention: { kind: 'string', group: CAPTIONS, describe: "sd-scripts' misspelled alias of --caption_extension (wins when given)." },
  caption_separator: { kind: 'string', group: CAPTIONS, default: D.captionSeparator, describe: 'The separator of the tags --shuffle_caption and --keep_tokens work on.' },
  shuffle_caption: { kind: 'boolean', group: CAPTIONS, default: D.shuffleCaption, describe: "Shuffle each caption's tags (split at --caption_separator, joined with ', ') every time the image is drawn." },
  keep_tokens: { kind: 'int', group: CAPTIONS, default: D.keepTokens, describe: 'With --shuffle_caption: the first N tags stay in front, unshuffled.' },
  caption_dropout_rate: { kind: 'float', group: CAPTIONS, default: D.captionDropoutRate, describe: 'Probability that an image is trained with an empty caption (0–1).' },
  enable_bucket: { kind: 'boolean', group: BUCKETS, default: D.enableBucket, describe: 'Aspect-ratio buckets: each image resized to cover the bucket (about --resolution² pixels) closest to its aspect ratio and cropped to it; every batch holds one bucket.' },
  min_bucket_reso: { kind: 'int', group: BUCKETS, default: D.minBucketReso, describe: "The smallest bucket side (a multiple of --bucket_reso_steps, at most --resolution)." },
  max_bucket_reso: { kind: 'int', group: BUCKETS, default: D.maxBucketReso, describe: "The largest bucket side (a multiple of --bucket_reso_steps, at least --resolution)." },
  bucket_reso_steps: { kind: 'int', group: BUCKETS, default: D.bucketResoSteps, describe: 'Bucket sides are multiples of this (a multiple of 8; 64 suits the UNet best).' },
  bucket_no_upscale: { kind: 'boolean', group: BUCKETS, default: D.bucketNoUpscale, describe: "Buckets from the images' own sizes (rounded down to --bucket_reso_steps), never enlarging an image; --min/--max_bucket_reso are then ignored." },
} satisfies Record<string, FlagSpec>);

const camel = (flag: string): string => flag.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());

/** These flags' parsed values as options, each only when given other than its default (so parsed flags compare equal without them). */
export function bucketsCaptionsArgs(r: Readonly<Record<string, unknown>>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(BUCKETS_CAPTIONS_FLAGS)
    .filter(([flag, spec]) => r[flag] !== undefined && r[flag] !== spec.default)
    .map(([flag]) => [camel(flag), r[flag]]));
}
