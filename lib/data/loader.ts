// Batches of (pixel values, captions) over a Dataset, as the script's DataLoader (shuffle=True,
// drop_last=False), with images decoded ahead of use and a small state for exact resume.
//
// Workers (`numWorkers`, the script's --dataloader_num_workers): as torch's DataLoader with prefetch_factor 2,
// N workers mean N images decoded at once (sharp/libvips, in libuv's thread pool — at most UV_THREADPOOL_SIZE,
// default 4, really run in parallel) and up to 2 batches per worker decoded ahead of the consumer. 0 means
// no decoding ahead: each image is decoded when the training loop asks for its batch.
//
// Reproducibility: the epoch order is a permutation seeded by (seed, epoch); each item's crop, flip and
// caption choice come from its own Rng seeded by (seed, epoch, position). So the output depends only on
// { seed, epoch, position } — not on how far decoding has run ahead — and restoring a saved state
// continues exactly.
//
// Sharding (`shard`, several data-parallel processes) follows accelerate's BatchSamplerShard with even_batches: the
// epoch's order is cut into batches of batchSize, process r takes batches r, r + N, r + 2N …, and the tail is padded
// with the order's first items so every process gets the same number of full batches. Positions stay global: an
// item's draws are keyed by its position in the whole epoch's order, whichever process reads it.
//
// Aspect-ratio buckets (`buckets`, lib/data/buckets.ts; sd-scripts' BucketManager): each epoch, every bucket's items
// are shuffled (seed, epoch, 1, bucket) and cut into batches of batchSize (the last one of a bucket may be partial),
// and the batches are shuffled (seed, epoch, 2, 0); every batch holds one bucket, so one shape, and every item comes
// once per epoch. With several processes every batch is filled up from its own bucket (wrapping around), process
// r takes batches r, r + N, … and the list wraps to its first batches so every process has as many; positions are
// then g·batchSize + j for global batch g.
import type { Dataset, DatasetItem } from './imagefolder.js';
import { permutation } from './imagefolder.js';
import { Rng, deriveSeed, loadTrainImage, type Interpolation, type TrainImage, type TransformOptions } from './transforms.js';
import { DATA_DEFAULTS } from './defaults.js';
import type { BucketPlan } from './buckets.js';
import { CAPTION_DEFAULTS, processCaption, varies, type CaptionOptions } from './captions.js';

export interface LoaderState {
  epoch: number;
  /** Items of this epoch's order already consumed. */
  position: number;
  seed: number;
}

export interface LoaderOptions {
  batchSize: number;
  resolution: number;
  centerCrop?: boolean;
  randomFlip?: boolean;
  /** The SDXL script's order: flip the resized image, then crop it (its crop offset is in the flipped image). */
  flipBeforeCrop?: boolean;
  interpolation?: Interpolation;
  seed?: number;
  /** Shuffle each epoch (default true); false keeps dataset order. */
  shuffle?: boolean;
  /**
   * Decoding workers: `numWorkers` images decoded at once and `2 · numWorkers · batchSize` items decoded
   * ahead of the consumer; 0 decodes each item only when its batch is asked for. When given, it sets both
   * `prefetch` and `concurrency`.
   */
  numWorkers?: number;
  /** Items decoded ahead of the consumer (default 2 batches; 0: none). Ignored when numWorkers is given. */
  prefetch?: number;
  /** Decodes running at once (default: unbounded). Ignored when numWorkers is given. */
  concurrency?: number;
  /** Skip images that fail to decode (counted in `skipped`) instead of throwing. */
  skipBroken?: boolean;
  /** This process's share of each epoch (data-parallel training); default the whole epoch. */
  shard?: { rank: number; worldSize: number };
  /** Caption dropout and tag shuffling (lib/data/captions.ts), drawn after the crop and flip; default none. */
  captions?: CaptionOptions;
  /** Aspect-ratio buckets: each dataset item's bucket (lib/data/buckets.ts); each batch then holds one bucket. */
  buckets?: BucketPlan;
  /** How an item's image is loaded (default loadTrainImage); --cache_latents gives its cached views without pixels. */
  loadImage?: (file: string, options: TransformOptions) => Promise<TrainImage>;
}

export interface Batch {
  /**
   * float32 B·3·H·W, NCHW, in [-1, 1] (H = W = resolution without buckets; the batch's bucket with); empty when a
   * loadImage gives the images without pixels (--cache_latents).
   */
  pixelValues: Float32Array;
  shape: [number, number, number, number];
  captions: string[];
  imagePaths: string[];
  cropTopLeft: [number, number][];
  originalSizes: [number, number][];
  /** Each item's crop size, [height, width] (the same for every item of a batch): what SDXL's time ids take as target size. */
  targetSizes: [number, number][];
  /** Whether each item was flipped (with cropTopLeft and targetSizes, the item's view: what a latent cache keys on). */
  flipped: boolean[];
  /** Each item's (epoch, position in the epoch's global order): what its random draws are keyed by. */
  keys: [number, number][];
}

