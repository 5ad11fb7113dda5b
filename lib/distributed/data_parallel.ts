// Data-parallel training as accelerate (0.34) runs train_text_to_image_lora.py on several processes, over a
// ProcessGroup (process_group.ts). What the training loop calls, at these points:
//   join                     the group from the environment (difflora launch, torchrun, srun) or the caller's;
//                            a single process gets the same object with nothing to do
//   shard                    this process's share of each epoch (train_data.ts → loader.ts's BatchSamplerShard)
//   broadcastParameters      the LoRA as rank 0 initialised it, on every rank, before the first step
//   agreeSampleSeed          one seed of the per-sample streams for all ranks (sample_rng.ts), rank 0's
//   reduceGradients          once per optimizer step, before unscaling and clipping: every gradient averaged
//                            over the processes (DDP's bucketed all-reduce; never on accumulation micro-steps)
//   meanOverProcesses        the logged losses: accelerator.gather(loss).mean()
//   gatherCheckpoint         every rank's data position and generator states, for rank 0 to save
//   finish                   a barrier after the loop, so rank 0 (the store's host) outlives the others' collectives
// Only rank 0 (isMain) logs, validates and writes files.
import { randomInt } from 'node:crypto';
import { elementSize } from '../dtype.js';
import type { Generator } from '../random.js';
import { dispose } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { ParallelCheckpoint, TrainingState } from '../training/checkpoint.js';
import { TrainOptionsError } from '../training/options.js';
import { DEFAULT_TIMEOUT_MS, distributedEnv, initProcessGroupFromEnv, type ProcessGroup } from './process_group.js';

/** The collective timeout of a validating training run when the environment gives none (torch.distributed's default, 30 min). */
export const TRAIN_TIMEOUT_MS = 30 * 60 * 1000;

/** DDP's default bucket size (torch.nn.parallel.DistributedDataParallel's bucket_cap_mb = 25). */
export const DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024;

/**
 * How a run finds its processes: undefined joins the group a launcher described in the environment (a single process
 * when there is none); null trains alone whatever the environment says; a ProcessGroup is used as it is (the caller
 * keeps it and destroys it).
 */
export type ProcessGroupOption = ProcessGroup | null | undefined;

/** Time spent waiting in collectives (the training step's communication), for the end-of-run report and benchmarks. */
export interface CollectiveStats {
  /** Optimizer steps whose gradients were all-reduced. */
  steps: number;
  /** Milliseconds from issuing the gradient and loss all-reduces to their completion, summed over the steps. */
  stepMs: number;
  /** Bytes of gradients all-reduced per optimizer step. */
  bytesPerStep: number;
}

/** Splits `tensors` in order into runs of one dtype and at most `capBytes` each (a tensor larger than that is a bucket alone). */
export function gradientBuckets(tensors: readonly Tensor[], capBytes = DEFAULT_BUCKET_BYTES): Tensor[][] {
  const buckets: Tensor[][] = [];
  let current: Tensor[] = [];
  let bytes = 0;
  for (const t of tensors) {
    const size = t.numel() * elementSize(t.dtype);
    if (current.length > 0 && (bytes + size > capBytes || current[0]!.dtype !== t.dtype)) {
      buckets.push(current);
      current = [];
      bytes = 0;
    }
    current.push(t);
    bytes += size;
  }
  if (current.length > 0) buckets.push(current);
  return buckets;
}

export class DataParallel {
  readonly rank: number;
  readonly worldSize: number;
  readonly stats: CollectiveStats = { steps: 0, stepMs: 0, bytesPerStep: 0 };

  private constructor(readonly group: ProcessGroup | null, private readonly owned: boolean, readonly bucketBytes = DEFAULT_BUCKET_BYTES) {
    this.rank = group?.rank ?? 0;
    this.worldSize = group?.worldSize ?? 1;
  }

  /** A single process: every collective is the identity. */
  static single(): DataParallel {
    return new DataParallel(null, false);
  }

