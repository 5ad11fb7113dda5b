// trainLoop (lib/training/loop.ts): the epochs-and-steps skeleton every trainer shares, driven here by
// fake parts — no model, so what it does is visible: the window's mean loss at each optimizer step, the
// epoch ends, where it stops, and a non-finite loss or an abort stopping it.
import { describe, expect, it } from 'vitest';
import { trainLoop, type OptimizerStepEvent, type PipelinedStep, type SettledStep, type TrainLoopParts } from '../lib/training/loop.js';

/** Batches carry their loss; `perEpoch` of them per epoch; accumulation as given. */
function fake(o: { perEpoch: number; accumulation: number; maxTrainSteps: number; numTrainEpochs: number; losses?: (i: number) => number }) {
  let global = 0;
  let micro = 0;
  let position = 0;
  let drawn = 0;
  const log: string[] = [];
  const steps: OptimizerStepEvent[] = [];
  const parts: TrainLoopParts<{ loss: number }> = {
    maxTrainSteps: o.maxTrainSteps, numTrainEpochs: o.numTrainEpochs, startEpoch: 0, accumulationSteps: o.accumulation,
    globalStep: () => global,
    nextBatch: async () => (position < o.perEpoch ? (position++, { loss: (o.losses ?? ((i) => i + 1))(drawn++) }) : null),
    microStep: (b) => b.loss,
    afterBackward: () => {
      if (++micro < o.accumulation) return null;
      micro = 0;
      global++;
      return { lr: 0.1, gradNorm: 1, stepped: true };
    },
    onOptimizerStep: (e) => { steps.push(e); },
    onEpochEnd: async (epoch) => { log.push(`end ${epoch}`); },
    nextEpoch: () => { position = 0; log.push('next'); },
    failureContext: () => '; the last checkpoint is c',
  };
  return { parts, log, steps };
}

describe('trainLoop', () => {
  it('gives each optimizer step the window mean and the last micro-batch loss, and ends epochs as the script', async () => {
    const f = fake({ perEpoch: 4, accumulation: 2, maxTrainSteps: 3, numTrainEpochs: 2 });
    const r = await trainLoop(f.parts);
    expect(f.steps.map((s) => [s.step, s.epoch, s.loss, s.stepLoss])).toEqual([[1, 0, 1.5, 2], [2, 0, 3.5, 4], [3, 1, 5.5, 6]]);
    expect(f.log).toEqual(['end 0', 'next', 'end 1']); // no nextEpoch after the last step
    expect(r).toEqual({ lastEpoch: 1, lastLoss: 6 });
  });

  it('a non-finite loss stops the run naming the step, the epoch and where to resume from', async () => {
    const f = fake({ perEpoch: 4, accumulation: 1, maxTrainSteps: 4, numTrainEpochs: 1, losses: (i) => (i === 2 ? NaN : 1) });
    await expect(trainLoop(f.parts)).rejects.toThrow('loss is NaN at step 3 (epoch 0); nothing more was saved; the last checkpoint is c');
    expect(f.steps).toHaveLength(2);
  });

  it('stops between steps when its signal aborts', async () => {
    const f = fake({ perEpoch: 4, accumulation: 1, maxTrainSteps: 4, numTrainEpochs: 1 });
    const controller = new AbortController();
    const parts = { ...f.parts, signal: controller.signal, onOptimizerStep: (e: OptimizerStepEvent) => { f.steps.push(e); if (e.step === 2) controller.abort(); } };
    await expect(trainLoop(parts)).rejects.toThrow('training aborted');
    expect(f.steps).toHaveLength(2);
  });

  it('a resumed run starts at its epoch; one with every step done runs nothing', async () => {
    const f = fake({ perEpoch: 2, accumulation: 1, maxTrainSteps: 2, numTrainEpochs: 3 });
    expect(await trainLoop({ ...f.parts, startEpoch: 2, globalStep: () => 2 })).toEqual({ lastEpoch: 2, lastLoss: NaN });
    expect(f.log).toEqual([]);
  });

  describe('pipelined (--cuda_graphs): each whole step launched before the last one is read', () => {
    /** fake()'s parts with a pipelined step that logs launches and reads; `global` counts the steps read. */
    function pipelined(o: Parameters<typeof fake>[0] & { settleAfter?: (step: number) => boolean }) {
      const f = fake(o);
      let global = 0;
      let inFlight: { loss: number } | null = null;
      const read = (): SettledStep | null => {
        if (!inFlight) return null;
        const b = inFlight;
        inFlight = null;
        global++;
        f.log.push(`read ${global}`);
        return { loss: b.loss, outcome: { lr: 0.1, gradNorm: 1, stepped: true } };
      };
      const pipe: PipelinedStep<{ loss: number }> = {
        launch: (b) => { const previous = read(); inFlight = b; f.log.push(`launch ${global + 1}`); return previous; },
        settle: read,
      };
      const parts: TrainLoopParts<{ loss: number }> = {
        ...f.parts, globalStep: () => global, pipelined: pipe, settleAfter: o.settleAfter,
        microStep: () => { throw new Error('not called when pipelined'); },
        afterBackward: () => { throw new Error('not called when pipelined'); },
        nextBatch: async (epoch, step) => { f.log.push(`batch ${step}`); return f.parts.nextBatch(epoch, step); },
        onOptimizerStep: (e) => { f.steps.push(e); f.log.push(`step ${e.step}`); },
      };
      return { ...f, parts };
    }

    it("loads batch k+1 and launches it before step k is logged; nothing is in flight at an epoch's end or after a step settleAfter names", async () => {
      const f = pipelined({ perEpoch: 3, accumulation: 1, maxTrainSteps: 5, numTrainEpochs: 2, settleAfter: (s) => s === 2 });
      const r = await trainLoop(f.parts);
      expect(f.steps.map((s) => [s.step, s.epoch, s.loss, s.stepLoss])).toEqual([[1, 0, 1, 1], [2, 0, 2, 2], [3, 0, 3, 3], [4, 1, 4, 4], [5, 1, 5, 5]]);
      expect(f.log).toEqual([
        'batch 1', 'launch 1', 'batch 2', 'read 1', 'launch 2', 'step 1', 'read 2', 'step 2', // step 2 read at once (a checkpoint's)
        'batch 3', 'launch 3', 'batch 4', 'read 3', 'step 3', 'end 0', 'next', // the epoch's end: step 3 read before it
        'batch 4', 'launch 4', 'batch 5', 'read 4', 'launch 5', 'step 4', 'read 5', 'step 5', 'end 1', // the last step read at the end
      ]);
      expect(r).toEqual({ lastEpoch: 1, lastLoss: 5 });
    });

    it('a non-finite loss read a step late stops the run naming its own step', async () => {
      const f = pipelined({ perEpoch: 5, accumulation: 1, maxTrainSteps: 5, numTrainEpochs: 1, losses: (i) => (i === 2 ? Infinity : 1) });
      await expect(trainLoop(f.parts)).rejects.toThrow('loss is Infinity at step 3 (epoch 0); nothing more was saved; the last checkpoint is c');
      expect(f.steps.map((s) => s.step)).toEqual([1, 2]);
    });

    it('needs one micro-batch per optimizer step', async () => {
      const f = pipelined({ perEpoch: 2, accumulation: 2, maxTrainSteps: 1, numTrainEpochs: 1 });
      await expect(trainLoop(f.parts)).rejects.toThrow(/a pipelined step is a whole optimizer step, not 2 micro-batches/);
    });
  });
});