interface Decoded { ok: true; image: TrainImage; caption: string; imagePath: string; key: [number, number] }
interface Failed { ok: false; error: Error; imagePath: string }
type Outcome = Decoded | Failed;

interface Pending { epoch: number; position: number; promise: Promise<Outcome>; begin: () => void; started: boolean }

export class ImageCaptionLoader {
  readonly batchSize: number;
  readonly resolution: number;
  /** The images skipped so far (skipBroken), one entry per skip, with their errors. */
  readonly skippedImages: { file: string; error: Error }[] = [];
  get skipped(): number { return this.skippedImages.length; }
  /** Decodes started so far, and the most that ran at once (for tests and benchmarks). */
  readonly stats = { started: 0, inFlight: 0, peakInFlight: 0 };

  private readonly opts: Required<Omit<LoaderOptions, 'batchSize' | 'resolution' | 'seed' | 'numWorkers' | 'shard' | 'buckets' | 'loadImage'>>;
  private readonly buckets: BucketPlan | undefined;
  private readonly loadImage: (file: string, options: TransformOptions) => Promise<TrainImage>;
  private readonly shard: { rank: number; worldSize: number };
  /** Items this process reads per epoch (the dataset's length, or its shard's, padded, with several processes). */
  readonly epochLength: number;
  private seed: number;
  private epoch = 0;
  private position = 0;
  /** Epoch orders in use (the consumer's epoch and, when decoding runs ahead across the boundary, the next). */
  private orders = new Map<number, Schedule>();
  /** Decodes started ahead, in consumption order, starting at (epoch, position). */
  private queue: Pending[] = [];
  private busy: Promise<unknown> = Promise.resolve();

  constructor(readonly dataset: Dataset, options: LoaderOptions) {
    if (!Number.isInteger(options.batchSize) || options.batchSize < 1) throw new RangeError(`batchSize must be a positive integer, got ${options.batchSize}`);
    if (!Number.isInteger(options.resolution) || options.resolution < 1) throw new RangeError(`resolution must be a positive integer, got ${options.resolution}`);
    if (dataset.length === 0) throw new Error('the dataset is empty');
    const workers = options.numWorkers;
    if (workers !== undefined && (!Number.isInteger(workers) || workers < 0)) throw new RangeError(`numWorkers must be a non-negative integer, got ${workers}`);
    this.batchSize = options.batchSize;
    this.resolution = options.resolution;
    this.seed = options.seed ?? 0;
    this.opts = {
      centerCrop: options.centerCrop ?? DATA_DEFAULTS.centerCrop,
      randomFlip: options.randomFlip ?? DATA_DEFAULTS.randomFlip,
      flipBeforeCrop: options.flipBeforeCrop ?? false,
      interpolation: options.interpolation ?? DATA_DEFAULTS.interpolation,
      shuffle: options.shuffle ?? true,
      prefetch: workers !== undefined ? 2 * workers * options.batchSize : Math.max(0, options.prefetch ?? 2 * options.batchSize),
      concurrency: workers !== undefined ? Math.max(1, workers) : Math.max(1, options.concurrency ?? Infinity),
      skipBroken: options.skipBroken ?? DATA_DEFAULTS.skipBroken,
      captions: options.captions ?? CAPTION_DEFAULTS,
    };
    this.buckets = options.buckets;
    if (this.buckets && this.buckets.bucketOf.length !== dataset.length) {
      throw new RangeError(`buckets: a plan of ${this.buckets.bucketOf.length} items for a dataset of ${dataset.length}`);
    }
    this.loadImage = options.loadImage ?? loadTrainImage;
    this.shard = options.shard ?? { rank: 0, worldSize: 1 };
    const { rank, worldSize } = this.shard;
    if (!Number.isInteger(worldSize) || worldSize < 1 || !Number.isInteger(rank) || rank < 0 || rank >= worldSize) {
      throw new RangeError(`shard: rank must be an integer in [0, worldSize), got rank ${rank} of ${worldSize}`);
    }
    if (worldSize > 1 && this.opts.skipBroken) throw new Error('skipBroken is not supported with several processes (the shards would fall out of step)');
    // accelerate: ceil(ceil(n / B) / N) batches per process, all full
    const batches = this.buckets ? bucketBatchCount(this.buckets, this.batchSize) : Math.ceil(dataset.length / this.batchSize);
    this.epochLength = worldSize === 1 ? dataset.length : Math.ceil(batches / worldSize) * this.batchSize;
    this.localBatches = worldSize === 1 ? batches : Math.ceil(batches / worldSize);
  }