  /**
   * The run's processes (ProcessGroupOption). `fingerprint` describes the run's options: ranks started differently
   * fail to join, naming both.
   */
  static async join(option: ProcessGroupOption, fingerprint: string, validates = true): Promise<DataParallel> {
    if (option === null) return DataParallel.single();
    if (option !== undefined) return new DataParallel(option.worldSize > 1 ? option : null, false);
    // without DIFFLORA_DIST_TIMEOUT (torchrun, srun): accelerate's 30 minutes when the others will wait while rank 0
    // validates, else the 60 s default (a hung process is noticed within a minute)
    const timeoutMs = process.env.DIFFLORA_DIST_TIMEOUT ? undefined : validates ? TRAIN_TIMEOUT_MS : DEFAULT_TIMEOUT_MS;
    const group = await initProcessGroupFromEnv({ fingerprint, timeoutMs });
    return group === null ? DataParallel.single() : new DataParallel(group, true);
  }

  /**
   * The processes of a training run with resolved options `o` (their JSON is the fingerprint: ranks started with
   * other options fail to join). --skip_broken_images is refused with several processes: a skipped image would
   * shorten one shard's epoch and the processes would fall out of step.
   */
  static async forTraining(o: { skipBrokenImages?: boolean; validationPrompt?: string | null }, option: ProcessGroupOption): Promise<DataParallel> {
    const dp = await DataParallel.join(option, JSON.stringify(o), (o.validationPrompt ?? null) !== null);
    if (dp.worldSize > 1 && o.skipBrokenImages) {
      dp.close();
      throw new TrainOptionsError([`--skip_broken_images is not supported with several processes (${dp.worldSize}): a skipped image would put the processes out of step; fix or remove the image, or train in one process`]);
    }
    return dp;
  }

  /**
   * A single process for `command`, which trains in one process only: a caller's group or a launcher's environment of
   * several processes is refused (TrainOptionsError) before anything is joined or created.
   */
  static alone(command: string, option: ProcessGroupOption): DataParallel {
    const processes = option === null ? 1 : (option?.worldSize ?? distributedEnv()?.worldSize ?? 1);
    if (processes > 1) {
      throw new TrainOptionsError([`${command} trains in one process only, not on several (${processes}): run it without difflora launch (or another launcher), or with --num_processes 1`]);
    }
    return DataParallel.single();
  }

  /** The device of this rank's tensors when the group decides it (nccl: cuda:LOCAL_RANK); undefined for gloo. */
  get device(): string | undefined {
    return this.group?.backend === 'nccl' ? this.group.device : undefined;
  }

  /** Rank 0: the process that logs, validates and writes files. */
  get isMain(): boolean {
    return this.rank === 0;
  }

  /** This process's share of each epoch, or undefined for a single process. */
  get shard(): { rank: number; worldSize: number } | undefined {
    return this.group === null ? undefined : { rank: this.rank, worldSize: this.worldSize };
  }

  /** Every rank's `params` set to rank 0's (the LoRA as rank 0 initialised it; unseeded ranks differ). */
  async broadcastParameters(params: readonly Tensor[]): Promise<void> {
    if (this.group === null || params.length === 0) return;
    await this.group.broadcast(params, 0).wait();
  }

  /** The seed of the per-sample streams: --seed, or (unseeded) one rank 0 draws, the same on every rank. */
  async agreeSampleSeed(seed: number | null): Promise<number> {
    const mine = seed ?? randomInt(2 ** 31);
    if (this.group === null) return mine;
    const all = await this.group.allGather([mine]);
    return all[0]?.[0] ?? mine;
  }

  /**
   * Averages the gradients of `params` over the processes, in place: buckets of at most bucketBytes, each all-reduced
   * as soon as it is issued (they travel while the next is flattened), then all awaited. Call once per optimizer
   * step, before unscaling and clipping.
   */
  async reduceGradients(params: readonly Tensor[]): Promise<void> {
    if (this.group === null) return;
    const group = this.group;
    const grads: Tensor[] = [];
    const staged: [Tensor, Tensor][] = [];
    try {
      for (const p of params) {
        const g = p.grad;
        if (g === null) throw new Error(`reduceGradients: a LoRA parameter (${p.shape.join('×')}) has no gradient on ${group.where}; every rank must use every parameter`);
        grads.push(g);
      }
      // a gloo group reduces CPU tensors: CUDA gradients travel through host copies
      const onWire = grads.map((g) => {
        if (group.backend !== 'gloo' || g.device === 'cpu') return g;
        const host = g.cpu();
        staged.push([g, host]);
        return host;
      });
      const started = performance.now();
      const buckets = gradientBuckets(onWire, this.bucketBytes);
      const works = buckets.map((b) => group.allReduce(b, 'avg'));
      await Promise.all(works.map((w) => w.wait()));
      this.stats.stepMs += performance.now() - started;
      this.stats.steps += 1;
      this.stats.bytesPerStep = onWire.reduce((s, g) => s + g.numel() * elementSize(g.dtype), 0);
      for (const [g, host] of staged) g.copy_(host);
    } finally {
      dispose([...grads, ...staged.map(([, h]) => h)]);
    }
  }

