// The basic layers, with PyTorch's parameter names and default initialisation
// (kaiming_uniform(a=√5) for weights: U(-1/√fan_in, 1/√fan_in), the same bound for biases).
import * as F from '../functional.js';
import * as torch from '../torch.js';
import type { Tensor } from '../tensor.js';
import type { TensorOptions } from '../torch.js';
import { Module, parameter } from './module.js';

type Init = Pick<TensorOptions, 'dtype' | 'device'>;

function uniformParam(shape: number[], bound: number, o: Init): Tensor {
  return parameter(torch.empty(shape, o).uniform_(-bound, bound));
}

export class Linear extends Module {
  weight: Tensor;
  bias: Tensor | null;

  constructor(readonly inFeatures: number, readonly outFeatures: number, bias = true, o: Init = {}) {
    super();
    const bound = 1 / Math.sqrt(inFeatures);
    this.weight = uniformParam([outFeatures, inFeatures], bound, o);
    this.bias = bias ? uniformParam([outFeatures], bound, o) : null;
  }

  forward(x: Tensor): Tensor { return F.linear(x, this.weight, this.bias); }
}

export interface Conv2dOptions extends Init { stride?: number; padding?: number; dilation?: number; groups?: number; bias?: boolean }

export class Conv2d extends Module {
  weight: Tensor;
  bias: Tensor | null;
  readonly stride: number;
  readonly padding: number;
  readonly dilation: number;
  readonly groups: number;

  constructor(readonly inChannels: number, readonly outChannels: number, readonly kernelSize: number, o: Conv2dOptions = {}) {
    super();
    this.stride = o.stride ?? 1;
    this.padding = o.padding ?? 0;
    this.dilation = o.dilation ?? 1;
    this.groups = o.groups ?? 1;
    const fanIn = (inChannels / this.groups) * kernelSize * kernelSize;
    const bound = 1 / Math.sqrt(fanIn);
    this.weight = uniformParam([outChannels, inChannels / this.groups, kernelSize, kernelSize], bound, o);
    this.bias = o.bias ?? true ? uniformParam([outChannels], bound, o) : null;
  }

  forward(x: Tensor): Tensor {
    return F.conv2d(x, this.weight, this.bias, { stride: this.stride, padding: this.padding, dilation: this.dilation, groups: this.groups });
  }
}

export class GroupNorm extends Module {
  weight: Tensor | null;
  bias: Tensor | null;

  constructor(readonly numGroups: number, readonly numChannels: number, readonly eps = 1e-5, affine = true, o: Init = {}) {
    super();
    if (numChannels % numGroups !== 0) throw new RangeError(`GroupNorm: num_channels (${numChannels}) must be divisible by num_groups (${numGroups})`);
    this.weight = affine ? parameter(torch.ones([numChannels], o)) : null;
    this.bias = affine ? parameter(torch.zeros([numChannels], o)) : null;
  }

  forward(x: Tensor): Tensor { return F.groupNorm(x, this.numGroups, this.weight, this.bias, this.eps); }

  /** silu(forward(x)) as one operator (F.groupNormSilu): the norm + activation pair of resnets and output heads. */
  forwardSilu(x: Tensor): Tensor { return F.groupNormSilu(x, this.numGroups, this.weight, this.bias, this.eps); }
}

export class LayerNorm extends Module {
  weight: Tensor | null;
  bias: Tensor | null;
  readonly normalizedShape: number[];

  constructor(normalizedShape: number | number[], readonly eps = 1e-5, elementwiseAffine = true, o: Init = {}) {
    super();
    this.normalizedShape = typeof normalizedShape === 'number' ? [normalizedShape] : normalizedShape;
    this.weight = elementwiseAffine ? parameter(torch.ones(this.normalizedShape, o)) : null;
    this.bias = elementwiseAffine ? parameter(torch.zeros(this.normalizedShape, o)) : null;
  }

  forward(x: Tensor): Tensor { return F.layerNorm(x, this.normalizedShape, this.weight, this.bias, this.eps); }
}

export class Embedding extends Module {
  weight: Tensor;

  constructor(readonly numEmbeddings: number, readonly embeddingDim: number, o: Init = {}) {
    super();
    this.weight = parameter(torch.randn([numEmbeddings, embeddingDim], o));
  }

  forward(indices: Tensor): Tensor { return F.embedding(indices, this.weight); }
}

export class Dropout extends Module {
  constructor(readonly p = 0.5) {
    super();
  }

  forward(x: Tensor): Tensor {
    // p = 0 or eval mode: the input itself, as nn.Dropout (no copy, no random draw).
    if (!this.training || this.p === 0) return x;
    return F.dropout(x, this.p, true);
  }
}