  private readonly localBatches: number;

  /**
   * The dataset index and global position of this process's `local`-th item of `epoch`: global batch k holds the N
   * processes' batches in rank order; positions past the dataset are the order's first items again (even batches).
   */
  private itemAt(epoch: number, local: number): { index: number; position: number; bucket: number } {
    const schedule = this.orderOf(epoch);
    if (schedule.bucketed) return { index: schedule.index[local]!, position: schedule.position[local]!, bucket: schedule.bucket[local]! };
    const order = schedule.index;
    if (this.shard.worldSize === 1) return { index: order[local]!, position: local, bucket: -1 };
    const B = this.batchSize;
    const W = this.shard.worldSize;
    const position = Math.floor(local / B) * W * B + this.shard.rank * B + (local % B);
    const n = this.dataset.length;
    return { index: order[position < n ? position : (position - n) % Math.min(n, W * B)]!, position, bucket: -1 };
  }

  /** Where the batch holding this process's `local`-th item of `epoch` ends (buckets); otherwise batches are cut by count. */
  private batchEnd(epoch: number, local: number): number {
    const s = this.orderOf(epoch);
    return s.bucketed ? s.batchEnd[local]! : Math.min(this.epochLength, local + this.batchSize);
  }

  /** Batches per epoch when nothing is skipped (ceil, the last batch may be partial; with buckets, Σ ceil(n_bucket / batch)). */
  get batchesPerEpoch(): number { return this.localBatches; }

  /**
   * Where dataset item `index` is cropped, whatever the epoch: its crop size [height, width] (the square resolution,
   * or its bucket) and, with buckets, the size it is resized to first ([width, height]; undefined: the cover of the
   * bucket, or the shorter side at the resolution). With a center crop an item's views are these and a flip (Batch's
   * targetSizes, cropTopLeft and flipped say which one a batch used): what a latent cache keys on.
   */
  viewOf(index: number): { targetSize: [number, number]; resized?: readonly [number, number]; bucketed: boolean } {
    if (!Number.isInteger(index) || index < 0 || index >= this.dataset.length) throw new RangeError(`dataset index ${index} out of range [0, ${this.dataset.length})`);
    const plan = this.buckets;
    if (!plan) return { targetSize: [this.resolution, this.resolution], bucketed: false };
    const [w, h] = plan.resos[plan.bucketOf[index]!]!;
    const resized = plan.resized[index];
    return { targetSize: [h, w], ...(resized ? { resized } : {}), bucketed: true };
  }

  /** The state to save with a checkpoint: what next() will return depends only on it. */
  getState(): LoaderState { return { epoch: this.epoch, position: this.position, seed: this.seed }; }

  /** Restores a saved state; decodes already running ahead are dropped. */
  setState(state: LoaderState): void {
    const n = this.epochLength;
    if (!Number.isInteger(state.epoch) || state.epoch < 0 || !Number.isInteger(state.position) || state.position < 0 || state.position > n) {
      throw new RangeError(`invalid loader state ${JSON.stringify(state)} for an epoch of ${n} items`);
    }
    this.seed = state.seed;
    this.epoch = state.epoch;
    this.position = state.position;
    this.normalise();
    this.orders.clear();
    this.queue = [];
  }

  /** The next batch; batches never span two epochs. Calls are served one after another. */
  next(): Promise<Batch> {
    const run = this.busy.then(() => this.nextBatch());
    this.busy = run.catch(() => undefined);
    return run;
  }

  private normalise(): void {
    if (this.position >= this.epochLength) { this.epoch += 1; this.position = 0; }
  }

  private orderOf(epoch: number): Schedule {
    let order = this.orders.get(epoch);
    if (order === undefined) {
      const n = this.dataset.length;
      if (this.buckets) {
        order = bucketSchedule(this.buckets, this.batchSize, this.seed, epoch, this.opts.shuffle, this.shard, this.epochLength);
      } else {
        let index: Uint32Array;
        if (this.opts.shuffle) index = permutation(n, deriveSeed(this.seed, epoch));
        else { index = new Uint32Array(n); for (let i = 0; i < n; i++) index[i] = i; }
        order = { bucketed: false, index };
      }
      for (const e of [...this.orders.keys()]) if (e < this.epoch) this.orders.delete(e);
      this.orders.set(epoch, order);
    }
    return order;
  }