  /** The mean over the processes of each of `values` (accelerator.gather(loss).mean()): the logged losses. */
  async meanOverProcesses(values: readonly number[]): Promise<number[]> {
    if (this.group === null) return [...values];
    const started = performance.now();
    // one all-reduce of a small fp64 buffer (an allGather would take two round trips: lengths, then values)
    const t = torch.tensor(Float64Array.from(values), { device: this.group.device });
    try {
      await this.group.allReduce(t, 'avg').wait();
      this.stats.stepMs += performance.now() - started;
      const host = t.device === 'cpu' ? t : t.cpu();
      try { return Array.from(host.toFloat64Array()); } finally { if (host !== t) host.dispose(); }
    } finally {
      t.dispose();
    }
  }

  /**
   * Every rank's data position and generator states, for rank 0's checkpoint (a collective: every rank calls it at
   * the same step). Rank 0 gets the other ranks' records (it owns their tensors, which saveTrainingCheckpoint takes);
   * the others get undefined.
   */
  async gatherCheckpoint(data: TrainingState['data'], generators: readonly Generator[], sampleSeed: number): Promise<ParallelCheckpoint | undefined> {
    if (this.group === null) return { sampleSeed, others: [] };
    const states = generators.map((g) => g.getState());
    try {
      const numbers = [data.epoch, data.loader.epoch, data.loader.position, data.loader.seed, ...states.map((s) => s.numel())];
      for (const s of states) numbers.push(...(s.dataSync() as Uint8Array));
      const all = await this.group.allGather(numbers);
      if (!this.isMain) return undefined;
      const others = all.slice(1).map((row, k) => {
        const [epoch, loaderEpoch, position, seed] = row as [number, number, number, number];
        let at = 4 + states.length;
        const rng = states.map((mine, i) => {
          const n = row[4 + i] ?? 0;
          if (n !== mine.numel()) throw new Error(`rank ${k + 1}'s generator ${i} state has ${n} bytes, rank 0's ${mine.numel()}`);
          const bytes = Uint8Array.from(row.slice(at, at + n));
          at += n;
          return torch.tensor(bytes, { shape: mine.shape });
        });
        return { data: { epoch, loader: { epoch: loaderEpoch, position, seed } }, rng };
      });
      return { sampleSeed, others };
    } finally {
      dispose(states);
    }
  }

  /** After the loop: every rank waits here, so rank 0 (the rendezvous host) is last to leave the collectives. */
  async finish(): Promise<void> {
    if (this.group !== null) await this.group.barrier();
  }

  /** Releases the group when this object joined it (not a caller's). Idempotent. */
  close(): void {
    if (this.owned) this.group?.destroy();
  }

  /** The script's "Running training" numbers with several processes, for rank 0 to print at the start (null for one). */
  describeRun(o: { trainBatchSize: number; gradientAccumulationSteps: number }, steps: { maxTrainSteps: number; numTrainEpochs: number; updateStepsPerEpoch: number }): string | null {
    if (this.group === null) return null;
    return `data-parallel: ${this.worldSize} processes (${this.group.backend}); batch size per process ${o.trainBatchSize}, total train batch size ` +
      `(w. parallel, distributed & accumulation) ${o.trainBatchSize * this.worldSize * o.gradientAccumulationSteps}; ` +
      `${steps.maxTrainSteps} optimization steps, ${steps.updateStepsPerEpoch} per epoch, ${steps.numTrainEpochs} epochs`;
  }

  /** One line about the collectives, for rank 0 to print at the end. */
  report(): string | null {
    if (this.group === null || this.stats.steps === 0) return null;
    const ms = this.stats.stepMs / this.stats.steps;
    return `data-parallel: ${this.worldSize} processes (${this.group.backend}), ${this.stats.steps} optimizer steps, ` +
      `${ms.toFixed(1)} ms per step waiting in collectives (gradient all-reduce of ${this.stats.bytesPerStep} bytes + loss mean)`;
  }
}
