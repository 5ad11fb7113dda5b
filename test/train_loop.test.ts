// trainLoop (lib/training/loop.ts): the epochs-and-steps skeleton every trainer shares, driven here by
// fake parts — no model, so what it does is visible: the window's mean loss at each optimizer step, the
// epoch ends, where it stops, and a non-finite loss or an abort stopping it.
import { describe, expect, it } from 'vitest';
import { trainLoop, type OptimizerStepEvent, type TrainLoopParts } from '../lib/training/loop.js';

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
});