  /** Queues the decode of one item; it begins when a worker is free (items begin in queue order). */
  private start(epoch: number, position: number): Pending {
    let begin!: () => void;
    const gate = new Promise<void>((resolve) => { begin = resolve; });
    // what the item is and its random draws are fixed now; only the decoding waits for a worker
    const at = this.itemAt(epoch, position);
    const item = this.dataset.get(at.index);
    const rng = new Rng(deriveSeed(this.seed, epoch, at.position));
    return { epoch, position, promise: gate.then(() => this.decode(item, rng, [epoch, at.position], at.index, at.bucket)), begin, started: false };
  }

  /** Begins queued decodes, oldest first, while fewer than `concurrency` run. */
  private pump(): void {
    for (const p of this.queue) {
      if (this.stats.inFlight >= this.opts.concurrency) return;
      if (p.started) continue;
      p.started = true;
      this.stats.started += 1;
      this.stats.inFlight += 1;
      this.stats.peakInFlight = Math.max(this.stats.peakInFlight, this.stats.inFlight);
      p.promise.finally(() => { this.stats.inFlight -= 1; this.pump(); }).catch(() => undefined);
      p.begin();
    }
  }

  private decode(item: DatasetItem, rng: Rng, key: [number, number], index: number, bucket: number): Promise<Outcome> {
    const plan = this.buckets;
    const reso = plan && bucket >= 0 ? plan.resos[bucket]! : undefined;
    const resized = plan?.resized[index];
    const promise: Promise<Outcome> = this.loadImage(item.imagePath, {
      ...(reso ? { target: { width: reso[0], height: reso[1], ...(resized ? { resized } : {}) } } : {}),
      resolution: this.resolution,
      centerCrop: this.opts.centerCrop,
      randomFlip: this.opts.randomFlip,
      flipBeforeCrop: this.opts.flipBeforeCrop,
      interpolation: this.opts.interpolation,
      rng,
    }).then(
      (image): Outcome => {
        const chosen = item.captions.length === 1 ? item.captions[0]! : item.captions[rng.nextInt(item.captions.length)]!;
        const caption = varies(this.opts.captions) ? processCaption(chosen, this.opts.captions, rng) : chosen;
        return { ok: true, image, caption, imagePath: item.imagePath, key };
      },
      (e: unknown): Outcome => ({
        ok: false,
        error: e instanceof Error ? e : new Error(`cannot read image '${item.imagePath}': ${String(e)}`),
        imagePath: item.imagePath,
      }),
    );
    return promise;
  }

  /** Starts decodes, in consumption order (across the epoch boundary), until `target` are queued. */
  private fill(target: number): void {
    const n = this.epochLength;
    let last = this.queue[this.queue.length - 1];
    let epoch = last ? last.epoch : this.epoch;
    let position = last ? last.position + 1 : this.position;
    while (this.queue.length < target) {
      if (position >= n) { epoch += 1; position = 0; }
      last = this.start(epoch, position);
      this.queue.push(last);
      position += 1;
    }
    this.pump();
  }

