// CUDA graphs (native/graph.cc): work recorded once on a side stream and replayed with one launch, the host out of
// the loop. Whatever the recorded work read and wrote (its static inputs and outputs) must stay alive and in place
// while the graph is replayed: the caller copies new inputs into the same tensors before each replay.
import { native } from './native.js';
import { keep } from './scope.js';
import type { Tensor } from './tensor.js';

/**
 * A recorded piece of work. The training step's driver (training/graphed_step.ts) uses this interface, so its control
 * flow can be tested without a GPU against a stand-in that runs the captured function again on each replay.
 */
export interface StepGraph {
  /** Runs fn now on the graph's stream (the warm-up steps before the capture, as PyTorch's documentation asks). */
  run<T>(fn: () => T): T;
  /** Records fn on the graph's stream: nothing runs until replay(). A throw ends the recording and leaves no graph. */
  capture(fn: () => void): void;
  /** Runs the recorded work with the static tensors' current contents. */
  replay(): void;
  dispose(): void;
}

/** The CUDA device index of 'cuda' / 'cuda:N'. */
function cudaIndex(device: string): number {
  const m = /^cuda(?::(\d+))?$/.exec(device);
  if (!m) throw new Error(`CUDA graphs need a CUDA device, not '${device}'`);
  return m[1] === undefined ? 0 : Number(m[1]);
}

export class CudaGraph implements StepGraph {
  private id: number | null;
  private captured = false;

  constructor(device: string) {
    this.id = native.cudaGraphNew(cudaIndex(device));
  }

  private get handle(): number {
    if (this.id === null) throw new Error('CudaGraph: disposed');
    return this.id;
  }

  run<T>(fn: () => T): T {
    native.cudaGraphEnter(this.handle);
    try { return fn(); } finally { native.cudaGraphExit(this.handle); }
  }

  capture(fn: () => void): void {
    if (this.captured) throw new Error('CudaGraph: already captured');
    const id = this.handle;
    native.cudaGraphEnter(id);
    try {
      native.cudaGraphCaptureBegin(id);
      fn();
      native.cudaGraphCaptureEnd(id);
      this.captured = true;
    } catch (e) {
      this.dispose(); // ends an open capture and frees its pool
      throw e;
    } finally {
      if (this.id !== null) native.cudaGraphExit(id);
    }
  }

  replay(): void {
    native.cudaGraphReplay(this.handle);
  }

  dispose(): void {
    if (this.id === null) return;
    native.cudaGraphRelease(this.id);
    this.id = null;
  }
}

/** Makes the graphs --cuda_graphs records (a CudaGraph); tests and CPU dry runs put a stand-in here, then restore it. */
export const graphFactory: { make: (device: string) => StepGraph } = { make: (device) => new CudaGraph(device) };

export interface GraphedCallOptions {
  device: string;
  /** Calls run eagerly (on the graph's stream) before the one recorded (default 1). */
  warmup?: number;
  /** Told once why the calls run eagerly from now on (no graph could be made, or the capture failed). */
  onFallback?: (why: string) => void;
}

/**
 * A function of tensors recorded in a CUDA graph and replayed (the UNet call of a denoising loop): each call copies
 * its inputs into static tensors made at the first call, the first `warmup` calls run eagerly, the next is recorded
 * and every later one replays it; the result is a copy of the graph's output (the caller owns it). Inputs of another
 * shape or dtype than the first call's run eagerly. No host sync of its own.
 */
export class GraphedCall {
  private statics: Tensor[] | null = null;
  private signature = '';
  private graph: StepGraph | null = null;
  private output: Tensor | null = null;
  private calls = 0;
  private broken = false;

  constructor(private readonly fn: (inputs: Tensor[]) => Tensor, private readonly o: GraphedCallOptions) {}

  call(inputs: Tensor[]): Tensor {
    const signature = inputs.map((t) => `${t.dtype}[${t.shape.join('×')}]@${t.device}`).join(' ');
    if (!this.statics) {
      this.statics = inputs.map((t) => keep(t.clone()));
      this.signature = signature;
    }
    if (this.broken || signature !== this.signature) return this.fn(inputs);
    this.statics.forEach((s, i) => s.copy_(inputs[i]!));
    const statics = this.statics;
    try {
      this.graph ??= graphFactory.make(this.o.device);
    } catch (e) {
      return this.fallBack(e, 'no graph could be made', inputs);
    }
    const graph = this.graph;
    if (this.calls++ < (this.o.warmup ?? 1)) return graph.run(() => this.fn(statics));
    if (!this.output) {
      try {
        // a CUDA graph runs this once, at the capture (the kernels are recorded, the output allocated); a stand-in that
        // reruns it on every replay writes each new result into the same output
        graph.capture(() => this.record(this.fn(statics)));
      } catch (e) {
        this.graph = null; // the graph disposed itself
        (this.output as Tensor | null)?.dispose();
        this.output = null;
        return this.fallBack(e, 'the call could not be captured', inputs);
      }
    }
    graph.replay();
    return this.output!.clone();
  }

  private record(result: Tensor): void {
    if (!this.output) {
      this.output = keep(result);
      return;
    }
    this.output.copy_(result);
    result.dispose();
  }

  private fallBack(e: unknown, what: string, inputs: Tensor[]): Tensor {
    this.broken = true;
    this.o.onFallback?.(`${what} (${(e as Error).message.split('\n')[0]})`);
    return this.fn(inputs);
  }

  dispose(): void {
    this.graph?.dispose();
    this.graph = null;
    this.output?.dispose();
    this.output = null;
    for (const t of this.statics ?? []) t.dispose();
    this.statics = null;
  }
}
