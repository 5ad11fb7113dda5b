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
import type { Dataset, DatasetItem } from './imagefolder.js';
import { permutation } from './imagefolder.js';
import { Rng, deriveSeed, loadTrainImage, type Interpolation, type TrainImage, type TransformOptions } from './transforms.js';
import { DATA_DEFAULTS } from './defaults.js';

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
  /** How an item's image is loaded (default loadTrainImage); --cache_latents gives its cached views without pixels. */
  loadImage?: (file: string, options: TransformOptions) => Promise<TrainImage>;
}

export interface Batch {
  /** float32 B·3·R·R, NCHW, in [-1, 1]; empty when a loadImage gives the images without pixels (--cache_latents). */
  pixelValues: Float32Array;
  shape: [number, number, number, number];
  captions: string[];
  imagePaths: string[];
  cropTopLeft: [number, number][];
  originalSizes: [number, number][];
  /** Each item's (epoch, position in the epoch's global order): what its random draws are keyed by. */
  keys: [number, number][];
  /** Whether each item was flipped (--random_flip). */
  flipped: boolean[];
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

  private readonly opts: Required<Omit<LoaderOptions, 'batchSize' | 'resolution' | 'seed' | 'numWorkers' | 'shard' | 'loadImage'>>;
  private readonly loadImage: (file: string, options: TransformOptions) => Promise<TrainImage>;
  private readonly shard: { rank: number; worldSize: number };
  /** Items this process reads per epoch (the dataset's length, or its shard's, padded, with several processes). */
  readonly epochLength: number;
  private seed: number;
  private epoch = 0;
  private position = 0;
  /** Epoch orders in use (the consumer's epoch and, when decoding runs ahead across the boundary, the next). */
  private orders = new Map<number, Uint32Array>();
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
    };
    this.loadImage = options.loadImage ?? loadTrainImage;
    this.shard = options.shard ?? { rank: 0, worldSize: 1 };
    const { rank, worldSize } = this.shard;
    if (!Number.isInteger(worldSize) || worldSize < 1 || !Number.isInteger(rank) || rank < 0 || rank >= worldSize) {
      throw new RangeError(`shard: rank must be an integer in [0, worldSize), got rank ${rank} of ${worldSize}`);
    }
    if (worldSize > 1 && this.opts.skipBroken) throw new Error('skipBroken is not supported with several processes (the shards would fall out of step)');
    // accelerate: ceil(ceil(n / B) / N) batches per process, all full
    this.epochLength = worldSize === 1 ? dataset.length : Math.ceil(Math.ceil(dataset.length / this.batchSize) / worldSize) * this.batchSize;
  }

  /**
   * The dataset index and global position of this process's `local`-th item of `epoch`: global batch k holds the N
   * processes' batches in rank order; positions past the dataset are the order's first items again (even batches).
   */
  private itemAt(epoch: number, local: number): { index: number; position: number } {
    const order = this.orderOf(epoch);
    if (this.shard.worldSize === 1) return { index: order[local]!, position: local };
    const B = this.batchSize;
    const W = this.shard.worldSize;
    const position = Math.floor(local / B) * W * B + this.shard.rank * B + (local % B);
    const n = this.dataset.length;
    return { index: order[position < n ? position : (position - n) % Math.min(n, W * B)]!, position };
  }

  /** Batches per epoch when nothing is skipped (ceil, the last batch may be partial). */
  get batchesPerEpoch(): number { return Math.ceil(this.epochLength / this.batchSize); }

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

  private orderOf(epoch: number): Uint32Array {
    let order = this.orders.get(epoch);
    if (order === undefined) {
      const n = this.dataset.length;
      if (this.opts.shuffle) order = permutation(n, deriveSeed(this.seed, epoch));
      else { order = new Uint32Array(n); for (let i = 0; i < n; i++) order[i] = i; }
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
    return { epoch, position, promise: gate.then(() => this.decode(item, rng, [epoch, at.position])), begin, started: false };
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

  private decode(item: DatasetItem, rng: Rng, key: [number, number]): Promise<Outcome> {
    const promise: Promise<Outcome> = this.loadImage(item.imagePath, {
      resolution: this.resolution,
      centerCrop: this.opts.centerCrop,
      randomFlip: this.opts.randomFlip,
      flipBeforeCrop: this.opts.flipBeforeCrop,
      interpolation: this.opts.interpolation,
      rng,
    }).then(
      (image): Outcome => {
        const caption = item.captions.length === 1 ? item.captions[0]! : item.captions[rng.nextInt(item.captions.length)]!;
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
    const R = this.resolution;
    const good: Decoded[] = [];
    let consecutiveFailures = 0;
    // Work on a cursor and commit (epoch, position, queue) only when the batch is complete, so a thrown
    // error leaves the loader where it was.
    let epoch = this.epoch;
    let position = this.position;
    let consumed = 0;
    const skippedHere: Failed[] = [];
    for (;;) {
      if (good.length === this.batchSize) break;
      if (position >= n) {
        if (good.length > 0) break; // last, partial batch of the epoch
        epoch += 1; position = 0;   // everything left in the epoch was broken: go on into the next one
      }
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
    const per = 3 * R * R;
    // images given without pixels (loadImage of --cache_latents): no pixel buffer
    const pixelValues = new Float32Array(good.some((g) => g.image.data.length > 0) ? B * per : 0);
    if (pixelValues.length > 0) good.forEach((g, i) => pixelValues.set(g.image.data, i * per));
    return {
      pixelValues,
      shape: [B, 3, R, R],
      captions: good.map((g) => g.caption),
      imagePaths: good.map((g) => g.imagePath),
      cropTopLeft: good.map((g) => g.image.cropTopLeft),
      originalSizes: good.map((g) => g.image.originalSize),
      keys: good.map((g) => g.key),
      flipped: good.map((g) => g.image.flipped),
    };
  }
}
