// Per-sample randomness: every random draw of one training sample (the VAE posterior's ε, the noise, the offset
// noise, the timestep) comes from a generator of its own, seeded by the run's seed and the sample's place in the
// data — (epoch, position in the epoch's shuffled order) — as the loader already seeds its crop, flip and caption
// choice. A sample's draws are then the same whichever batch or process it lands in, so 2 processes × batch 1 train
// the same LoRA as 1 process × batch 2 (accelerate draws from each process's own generator; this goes beyond it).
//
// The streams differ from the loader's (a salt in the seed), and draw on the CPU (moved to the training device), as
// diffusers' randn_tensor with a CPU generator: the same numbers on any device.
import { deriveSeed } from '../data/transforms.js';
import { Generator } from '../random.js';

/** Where a sample sits in the data: its epoch and its position in that epoch's (global, unsharded) order. */
export type SampleKey = readonly [epoch: number, position: number];

/** Salt for the training-noise streams ('nois'), so they never coincide with the loader's crop/flip streams. */
const NOISE_SALT = 0x6e6f6973;

/** Seeds of a run's per-sample streams; one generator per batch slot, reseeded for each batch. */
export class SampleStreams {
  readonly #pool: Generator[] = [];

  /** `seed`: --seed, or (unseeded) a seed chosen once per run and kept in its checkpoints. */
  constructor(readonly seed: number) {
    if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`SampleStreams: seed must be a whole number ≥ 0, got ${seed}`);
  }

  /** The seed of one sample's stream. */
  seedOf([epoch, position]: SampleKey): number {
    return deriveSeed(this.seed, epoch, position, NOISE_SALT);
  }

  /**
   * One CPU generator per item of a batch, each seeded from its sample's key. The generators are reused by the next
   * call: draw from them before asking for the next batch's.
   */
  forBatch(keys: readonly SampleKey[]): Generator[] {
    while (this.#pool.length < keys.length) this.#pool.push(new Generator('cpu'));
    return keys.map((key, i) => this.#pool[i]!.manualSeed(this.seedOf(key)));
  }
}
