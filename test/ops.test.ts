// Tensor ops against PyTorch 1.13.1's own numbers (test/fixtures/ops_reference.json, written by
// scripts/make-op-reference.py with the inputs inside it), plus the behaviour of the TS tensor API:
// error messages, disposal, argument checking, construction from JS data and reading back.
import { afterAll, describe, expect, it } from 'vitest';
import { dispose, tidy } from '../lib/scope.js';
import { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import * as F from '../lib/functional.js';
import { Generator, manualSeed } from '../lib/random.js';
import { expectMatches, fromRef, loadInputs, reference } from './reference.js';

type Inputs = Record<string, Tensor>;
type Fn = (i: Inputs) => Tensor | Tensor[];

// Tolerances on ‖ours − ref‖/‖ref‖. Integer and bool results are always compared bit for bit.
const EXACT = 0; // bit-identical: creation, data movement, casts, random generators
const EW = 1e-6; // float32 elementwise ops and reductions
const MM = 1e-5; // matmul/conv-like ops (BLAS and oneDNN blocking may differ in summation order)

const seeded = (seed: number | bigint): Generator => new Generator().manualSeed(seed);

const table: Record<string, [number, Fn]> = {
  // ---- creation
  zeros: [EXACT, () => torch.zeros([2, 3])],
  ones_int64: [EXACT, () => torch.ones([2, 2], { dtype: 'int64' })],
  full: [EXACT, () => torch.full([2, 3], 1.5)],
  full_int32: [EXACT, () => torch.full([2], 7, { dtype: 'int32' })],
  arange_end: [EXACT, () => torch.arange(5)],
  arange_start_step: [EXACT, () => torch.arange(2, 11, 3)],
  arange_float_step: [EXACT, () => torch.arange(0, 1, 0.1)],
  arange_negative_step: [EXACT, () => torch.arange(1.5, -1, -0.5)],
  arange_float64: [EXACT, () => torch.arange(0, 3, 1, { dtype: 'float64' })],
  linspace: [EXACT, () => torch.linspace(-1, 1, 7)],
  linspace_float64: [EXACT, () => torch.linspace(0, 1, 5, { dtype: 'float64' })],
  zeros_like_int32: [EXACT, (i) => torch.zerosLike(i.a!, { dtype: 'int32' })],
  ones_like: [EXACT, (i) => torch.onesLike(i.x4!)],

  // ---- elementwise
  add: [EW, (i) => i.a!.add(i.b!)],
  add_alpha: [EW, (i) => i.a!.add(i.b!, 2.5)],
  add_scalar_int: [EW, (i) => i.a!.add(2)],
  add_scalar_float: [EW, (i) => i.a!.add(0.75)],
  add_broadcast_row: [EW, (i) => i.a!.add(i.row!)],
  add_broadcast_outer: [EW, (i) => i.col!.add(i.row!)],
  sub: [EW, (i) => i.a!.sub(i.b!)],
  sub_alpha: [EW, (i) => i.a!.sub(i.b!, 0.5)],
  sub_broadcast: [EW, (i) => i.a!.sub(i.col!)],
  sub_scalar: [EW, (i) => i.a!.sub(1.5)],
  mul: [EW, (i) => i.a!.mul(i.b!)],
  mul_broadcast: [EW, (i) => i.a!.mul(i.row!)],
  mul_scalar: [EW, (i) => i.a!.mul(-3)],
  div: [EW, (i) => i.a!.div(i.pos!)],
  div_scalar: [EW, (i) => i.a!.div(3)],
  div_broadcast: [EW, (i) => i.a!.div(i.pos_row!)],
  div_trunc_scalar: [EW, (i) => i.a!.div(0.3, 'trunc')],
  div_floor_scalar: [EW, (i) => i.a!.div(0.3, 'floor')],
  div_floor_tensor: [EW, (i) => i.a!.div(i.b!, 'floor')],
  div_floor_int_by_float: [EW, (i) => i.i64!.div(2.5, 'floor')],
  div_trunc_int: [EXACT, (i) => i.i64!.div(2, 'trunc')],
  div_int_true: [EW, (i) => i.i64!.div(2)],
  pow_2: [EW, (i) => i.a!.pow(2)],
  pow_3: [EW, (i) => i.a!.pow(3)],
  pow_half: [EW, (i) => i.pos!.pow(0.5)],
  pow_neg: [EW, (i) => i.pos!.pow(-1.5)],
  pow_tensor: [EW, (i) => i.pos!.pow(i.b!)],
  exp: [EW, (i) => i.a!.exp()],
  log: [EW, (i) => i.pos!.log()],
  sqrt: [EW, (i) => i.pos!.sqrt()],
  rsqrt: [EW, (i) => i.pos!.rsqrt()],
  abs: [EW, (i) => i.a!.abs()],
  neg: [EW, (i) => i.a!.neg()],
  tanh: [EW, (i) => i.a!.tanh()],
  sigmoid: [EW, (i) => i.a!.sigmoid()],
  relu: [EW, (i) => i.a!.relu()],
  silu: [EW, (i) => F.silu(i.a!)],
  gelu: [EW, (i) => F.gelu(i.a!)],
  gelu_tanh: [EW, (i) => F.gelu(i.a!, 'tanh')],
  reciprocal: [EW, (i) => i.pos!.reciprocal()],
  square: [EW, (i) => i.a!.square()],
  floor: [EXACT, (i) => i.wide!.floor()],
  round: [EXACT, (i) => i.wide!.round()],
  sign: [EXACT, (i) => i.ints!.sign()],
  erf: [EW, (i) => i.a!.erf()],
  sin: [EW, (i) => i.a!.sin()],
  cos: [EW, (i) => i.a!.cos()],
  clamp: [EXACT, (i) => i.a!.clamp(-0.5, 0.5)],
  clamp_min: [EXACT, (i) => i.a!.clamp(0.1)],
  clamp_max: [EXACT, (i) => i.a!.clamp(null, -0.2)],
  maximum: [EXACT, (i) => i.a!.maximum(i.b!)],
  minimum: [EXACT, (i) => i.a!.minimum(i.b!)],
  maximum_broadcast: [EXACT, (i) => i.a!.maximum(i.row!)],
  where: [EXACT, (i) => torch.where(i.cond!, i.a!, i.b!)],
  where_broadcast: [EXACT, (i) => i.a!.where(i.cond!, i.row!)],
  masked_fill: [EXACT, (i) => i.a!.maskedFill(i.cond!, -1.25)],
  eq: [EXACT, (i) => i.ints!.eq(i.ints2!)],
  ne: [EXACT, (i) => i.ints!.ne(i.ints2!)],
  lt: [EXACT, (i) => i.ints!.lt(i.ints2!)],
  le: [EXACT, (i) => i.ints!.le(i.ints2!)],
  gt: [EXACT, (i) => i.ints!.gt(i.ints2!)],
  ge: [EXACT, (i) => i.ints!.ge(i.ints2!)],
  eq_scalar: [EXACT, (i) => i.ints!.eq(0)],
  lt_scalar: [EXACT, (i) => i.a!.lt(0.5)],
  ge_scalar: [EXACT, (i) => i.ints!.ge(1)],
  isfinite: [EXACT, (i) => i.special!.isfinite()],
  isnan: [EXACT, (i) => i.special!.isnan()],
  logical_not: [EXACT, (i) => i.cond!.logicalNot()],
  logical_and: [EXACT, (i) => i.cond!.logicalAnd(i.cond2!)],
  logical_or: [EXACT, (i) => i.cond!.logicalOr(i.cond2!)],

  // ---- in place, each on a clone
  add_: [EW, (i) => i.a!.clone().add_(i.b!, 2)],
  add_scalar_: [EW, (i) => i.a!.clone().add_(0.25)],
  sub_: [EW, (i) => i.a!.clone().sub_(i.b!, 3)],
  mul_: [EW, (i) => i.a!.clone().mul_(i.b!)],
  mul_scalar_: [EW, (i) => i.a!.clone().mul_(0.9)],
  div_: [EW, (i) => i.a!.clone().div_(i.pos!)],
  div_scalar_: [EW, (i) => i.a!.clone().div_(7)],
  addcmul_: [EW, (i) => i.a!.clone().addcmul_(i.b!, i.pos!, -0.5)],
  addcdiv_: [EW, (i) => i.a!.clone().addcdiv_(i.b!, i.pos!, 0.1)],
  lerp_: [EW, (i) => i.a!.clone().lerp_(i.b!, 0.3)],
  clamp_: [EXACT, (i) => i.a!.clone().clamp_(-0.4, 0.6)],
  sqrt_: [EW, (i) => i.pos!.clone().sqrt_()],
  neg_: [EXACT, (i) => i.a!.clone().neg_()],
  fill_: [EXACT, (i) => i.a!.clone().fill_(2.5)],
  zero_: [EXACT, (i) => i.a!.clone().zero_()],
  copy_broadcast: [EXACT, (i) => i.a!.clone().copy_(i.row!)],

  // ---- reductions
  sum_all: [EW, (i) => i.a!.sum()],
  sum_dim: [EW, (i) => i.x4!.sum(1)],
  sum_dims_keepdim: [EW, (i) => i.x4!.sum([1, 3], true)],
  sum_negative_dim: [EW, (i) => i.x4!.sum(-1)],
  sum_int64: [EXACT, (i) => i.i64!.sum()],
  sum_dtype_float64: [EW, (i) => i.a!.sum(1, false, 'float64')],
  mean_all: [EW, (i) => i.x4!.mean()],
  mean_dims: [EW, (i) => i.x4!.mean([2, 3])],
  mean_keepdim: [EW, (i) => i.x4!.mean(0, true)],
  max_all: [EXACT, (i) => i.a!.max()],
  min_all: [EXACT, (i) => i.a!.min()],
  max_dim: [EXACT, (i) => i.a!.max(1)],
  max_dim_keepdim: [EXACT, (i) => i.x4!.max(2, true)],
  min_dim: [EXACT, (i) => i.a!.min(0)],
  amax: [EXACT, (i) => i.x4!.amax([1, 3])],
  amax_keepdim: [EXACT, (i) => i.x4!.amax(-1, true)],
  amin: [EXACT, (i) => i.x4!.amin(2)],
  argmax_all: [EXACT, (i) => i.a!.argmax()],
  argmax_dim: [EXACT, (i) => i.x4!.argmax(-1)],
  argmin_dim_keepdim: [EXACT, (i) => i.x4!.argmin(1, true)],
  norm: [EW, (i) => i.a!.norm()],
  norm_p1_dims: [EW, (i) => i.x4!.norm(1, [2, 3])],
  norm_dim_keepdim: [EW, (i) => i.a!.norm(2, 1, true)],
  var_all: [EW, (i) => i.a!.var()],
  var_dim: [EW, (i) => i.x4!.var(1)],
  var_biased_keepdim: [EW, (i) => i.x4!.var([2, 3], false, true)],
  prod: [EW, (i) => i.pos!.prod()],
  all: [EXACT, (i) => i.cond!.all()],
  any: [EXACT, (i) => i.cond!.any()],

  // ---- shapes (pure data movement: bit-identical)
  reshape: [EXACT, (i) => i.x4!.reshape(6, 20)],
  reshape_infer: [EXACT, (i) => i.x4!.reshape([-1, 5])],
  view: [EXACT, (i) => i.x4!.view(2, 12, 5)],
  permute: [EXACT, (i) => i.x4!.permute(2, 0, 3, 1)],
  transpose: [EXACT, (i) => i.x4!.transpose(1, 3)],
  transpose_contiguous: [EXACT, (i) => i.x4!.transpose(0, 2).contiguous()],
  t: [EXACT, (i) => i.a!.t()],
  flatten: [EXACT, (i) => i.x4!.flatten()],
  flatten_range: [EXACT, (i) => i.x4!.flatten(1, 2)],
  unsqueeze: [EXACT, (i) => i.a!.unsqueeze(1)],
  unsqueeze_negative: [EXACT, (i) => i.a!.unsqueeze(-1)],
  squeeze: [EXACT, (i) => i.sq!.squeeze()],
  squeeze_dim: [EXACT, (i) => i.sq!.squeeze(2)],
  expand: [EXACT, (i) => i.col!.expand(3, 5)],
  expand_new_dim: [EXACT, (i) => i.col!.expand([2, -1, 4])],
  repeat: [EXACT, (i) => i.a!.repeat(2, 1, 3)],
  chunk: [EXACT, (i) => i.seven!.chunk(3)],
  chunk_dim: [EXACT, (i) => i.x4!.chunk(2, 3)],
  split_int: [EXACT, (i) => i.seven!.split(2)],
  split_sizes: [EXACT, (i) => i.x4!.split([1, 3, 1], 3)],
  cat: [EXACT, (i) => torch.cat([i.a!, i.b!])],
  cat_dim1: [EXACT, (i) => torch.cat([i.a!, i.b!, i.a!], 1)],
  stack: [EXACT, (i) => torch.stack([i.a!, i.b!])],
  stack_dim2: [EXACT, (i) => torch.stack([i.a!, i.b!], 2)],
  narrow: [EXACT, (i) => i.x4!.narrow(2, 1, 2)],
  slice_step: [EXACT, (i) => i.x4!.slice(2, null, null, 2)],
  slice_start_end_step: [EXACT, (i) => i.x4!.slice(-1, 1, 5, 3)],
  slice_negative: [EXACT, (i) => i.a!.slice(1, -3, -1)],
  select: [EXACT, (i) => i.x4!.select(1, 1)],
  index_select: [EXACT, (i) => i.x4!.indexSelect(3, i.idx!)],
  gather: [EXACT, (i) => i.a!.gather(1, i.gidx!)],
  flip: [EXACT, (i) => i.x4!.flip([0, 3])],

  // ---- linear algebra
  matmul_2d: [MM, (i) => i.A!.matmul(i.B!)],
  matmul_batched_broadcast: [MM, (i) => i.Ab!.matmul(i.B!)],
  matmul_vector: [MM, (i) => i.A!.matmul(i.vec5!)],
  matmul_batched: [MM, (i) => i.Ab!.matmul(i.Bb!)],
  matmul_float64: [MM, (i) => i.A64!.matmul(i.B64!)],
  mm: [MM, (i) => i.A!.mm(i.B!)],
  bmm: [MM, (i) => i.Ab!.bmm(i.Bb!)],
  baddbmm: [MM, (i) => i.base!.baddbmm(i.Ab!, i.Bb!, 0.5, 2)],
  linear: [MM, (i) => F.linear(i.Ab!, i.lin_w!, i.lin_b!)],
  linear_no_bias: [MM, (i) => F.linear(i.A!, i.lin_w!)],
  einsum: [MM, (i) => torch.einsum('bij,bjk->bik', i.Ab!, i.Bb!)],

  // ---- nn.functional
  conv2d: [MM, (i) => F.conv2d(i.img!, i.convw!, i.convb!)],
  conv2d_stride_padding: [MM, (i) => F.conv2d(i.img!, i.convw!, i.convb!, { stride: 2, padding: 1 })],
  conv2d_groups: [MM, (i) => F.conv2d(i.img!, i.convw_g!, i.convb!, { padding: 1, groups: 2 })],
  conv2d_dilation_no_bias: [MM, (i) => F.conv2d(i.img!, i.convw!, null, { padding: 2, dilation: 2 })],
  conv2d_asymmetric: [MM, (i) => F.conv2d(i.img!, i.convw!, i.convb!, { stride: [1, 2], padding: [0, 1] })],
  conv2d_1x1: [MM, (i) => F.conv2d(i.img!, i.convw_1x1!)],
  group_norm: [MM, (i) => F.groupNorm(i.img!, 2, i.gn_w!, i.gn_b!)],
  group_norm_no_affine: [MM, (i) => F.groupNorm(i.img!, 4)],
  group_norm_one_group_eps: [MM, (i) => F.groupNorm(i.img!, 1, i.gn_w!, i.gn_b!, 1e-2)],
  layer_norm: [MM, (i) => F.layerNorm(i.x4!, [5], i.ln_w!, i.ln_b!)],
  layer_norm_2d_no_affine: [MM, (i) => F.layerNorm(i.x4!, [4, 5])],
  softmax_last: [EW, (i) => i.x4!.softmax(-1)],
  softmax_dim1: [EW, (i) => F.softmax(i.x4!, 1)],
  log_softmax_last: [EW, (i) => i.x4!.logSoftmax(-1)],
  log_softmax_dim0: [EW, (i) => i.x4!.logSoftmax(0)],
  softmax_float64: [EW, (i) => i.A64!.softmax(-1)],
  interp_nearest_size: [EXACT, (i) => F.interpolate(i.img!, { size: [9, 4] })],
  interp_nearest_scale2: [EXACT, (i) => F.interpolate(i.img!, { scaleFactor: 2, mode: 'nearest' })],
  interp_nearest_scale1_5: [EXACT, (i) => F.interpolate(i.img!, { scaleFactor: 1.5 })],
  interp_bilinear_size: [EW, (i) => F.interpolate(i.img!, { size: [4, 9], mode: 'bilinear' })],
  interp_bilinear_scale2: [EW, (i) => F.interpolate(i.img!, { scaleFactor: 2, mode: 'bilinear' })],
  interp_bilinear_scale_half: [EW, (i) => F.interpolate(i.img!, { scaleFactor: [0.5, 0.5], mode: 'bilinear' })],
  interp_bilinear_align_corners: [EW, (i) => F.interpolate(i.img!, { size: [11, 7], mode: 'bilinear', alignCorners: true })],
  avg_pool2d: [EW, (i) => F.avgPool2d(i.img!, 2)],
  avg_pool2d_stride_padding: [EW, (i) => F.avgPool2d(i.img!, 3, 2, 1)],
  pad_constant: [EXACT, (i) => F.pad(i.img!, [1, 2, 0, 1], 'constant', 0.5)],
  pad_constant_last_dim: [EXACT, (i) => F.pad(i.a!, [2, 1])],
  pad_reflect: [EXACT, (i) => F.pad(i.img!, [1, 1, 2, 0], 'reflect')],
  pad_replicate: [EXACT, (i) => F.pad(i.img!, [2, 0, 1, 1], 'replicate')],
  mse_mean: [EW, (i) => F.mseLoss(i.a!, i.b!)],
  mse_sum: [EW, (i) => F.mseLoss(i.a!, i.b!, 'sum')],
  mse_none: [EW, (i) => F.mseLoss(i.a!, i.b!, 'none')],
  embedding: [EXACT, (i) => F.embedding(i.emb_idx!, i.emb_w!)],
  // the reference is softmax(q kᵀ·scale + mask) v in float64; ours is libtorch's SDPA or the composition
  sdpa: [MM, (i) => F.scaledDotProductAttention(i.q!, i.k!, i.v!)],
  sdpa_scale: [MM, (i) => F.scaledDotProductAttention(i.q!, i.k!, i.v!, { scale: 0.3 })],
  sdpa_float_mask: [MM, (i) => F.scaledDotProductAttention(i.q!, i.k!, i.v!, { attnMask: i.att_mask! })],
  sdpa_bool_mask: [MM, (i) => F.scaledDotProductAttention(i.q!, i.k!, i.v!, { attnMask: i.att_bool! })],
  sdpa_causal: [MM, (i) => F.scaledDotProductAttention(i.q!, i.k!, i.v!, { isCausal: true })],

  // ---- dtype conversions
  to_bfloat16: [EXACT, (i) => i.casts!.to('bfloat16')],
  bfloat16_bits: [EXACT, (i) => tidy(() => torch.tensor(Int32Array.from(i.casts!.bfloat16().dataSync() as Uint16Array)))],
  bfloat16_round_trip: [EXACT, (i) => i.casts!.bfloat16().float()],
  to_float16: [EXACT, (i) => i.casts!.half()],
  float16_bits: [EXACT, (i) => tidy(() => torch.tensor(Int32Array.from(i.casts!.half().dataSync() as Uint16Array)))],
  float16_round_trip: [EXACT, (i) => i.casts!.to('float16').to('float32')],
  float32_to_float64: [EXACT, (i) => i.casts!.double()],
  float_to_int64: [EXACT, (i) => i.trunc!.long()],
  int64_to_float32: [EXACT, (i) => i.i64!.float()],
  float_to_int32: [EXACT, (i) => i.wide!.int()],
  bool_to_float: [EXACT, (i) => i.cond!.to('float32')],
  float_to_bool: [EXACT, (i) => i.ints!.to('bool')],
  bfloat16_mul: [EXACT, (i) => i.a!.bfloat16().mul(i.b!.bfloat16())],
  bfloat16_add_scalar: [EXACT, (i) => i.a!.bfloat16().add(0.1)],

  // ---- random: the same mt19937 CPU generator as PyTorch, so the values must be identical
  randn_seed42: [EXACT, () => torch.randn([5], { generator: seeded(42) })],
  randn_vectorized: [EXACT, () => torch.randn([4, 25], { generator: seeded(7) })],
  randn_float64: [EXACT, () => torch.randn([20], { generator: seeded(8), dtype: 'float64' })],
  rand: [EXACT, () => torch.rand([3, 7], { generator: seeded(3) })],
  rand_float64: [EXACT, () => torch.rand([6], { generator: seeded(4), dtype: 'float64' })],
  randint: [EXACT, () => torch.randint(0, 10, [20], { generator: seeded(5) })],
  random_sequence: [EXACT, () => {
    const g = seeded(11);
    return [torch.randn([3], { generator: g }), torch.rand([4], { generator: g }), torch.randint(-5, 5, [6], { generator: g }),
      torch.randn([17], { generator: g })];
  }],
  normal_uniform_inplace: [EXACT, () => {
    const g = seeded(12);
    return [torch.empty([10]).normal_(2, 0.5, g), torch.empty([10]).uniform_(-1, 3, g)];
  }],
  big_seed: [EXACT, () => torch.randn([4], { generator: seeded(2n ** 40n + 5n) })],
  generator_state: [EXACT, () => {
    const g = seeded(9);
    torch.randn([10], { generator: g });
    return [g.getState(), torch.randn([8], { generator: g })];
  }],
  default_generator: [EXACT, () => {
    manualSeed(123);
    return [torch.randn([6]), torch.rand([3])];
  }],
  dropout: [EXACT, () => {
    manualSeed(77);
    return F.dropout(torch.ones([4, 5]), 0.3, true);
  }],
};

const inputs = loadInputs();
const errors = new Map<string, number>();
afterAll(() => {
  dispose(Object.values(inputs));
  const worst = [...errors].sort((x, y) => y[1] - x[1]).slice(0, 8);
  console.log(`max relative errors vs PyTorch ${String(reference.meta.torch)}: ${worst.map(([n, e]) => `${n} ${e.toExponential(2)}`).join(', ')}`);
});

describe('ops match PyTorch', () => {
  it('every reference case has a test and every test a reference', () => {
    expect(Object.keys(table).sort()).toEqual(Object.keys(reference.cases).sort());
  });

  for (const [name, { out }] of Object.entries(reference.cases)) {
    const entry = table[name];
    if (entry === undefined) continue;
    const [tol, fn] = entry;
    it(name, () => {
      tidy(() => {
        const ours = fn(inputs);
        const refs = Array.isArray(out) ? out : [out];
        const got = Array.isArray(ours) ? ours : [ours];
        expect(got.length, `${name}: number of results`).toBe(refs.length);
        refs.forEach((r, j) => {
          const e = expectMatches(got[j]!, r, tol, refs.length > 1 ? `${name}[${j}]` : name);
          errors.set(name, Math.max(errors.get(name) ?? 0, e));
        });
      });
    });
  }

  it("a PyTorch generator state loaded with setState replays PyTorch's draws", () => {
    tidy(() => {
      const [state, after] = reference.cases.generator_state!.out as [typeof reference.inputs[string], typeof reference.inputs[string]];
      const g = new Generator().manualSeed(1);
      g.setState(fromRef(state));
      expectMatches(torch.randn([8], { generator: g }), after, EXACT, 'randn after setState');
      // and the state read back is the one set
      const g2 = new Generator();
      g2.setState(fromRef(state));
      expectMatches(g2.getState(), state, EXACT, 'getState after setState');
    });
  });

  it('attention stays finite when recycled memory holds inf (libtorch 1.13 baddbmm beta=0 reads its output)', () => {
    tidy(() => {
      const [q, k, v] = [inputs.q!, inputs.k!, inputs.v!];
      const want = fromRef(reference.cases.sdpa!.out as typeof reference.inputs[string]);
      for (let i = 0; i < 5; i++) {
        // free blocks of the scores' size full of -inf, as masked scores or overflowed grads leave behind
        dispose(Array.from({ length: 4 }, () => torch.full([4, 4, 6], -Infinity)));
        const y = F.scaledDotProductAttention(q, k, v);
        expect(y.isnan().any().item()).toBe(false);
        expect(y.sub(want).abs().max().item()).toBeLessThan(1e-6);
      }
    });
  });

  it('inputs made from the JSON are the values PyTorch used', () => {
    // spot checks that the fixture loader is faithful: exact float32 values, int64 and bool
    tidy(() => {
      expect(inputs.special!.toFloat64Array()).toEqual(Float64Array.from([1, Infinity, -Infinity, NaN, -0, 3]));
      expect(Array.from(inputs.i64!.dataSync() as BigInt64Array)).toEqual([-7n, -3n, 0n, 2n, 5n, 9n]);
      expect(inputs.cond!.dtype).toBe('bool');
      expect(Array.from(inputs.a!.dataSync() as Float32Array)).toEqual(Array.from(Float32Array.from(reference.inputs.a!.data as number[])));
    });
  });
});

describe('errors', () => {
  it('name the ATen op and the input shapes', () => {
    const x = torch.zeros([2, 2]);
    const y = torch.zeros([3, 3]);
    let message = '';
    try { x.matmul(y); } catch (e) { message = (e as Error).message; }
    expect(message).toContain('aten::matmul');
    expect(message).toContain('Tensor[2, 2] float32 cpu');
    expect(message).toContain('Tensor[3, 3] float32 cpu');
    expect(message).toMatch(/cannot be multiplied/); // and libtorch's own explanation

    expect(() => torch.cat([x, y], 0)).toThrow(/aten::cat\(\[Tensor\[2, 2\] float32 cpu, Tensor\[3, 3\] float32 cpu\], 0\)/);
    const img = torch.zeros([1, 3, 4, 4]);
    const w = torch.zeros([2, 5, 3, 3]);
    expect(() => F.conv2d(img, w)).toThrow(/aten::conv2d\(Tensor\[1, 3, 4, 4\] float32 cpu, Tensor\[2, 5, 3, 3\] float32 cpu/);
    expect(() => x.view(3)).toThrow(/aten::view\(Tensor\[2, 2\] float32 cpu, \[3\]\)/);
    dispose([x, y, img, w]);
  });

  it('using a disposed tensor throws "disposed", as operand or receiver', () => {
    const x = torch.ones([2]);
    const y = torch.ones([2]);
    x.dispose();
    expect(x.isDisposed).toBe(true);
    expect(String(x)).toBe('Tensor(disposed)');
    expect(() => x.add(1)).toThrow(/disposed/);
    expect(() => y.add(x)).toThrow(/disposed/);
    expect(() => x.shape).toThrow(/disposed/);
    expect(() => x.dataSync()).toThrow(/disposed/);
    expect(() => torch.stack([y, x])).toThrow(/disposed/);
    x.dispose(); // a second dispose is a no-op
    expect(y.add(1).toFloat64Array()).toEqual(Float64Array.from([2, 2]));
    y.dispose();
  });

  it('wrong argument types are TypeErrors naming the argument', () => {
    tidy(() => {
      const x = torch.ones([2, 3]);
      expect(() => x.add('a' as never)).toThrow(TypeError);
      expect(() => x.add('a' as never)).toThrow(/argument 'other' must be a number/);
      expect(() => x.matmul(5 as never)).toThrow(TypeError);
      expect(() => x.matmul(5 as never)).toThrow(/argument 'other': expected a Tensor/);
      expect(() => x.transpose(0.5, 1)).toThrow(/argument 'dim0' must be an integer/);
      expect(() => x.reshape(['a'] as never)).toThrow(TypeError);
      expect(() => torch.zeros('3' as never)).toThrow(TypeError);
      expect(() => F.conv2d(torch.ones([1, 1, 3, 3]), torch.ones([1, 1, 1, 1]), null, { stride: 'x' as never })).toThrow(TypeError);
      expect(() => x.gelu(true as never)).toThrow(/argument 'approximate' must be a string/);
      expect(() => x.to('float99' as never)).toThrow(TypeError);
      expect(() => new (Tensor as unknown as new () => Tensor)()).toThrow(TypeError);
      expect(() => F.interpolate(x.reshape(1, 1, 2, 3), {})).toThrow(TypeError);
    });
  });
});

describe('tensor() and reading back', () => {
  it('builds from nested arrays, inferring the shape and dtype', () => {
    tidy(() => {
      const t = torch.tensor([[1, 2, 3], [4, 5, 6.5]]);
      expect(t.shape).toEqual([2, 3]);
      expect(t.dtype).toBe('float32');
      expect(t.tolist()).toEqual([[1, 2, 3], [4, 5, 6.5]]);
      expect(torch.tensor([[true, false]]).dtype).toBe('bool');
      expect(torch.tensor([[true, false]]).tolist()).toEqual([[1, 0]]); // numbers, unlike torch's True/False
      const big = torch.tensor([2n ** 60n, -3n]);
      expect(big.dtype).toBe('int64');
      expect(Array.from(big.dataSync() as BigInt64Array)).toEqual([2n ** 60n, -3n]);
      expect(torch.tensor([[[1], [2]]]).shape).toEqual([1, 2, 1]);
      expect(torch.tensor([]).shape).toEqual([0]);
      expect(torch.tensor([[1, 2]], { dtype: 'int32' }).dataSync()).toEqual(Int32Array.from([1, 2]));
      const h = torch.tensor([0.1, 70000], { dtype: 'float16' });
      expect(h.dtype).toBe('float16');
      expect(h.float().toFloat64Array()).toEqual(Float64Array.from([0.0999755859375, Infinity]));
      expect(torch.tensor([1.5], { dtype: 'bfloat16' }).dataSync()).toEqual(Uint16Array.from([0x3fc0]));
      expect(torch.tensor([1, 2], { requiresGrad: true }).requiresGrad).toBe(true);
      expect(torch.scalarTensor(3.5).shape).toEqual([]);
    });
  });

  it('rejects ragged nested arrays and non-numeric elements', () => {
    expect(() => torch.tensor([[1, 2], [3]])).toThrow(/ragged/);
    expect(() => torch.tensor([[1, 2], 3] as never)).toThrow(/ragged/);
    expect(() => torch.tensor([1, [2, 3]] as never)).toThrow(/ragged/);
    expect(() => torch.tensor([[[1, 2]], [[3], [4]]])).toThrow(/ragged/);
    expect(() => torch.tensor([[1, 2], [3, 4]], { shape: [3] })).toThrow(/bytes given/);
    expect(() => torch.tensor(['a'] as never)).toThrow(TypeError);
    expect(() => torch.tensor([1, null] as never)).toThrow(TypeError);
  });

  it('takes every typed array as its dtype and gives it back from dataSync', () => {
    tidy(() => {
      const cases: [ArrayBufferView & ArrayLike<number | bigint>, string][] = [
        [Float32Array.from([1.5, -2, 3.25]), 'float32'],
        [Float64Array.from([1e-300, -2, Math.PI]), 'float64'],
        [Int32Array.from([2 ** 31 - 1, -(2 ** 31), 0]), 'int32'],
        [Int16Array.from([32767, -32768, 7]), 'int16'],
        [Int8Array.from([127, -128, 1]), 'int8'],
        [Uint8Array.from([0, 255, 9]), 'uint8'],
        [BigInt64Array.from([2n ** 62n, -(2n ** 63n), 5n]), 'int64'],
      ];
      for (const [data, dtype] of cases) {
        const t = torch.tensor(data as never);
        expect(t.dtype).toBe(dtype);
        expect(t.shape).toEqual([3]);
        const back = t.dataSync();
        expect(back.constructor).toBe(data.constructor);
        expect(Array.from(back as ArrayLike<number>)).toEqual(Array.from(data as ArrayLike<number>));
      }
      // float16 and bfloat16 come as raw bits in a Uint16Array
      expect(torch.tensor(Uint16Array.from([0x3c00, 0xc000, 0x7c00]), { dtype: 'float16' }).float().toFloat64Array())
        .toEqual(Float64Array.from([1, -2, Infinity]));
      expect(torch.tensor(Uint16Array.from([0x3f80, 0xc040]), { dtype: 'bfloat16' }).float().toFloat64Array())
        .toEqual(Float64Array.from([1, -3]));
      expect(() => torch.tensor(Uint16Array.from([1]))).toThrow(/raw float16\/bfloat16 bits/);
      expect(torch.tensor(Uint8Array.from([0, 1, 1]), { dtype: 'bool' }).dataSync()).toEqual(Uint8Array.from([0, 1, 1]));
      expect(torch.tensor(Float32Array.from([1.5, 2]), { dtype: 'float64' }).dataSync()).toEqual(Float64Array.from([1.5, 2]));
      expect(torch.tensor(Float32Array.from([1.5, 2]), { dtype: 'bfloat16' }).float().toFloat64Array()).toEqual(Float64Array.from([1.5, 2]));
      // a view into a larger buffer: only its own elements, from its own offset
      const whole = Float32Array.from([0, 1, 2, 3, 4, 5, 6, 7]);
      expect(torch.tensor(whole.subarray(2, 6), { shape: [2, 2] }).tolist()).toEqual([[2, 3], [4, 5]]);
      // the tensor owns a copy: changing the array later changes nothing
      const src = Float32Array.from([1, 2]);
      const t = torch.tensor(src);
      src[0] = 100;
      expect(t.toFloat64Array()).toEqual(Float64Array.from([1, 2]));
    });
  });

  it('dataSync, tolist and item read back in row-major logical order', () => {
    tidy(() => {
      const x = torch.arange(0, 6, 1, { dtype: 'float32' }).reshape(2, 3);
      const xt = x.t(); // a non-contiguous view
      expect(xt.dataSync()).toEqual(Float32Array.from([0, 3, 1, 4, 2, 5]));
      expect(xt.tolist()).toEqual([[0, 3], [1, 4], [2, 5]]);
      expect(x.sum().item()).toBe(15);
      expect(x.select(0, 1).select(0, 2).item()).toBe(5);
      expect(torch.tensor([7.25]).item()).toBe(7.25);
      expect(torch.arange(4).sum().item()).toBe(6);
      expect(torch.tensor([true]).item()).toBe(true);
      expect(torch.scalarTensor(2.5).tolist()).toBe(2.5);
      expect(() => x.item()).toThrow(/aten::item/);
      expect(x.numel()).toBe(6);
      expect(x.size()).toEqual([2, 3]);
      expect(x.size(-1)).toBe(3);
      expect(xt.stride()).toEqual([1, 3]);
      expect(String(x)).toBe('Tensor[2, 3] float32 cpu');
    });
  });

  it('to({dtype, device}) converts, and aliases when nothing changes unless copy is asked', () => {
    tidy(() => {
      const x = torch.tensor([[1.5, -2.75], [3, 4]]);
      const y = x.to({ dtype: 'float64', device: 'cpu' });
      expect(y.dtype).toBe('float64');
      expect(y.device).toBe('cpu');
      expect(y.tolist()).toEqual([[1.5, -2.75], [3, 4]]);
      expect(x.to({ dtype: 'int32' }).dataSync()).toEqual(Int32Array.from([1, -2, 3, 4]));
      expect(x.to('cpu')._dataPtr()).toBe(x._dataPtr());
      expect(x.to({ dtype: 'float32', device: 'cpu' })._dataPtr()).toBe(x._dataPtr());
      expect(x.to({ dtype: 'float32', copy: true })._dataPtr()).not.toBe(x._dataPtr());
      expect(x.cpu().device).toBe('cpu');
      expect([x.double().dtype, x.half().dtype, x.bfloat16().dtype, x.long().dtype, x.int().dtype, x.double().float().dtype])
        .toEqual(['float64', 'float16', 'bfloat16', 'int64', 'int32', 'float32']);
      expect(() => x.to({ device: 'nope' })).toThrow(/invalid device 'nope'/);
    });
  });

  it('views share storage and in-place ops return the same tensor', () => {
    tidy(() => {
      const x = torch.zeros([2, 3]);
      const v = x.view(6);
      expect(v._dataPtr()).toBe(x._dataPtr());
      expect(x.add_(1)).toBe(x);
      expect(v.sum().item()).toBe(6);
      x.select(0, 1).fill_(5);
      expect(x.tolist()).toEqual([[1, 1, 1], [5, 5, 5]]);
    });
  });
});