  private async nextBatch(): Promise<Batch> {
    const n = this.epochLength;
    const good: Decoded[] = [];
    let consecutiveFailures = 0;
    // Work on a cursor and commit (epoch, position, queue) only when the batch is complete, so a thrown
    // error leaves the loader where it was.
    let epoch = this.epoch;
    let position = this.position;
    let consumed = 0;
    const skippedHere: Failed[] = [];
    // with buckets a batch is the items up to its end (one bucket), however many are good; without, batchSize good items
    let end = this.buckets ? this.batchEnd(epoch, position < n ? position : 0) : Infinity;
    for (;;) {
      if (good.length === this.batchSize) break;
      if (position >= end && good.length > 0) break;
      if (position >= n) {
        if (good.length > 0) break; // last, partial batch of the epoch
        epoch += 1; position = 0;   // everything left in the epoch was broken: go on into the next one
        if (this.buckets) end = this.batchEnd(epoch, 0);
      }
      if (this.buckets && position >= end) end = this.batchEnd(epoch, position); // the batch was all broken: the next one
      // Keep `prefetch` decodes in flight beyond the one awaited now.
      this.fill(consumed + 1 + this.opts.prefetch);
      const pending = this.queue[consumed]!;
      if (pending.epoch !== epoch || pending.position !== position) throw new Error('internal: loader queue out of step');
      const outcome = await pending.promise;
      consumed += 1;
      position += 1;
      if (outcome.ok) {
        good.push(outcome);
        consecutiveFailures = 0;
      } else {
        if (!this.opts.skipBroken) throw outcome.error;
        skippedHere.push(outcome);
        consecutiveFailures += 1;
        if (consecutiveFailures >= n) {
          throw new Error(`every image of the dataset failed to load (${n}); the last: ${outcome.error.message}`);
        }
      }
    }

    this.queue.splice(0, consumed);
    this.epoch = epoch;
    this.position = position;
    this.normalise();
    this.skippedImages.push(...skippedHere.map((f) => ({ file: f.imagePath, error: f.error })));
    this.fill(this.opts.prefetch);

    const B = good.length;
    const [H, W] = good[0]!.image.targetSize;
    const per = 3 * H * W;
    // images given without pixels (loadImage of --cache_latents): no pixel buffer
    const pixelValues = new Float32Array(good.some((g) => g.image.data.length > 0) ? B * per : 0);
    good.forEach((g, i) => {
      if (g.image.targetSize[0] !== H || g.image.targetSize[1] !== W) throw new Error(`internal: a batch of ${H}×${W} images holds one of ${g.image.targetSize.join('×')}`);
      if (pixelValues.length > 0) pixelValues.set(g.image.data, i * per);
    });
    return {
      pixelValues,
      shape: [B, 3, H, W],
      captions: good.map((g) => g.caption),
      imagePaths: good.map((g) => g.imagePath),
      cropTopLeft: good.map((g) => g.image.cropTopLeft),
      originalSizes: good.map((g) => g.image.originalSize),
      targetSizes: good.map((g) => g.image.targetSize),
      flipped: good.map((g) => g.image.flipped),
      keys: good.map((g) => g.key),
    };
  }
}

/** An epoch's order: dataset indices in consumption order, and with buckets each item's key position, bucket and batch end. */
type Schedule =
  | { bucketed: false; index: Uint32Array }
  | { bucketed: true; index: Uint32Array; position: Float64Array; bucket: Int32Array; batchEnd: Uint32Array };

/** Each bucket's items, in dataset order. */
function bucketMembers(plan: BucketPlan): number[][] {
  const members: number[][] = plan.resos.map(() => []);
  plan.bucketOf.forEach((b, i) => members[b]!.push(i));
  return members;
}

/** Σ over buckets of ceil(n_b / batchSize): the batches of an epoch. */
export function bucketBatchCount(plan: BucketPlan, batchSize: number): number {
  return bucketMembers(plan).reduce((s, m) => s + Math.ceil(m.length / batchSize), 0);
}

/** One epoch of bucketed batches for this process (see the header): what itemAt reads. */
function bucketSchedule(
  plan: BucketPlan, B: number, seed: number, epoch: number, shuffle: boolean, shard: { rank: number; worldSize: number }, length: number,
): Schedule {
  const members = bucketMembers(plan).map((m, b) => {
    if (!shuffle) return m;
    const perm = permutation(m.length, deriveSeed(seed, epoch, 1, b));
    return Array.from(perm, (k) => m[k]!);
  });
  const W = shard.worldSize;
  // the batches: (bucket, first item, size); with several processes every batch is full (its bucket wraps around)
  const batches: { bucket: number; items: number[] }[] = [];
  members.forEach((m, b) => {
    for (let k = 0; k * B < m.length; k++) {
      const size = W === 1 ? Math.min(B, m.length - k * B) : B;
      batches.push({ bucket: b, items: Array.from({ length: size }, (_, j) => m[(k * B + j) % m.length]!) });
    }
  });
  const order = shuffle ? permutation(batches.length, deriveSeed(seed, epoch, 2, 0)) : Uint32Array.from(batches, (_, i) => i);
  const index = new Uint32Array(length);
  const position = new Float64Array(length);
  const bucket = new Int32Array(length);
  const batchEnd = new Uint32Array(length);
  let local = 0;
  let global = 0;
  const localBatches = W === 1 ? batches.length : length / B;
  for (let k = 0; k < localBatches; k++) {
    const g = W === 1 ? k : k * W + shard.rank; // process r takes global batches r, r + N, …; past the end, the first ones again
    const batch = batches[order[g % batches.length]!]!;
    const start = local;
    batch.items.forEach((item, j) => {
      index[local] = item;
      position[local] = W === 1 ? global + j : g * B + j;
      bucket[local] = batch.bucket;
      local += 1;
    });
    batchEnd.fill(local, start, local);
    global += batch.items.length;
  }
  if (local !== length) throw new Error(`internal: a bucketed epoch of ${local} items, expected ${length}`);
  return { bucketed: true, index, position, bucket, batchEnd };
}
