#!/usr/bin/python3
"""Reference numbers for test/ops.test.ts and test/autograd.test.ts, computed by PyTorch itself.

Run with Debian's python (it has torch 1.13.1 and numpy):

    /usr/bin/python3 scripts/make-op-reference.py            # writes test/fixtures/ops_reference.json

Every input value is written into the JSON (the tests never rely on a matching random generator for
inputs); only the `random` cases test the generators, whose values must match bit for bit (libtorch's
CPU generator is the same mt19937 here and in PyTorch).

JSON layout:
  meta:   versions and notes
  inputs: name -> tensor
  cases:  name -> {"out": tensor | [tensor, ...]}          (forward results, checked by test/ops.test.ts)
  grads:  name -> {"out": [grad of each input, ...]}       (checked by test/autograd.test.ts)
A tensor is {"dtype": "float32", "shape": [..], "data": [flat row-major values]}; float16/bfloat16 values are
written as their exact float values; non-finite floats as the strings "nan", "inf", "-inf".
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'test', 'fixtures', 'ops_reference.json')

DTYPES = {
    torch.float32: 'float32', torch.float64: 'float64', torch.float16: 'float16', torch.bfloat16: 'bfloat16',
    torch.int64: 'int64', torch.int32: 'int32', torch.int16: 'int16', torch.int8: 'int8', torch.uint8: 'uint8',
    torch.bool: 'bool',
}


def fnum(x, dtype):
    """A float as JSON: the shortest decimal that gives back the same float32 (or float64)."""
    if math.isnan(x):
        return 'nan'
    if math.isinf(x):
        return 'inf' if x > 0 else '-inf'
    if dtype == 'float64':
        return x
    return float(repr(np.float32(x)))  # float16/bfloat16 values are exact float32 values


def enc(t):
    if isinstance(t, (tuple, list)):
        return [enc(x) for x in t]
    t = t.detach().cpu().contiguous()
    dtype = DTYPES[t.dtype]
    flat = t.reshape(-1)
    if dtype in ('float32', 'float64', 'float16', 'bfloat16'):
        data = [fnum(x, dtype) for x in flat.double().tolist()]
    elif dtype == 'bool':
        data = [bool(x) for x in flat.tolist()]
    else:
        data = [int(x) for x in flat.tolist()]
    return {'dtype': dtype, 'shape': list(t.shape), 'data': data}


rng = np.random.default_rng(20241128)
inputs = {}


def inp(name, array, dtype=torch.float32):
    t = torch.tensor(np.asarray(array), dtype=dtype)
    inputs[name] = t
    return t


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def uniform(lo, hi, *shape):
    return rng.uniform(lo, hi, shape).astype(np.float32)


# ---- inputs
a = inp('a', randn(3, 4))
b = inp('b', randn(3, 4))
row = inp('row', randn(4))
col = inp('col', randn(3, 1))
pos = inp('pos', uniform(0.1, 3.0, 3, 4))
pos_row = inp('pos_row', uniform(0.5, 2.0, 4))
ints = inp('ints', rng.integers(-2, 3, (3, 4)))          # float32 with ties, for comparisons
ints2 = inp('ints2', rng.integers(-2, 3, (3, 4)))
wide = inp('wide', [[0.5, 1.5, 2.5, -0.5], [-1.5, -2.5, 3.7, -3.7], [0.0, 4.49, -4.51, 1e-3]])  # rounding ties
special = inp('special', [1.0, float('inf'), float('-inf'), float('nan'), -0.0, 3.0])
cond = inp('cond', rng.integers(0, 2, (3, 4)), torch.bool)
cond2 = inp('cond2', rng.integers(0, 2, (3, 4)), torch.bool)
i64 = inp('i64', [-7, -3, 0, 2, 5, 9], torch.int64)
x4 = inp('x4', randn(2, 3, 4, 5))
sq = inp('sq', randn(1, 3, 1, 4))
seven = inp('seven', randn(7, 2))
idx = inp('idx', [4, 0, 4], torch.int64)
gidx = inp('gidx', [[0, 3], [2, 2], [1, 0]], torch.int64)
A = inp('A', randn(3, 5))
B = inp('B', randn(5, 4))
vec5 = inp('vec5', randn(5))
Ab = inp('Ab', randn(2, 3, 5))
Bb = inp('Bb', randn(2, 5, 4))
base = inp('base', randn(2, 3, 4))
A64 = inp('A64', rng.standard_normal((3, 5)), torch.float64)
B64 = inp('B64', rng.standard_normal((5, 4)), torch.float64)
lin_w = inp('lin_w', randn(4, 5))
lin_b = inp('lin_b', randn(4))
img = inp('img', randn(2, 4, 6, 6))
convw = inp('convw', randn(6, 4, 3, 3) * 0.3)
convb = inp('convb', randn(6))
convw_g = inp('convw_g', randn(6, 2, 3, 3) * 0.3)
convw_1x1 = inp('convw_1x1', randn(3, 4, 1, 1))
gn_w = inp('gn_w', uniform(0.5, 1.5, 4))
gn_b = inp('gn_b', randn(4))
ln_w = inp('ln_w', uniform(0.5, 1.5, 5))
ln_b = inp('ln_b', randn(5))
q = inp('q', randn(2, 2, 4, 8))
k = inp('k', randn(2, 2, 6, 8))
v = inp('v', randn(2, 2, 6, 8))
att_mask = inp('att_mask', randn(4, 6))                   # additive float mask, broadcast over batch and heads
att_bool = inp('att_bool', rng.integers(0, 2, (2, 1, 4, 6)) | (np.arange(6) == 0), torch.bool)  # >= 1 True per row
emb_w = inp('emb_w', randn(10, 4))
emb_idx = inp('emb_idx', [[1, 9, 1], [0, 3, 7]], torch.int64)
casts = inp('casts', [1.0, 1.00390625, 1.01171875, -2.3, 3.14159265, 1e-3, 70000.0, -1e-8, 65504.0, 0.33333334,
                      -1.7, 2.5, 255.9, 1e20, 5.960464477539063e-08, -0.0])
trunc = inp('trunc', [-1.7, 2.5, 255.9, -0.2, 70000.0, -3.5, 0.99, -1e-3])
r_img = inp('r_img', randn(2, 4, 6, 6))
r_conv = inp('r_conv', randn(2, 6, 3, 3))
r_att = inp('r_att', randn(2, 2, 4, 8))
r_x4 = inp('r_x4', randn(2, 3, 4, 5))

cases = {}


def case(name, out):
    assert name not in cases, name
    cases[name] = {'out': enc(out)}


# ---- creation
case('zeros', torch.zeros(2, 3))
case('ones_int64', torch.ones(2, 2, dtype=torch.int64))
case('full', torch.full((2, 3), 1.5))
case('full_int32', torch.full((2,), 7, dtype=torch.int32))
case('arange_end', torch.arange(5))
case('arange_start_step', torch.arange(2, 11, 3))
case('arange_float_step', torch.arange(0, 1, 0.1))
case('arange_negative_step', torch.arange(1.5, -1, -0.5))
case('arange_float64', torch.arange(0, 3, dtype=torch.float64))
case('linspace', torch.linspace(-1, 1, 7))
case('linspace_float64', torch.linspace(0, 1, 5, dtype=torch.float64))
case('zeros_like_int32', torch.zeros_like(a, dtype=torch.int32))
case('ones_like', torch.ones_like(x4))

# ---- elementwise
case('add', a + b)
case('add_alpha', torch.add(a, b, alpha=2.5))
case('add_scalar_int', a + 2)
case('add_scalar_float', a + 0.75)
case('add_broadcast_row', a + row)
case('add_broadcast_outer', col + row)
case('sub', a - b)
case('sub_alpha', torch.sub(a, b, alpha=0.5))
case('sub_broadcast', a - col)
case('sub_scalar', a - 1.5)
case('mul', a * b)
case('mul_broadcast', a * row)
case('mul_scalar', a * -3)
case('div', a / pos)
case('div_scalar', a / 3)
case('div_broadcast', a / pos_row)
case('div_trunc_scalar', torch.div(a, 0.3, rounding_mode='trunc'))
case('div_floor_scalar', torch.div(a, 0.3, rounding_mode='floor'))
case('div_floor_tensor', torch.div(a, b, rounding_mode='floor'))
case('div_floor_int_by_float', torch.div(i64, 2.5, rounding_mode='floor'))   # float result
case('div_trunc_int', torch.div(i64, 2, rounding_mode='trunc'))              # int64 result
case('div_int_true', i64 / 2)                                                # true division: float
case('pow_2', a ** 2)
case('pow_3', a ** 3)
case('pow_half', pos ** 0.5)
case('pow_neg', pos ** -1.5)
case('pow_tensor', pos ** b)
case('exp', a.exp())
case('log', pos.log())
case('sqrt', pos.sqrt())
case('rsqrt', pos.rsqrt())
case('abs', a.abs())
case('neg', a.neg())
case('tanh', a.tanh())
case('sigmoid', a.sigmoid())
case('relu', a.relu())
case('silu', F.silu(a))
case('gelu', F.gelu(a))
case('gelu_tanh', F.gelu(a, approximate='tanh'))
case('reciprocal', pos.reciprocal())
case('square', a.square())
case('floor', wide.floor())
case('round', wide.round())
case('sign', ints.sign())
case('erf', a.erf())
case('sin', a.sin())
case('cos', a.cos())
case('clamp', a.clamp(-0.5, 0.5))
case('clamp_min', a.clamp(min=0.1))
case('clamp_max', a.clamp(max=-0.2))
case('maximum', torch.maximum(a, b))
case('minimum', torch.minimum(a, b))
case('maximum_broadcast', torch.maximum(a, row))
case('where', torch.where(cond, a, b))
case('where_broadcast', torch.where(cond, a, row))
case('masked_fill', a.masked_fill(cond, -1.25))
case('eq', ints == ints2)
case('ne', ints != ints2)
case('lt', ints < ints2)
case('le', ints <= ints2)
case('gt', ints > ints2)
case('ge', ints >= ints2)
case('eq_scalar', ints == 0)
case('lt_scalar', a < 0.5)
case('ge_scalar', ints >= 1)
case('isfinite', special.isfinite())
case('isnan', special.isnan())
case('logical_not', cond.logical_not())
case('logical_and', cond.logical_and(cond2))
case('logical_or', cond.logical_or(cond2))


# ---- in place (what the optimizers use): each on a clone
case('add_', a.clone().add_(b, alpha=2))
case('add_scalar_', a.clone().add_(0.25))
case('sub_', a.clone().sub_(b, alpha=3))
case('mul_', a.clone().mul_(b))
case('mul_scalar_', a.clone().mul_(0.9))
case('div_', a.clone().div_(pos))
case('div_scalar_', a.clone().div_(7))
case('addcmul_', a.clone().addcmul_(b, pos, value=-0.5))
case('addcdiv_', a.clone().addcdiv_(b, pos, value=0.1))
case('lerp_', a.clone().lerp_(b, 0.3))
case('clamp_', a.clone().clamp_(-0.4, 0.6))
case('sqrt_', pos.clone().sqrt_())
case('neg_', a.clone().neg_())
case('fill_', a.clone().fill_(2.5))
case('zero_', a.clone().zero_())
case('copy_broadcast', a.clone().copy_(row))

# ---- reductions
case('sum_all', a.sum())
case('sum_dim', x4.sum(1))
case('sum_dims_keepdim', x4.sum((1, 3), keepdim=True))
case('sum_negative_dim', x4.sum(-1))
case('sum_int64', i64.sum())
case('sum_dtype_float64', a.sum(1, dtype=torch.float64))
case('mean_all', x4.mean())
case('mean_dims', x4.mean((2, 3)))
case('mean_keepdim', x4.mean(0, keepdim=True))
case('max_all', a.max())
case('min_all', a.min())
case('max_dim', a.max(1))
case('max_dim_keepdim', x4.max(2, keepdim=True))
case('min_dim', a.min(0))
case('amax', x4.amax((1, 3)))
case('amax_keepdim', x4.amax(-1, keepdim=True))
case('amin', x4.amin(2))
case('argmax_all', a.argmax())
case('argmax_dim', x4.argmax(-1))
case('argmin_dim_keepdim', x4.argmin(1, keepdim=True))
case('norm', a.norm())
case('norm_p1_dims', x4.norm(p=1, dim=(2, 3)))
case('norm_dim_keepdim', a.norm(2, dim=1, keepdim=True))
case('var_all', a.var())
case('var_dim', x4.var(1))
case('var_biased_keepdim', x4.var((2, 3), unbiased=False, keepdim=True))
case('prod', pos.prod())
case('all', cond.all())
case('any', cond.any())

# ---- shapes
case('reshape', x4.reshape(6, 20))
case('reshape_infer', x4.reshape(-1, 5))
case('view', x4.view(2, 12, 5))
case('permute', x4.permute(2, 0, 3, 1))
case('transpose', x4.transpose(1, 3))
case('transpose_contiguous', x4.transpose(0, 2).contiguous())
case('t', a.t())
case('flatten', x4.flatten())
case('flatten_range', x4.flatten(1, 2))
case('unsqueeze', a.unsqueeze(1))
case('unsqueeze_negative', a.unsqueeze(-1))
case('squeeze', sq.squeeze())
case('squeeze_dim', sq.squeeze(2))
case('expand', col.expand(3, 5))
case('expand_new_dim', col.expand(2, -1, 4))
case('repeat', a.repeat(2, 1, 3))
case('chunk', seven.chunk(3))
case('chunk_dim', x4.chunk(2, dim=3))
case('split_int', seven.split(2))
case('split_sizes', x4.split([1, 3, 1], dim=3))
case('cat', torch.cat([a, b]))
case('cat_dim1', torch.cat([a, b, a], 1))
case('stack', torch.stack([a, b]))
case('stack_dim2', torch.stack([a, b], 2))
case('narrow', x4.narrow(2, 1, 2))
case('slice_step', x4[:, :, ::2])
case('slice_start_end_step', x4[..., 1:5:3])
case('slice_negative', a[:, -3:-1])
case('select', x4[:, 1])
case('index_select', x4.index_select(3, idx))
case('gather', a.gather(1, gidx))
case('flip', x4.flip([0, 3]))

# ---- linear algebra
case('matmul_2d', A @ B)
case('matmul_batched_broadcast', Ab @ B)
case('matmul_vector', A @ vec5)
case('matmul_batched', Ab @ Bb)
case('matmul_float64', A64 @ B64)
case('mm', A.mm(B))
case('bmm', Ab.bmm(Bb))
case('baddbmm', base.baddbmm(Ab, Bb, beta=0.5, alpha=2))
case('linear', F.linear(Ab, lin_w, lin_b))
case('linear_no_bias', F.linear(A, lin_w))
case('einsum', torch.einsum('bij,bjk->bik', Ab, Bb))

# ---- nn functional
case('conv2d', F.conv2d(img, convw, convb))
case('conv2d_stride_padding', F.conv2d(img, convw, convb, stride=2, padding=1))
case('conv2d_groups', F.conv2d(img, convw_g, convb, padding=1, groups=2))
case('conv2d_dilation_no_bias', F.conv2d(img, convw, None, padding=2, dilation=2))
case('conv2d_asymmetric', F.conv2d(img, convw, convb, stride=(1, 2), padding=(0, 1)))
case('conv2d_1x1', F.conv2d(img, convw_1x1))
case('group_norm', F.group_norm(img, 2, gn_w, gn_b))
case('group_norm_no_affine', F.group_norm(img, 4))
case('group_norm_one_group_eps', F.group_norm(img, 1, gn_w, gn_b, eps=1e-2))
case('layer_norm', F.layer_norm(x4, [5], ln_w, ln_b))
case('layer_norm_2d_no_affine', F.layer_norm(x4, [4, 5]))
case('softmax_last', x4.softmax(-1))
case('softmax_dim1', x4.softmax(1))
case('log_softmax_last', x4.log_softmax(-1))
case('log_softmax_dim0', x4.log_softmax(0))
case('softmax_float64', A64.softmax(-1))
case('interp_nearest_size', F.interpolate(img, size=(9, 4), mode='nearest'))
case('interp_nearest_scale2', F.interpolate(img, scale_factor=2, mode='nearest'))
case('interp_nearest_scale1_5', F.interpolate(img, scale_factor=1.5, mode='nearest'))
case('interp_bilinear_size', F.interpolate(img, size=(4, 9), mode='bilinear'))
case('interp_bilinear_scale2', F.interpolate(img, scale_factor=2, mode='bilinear'))
case('interp_bilinear_scale_half', F.interpolate(img, scale_factor=0.5, mode='bilinear'))
case('interp_bilinear_align_corners', F.interpolate(img, size=(11, 7), mode='bilinear', align_corners=True))
case('avg_pool2d', F.avg_pool2d(img, 2))
case('avg_pool2d_stride_padding', F.avg_pool2d(img, 3, 2, 1))
case('pad_constant', F.pad(img, (1, 2, 0, 1), value=0.5))
case('pad_constant_last_dim', F.pad(a, (2, 1)))
case('pad_reflect', F.pad(img, (1, 1, 2, 0), mode='reflect'))
case('pad_replicate', F.pad(img, (2, 0, 1, 1), mode='replicate'))
case('mse_mean', F.mse_loss(a, b))
case('mse_sum', F.mse_loss(a, b, reduction='sum'))
case('mse_none', F.mse_loss(a, b, reduction='none'))
case('embedding', F.embedding(emb_idx, emb_w))


def attention(q, k, v, scale=None, mask=None, causal=False):
    """softmax(q kᵀ · scale + mask) v, in float64 from the float32 inputs (1.13 has no SDPA)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float('-inf')) if mask.dtype == torch.bool else scores + mask.double()
    if causal:
        keep = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float('-inf'))
    return (scores.softmax(-1) @ v).float()


case('sdpa', attention(q, k, v))
case('sdpa_scale', attention(q, k, v, scale=0.3))
case('sdpa_float_mask', attention(q, k, v, mask=att_mask))
case('sdpa_bool_mask', attention(q, k, v, mask=att_bool))
case('sdpa_causal', attention(q, k, v, causal=True))

# ---- dtype conversions
case('to_bfloat16', casts.bfloat16())
case('bfloat16_bits', casts.bfloat16().view(torch.int16).to(torch.int32) & 0xFFFF)
case('bfloat16_round_trip', casts.bfloat16().float())
case('to_float16', casts.half())
case('float16_bits', casts.half().view(torch.int16).to(torch.int32) & 0xFFFF)
case('float16_round_trip', casts.half().float())
case('float32_to_float64', casts.double())
case('float_to_int64', trunc.long())                              # truncation toward zero
case('int64_to_float32', i64.float())
case('float_to_int32', wide.int())
case('bool_to_float', cond.float())
case('float_to_bool', ints.bool())
case('bfloat16_mul', (a.bfloat16() * b.bfloat16()))
case('bfloat16_add_scalar', (a.bfloat16() + 0.1))

# ---- random: exact values of the CPU generator
g = torch.Generator().manual_seed(42)
case('randn_seed42', torch.randn(5, generator=g))
g = torch.Generator().manual_seed(7)
case('randn_vectorized', torch.randn(4, 25, generator=g))             # >= 16 elements: the vectorized path
g = torch.Generator().manual_seed(8)
case('randn_float64', torch.randn(20, generator=g, dtype=torch.float64))
g = torch.Generator().manual_seed(3)
case('rand', torch.rand(3, 7, generator=g))
g = torch.Generator().manual_seed(4)
case('rand_float64', torch.rand(6, generator=g, dtype=torch.float64))
g = torch.Generator().manual_seed(5)
case('randint', torch.randint(0, 10, (20,), generator=g))
g = torch.Generator().manual_seed(11)
case('random_sequence', [torch.randn(3, generator=g), torch.rand(4, generator=g),
                         torch.randint(-5, 5, (6,), generator=g), torch.randn(17, generator=g)])
g = torch.Generator().manual_seed(12)
case('normal_uniform_inplace', [torch.empty(10).normal_(2.0, 0.5, generator=g), torch.empty(10).uniform_(-1, 3, generator=g)])
g = torch.Generator().manual_seed(2 ** 40 + 5)
case('big_seed', torch.randn(4, generator=g))
g = torch.Generator().manual_seed(9)
torch.randn(10, generator=g)
state = g.get_state()
after_state = torch.randn(8, generator=g)
g.set_state(state)
assert torch.equal(after_state, torch.randn(8, generator=g))
case('generator_state', [state, after_state])
torch.manual_seed(123)
case('default_generator', [torch.randn(6), torch.rand(3)])
torch.manual_seed(77)
case('dropout', F.dropout(torch.ones(4, 5), 0.3, True))

# ---- autograd: gradients by PyTorch's autograd (float32)
grads = {}


def grad_case(name, fn, *names):
    leaves = [inputs[n].clone().requires_grad_() for n in names]
    loss = fn(*leaves)
    loss.backward()
    grads[name] = {'inputs': list(names), 'loss': enc(loss), 'out': enc([t.grad for t in leaves])}


grad_case('silu_linear', lambda x, w, b: (F.silu(x @ w.t() + b) ** 2).sum(), 'A', 'lin_w', 'lin_b')
grad_case('group_norm', lambda x, w, b: (F.group_norm(x, 2, w, b) * r_img).sum(), 'img', 'gn_w', 'gn_b')
grad_case('conv2d', lambda x, w, b: (F.conv2d(x, w, b, stride=2, padding=1) * r_conv).sum(), 'img', 'convw', 'convb')
grad_case('conv2d_groups', lambda x, w: (F.conv2d(x, w, None, padding=1, groups=2) ** 2).mean(), 'img', 'convw_g')
grad_case('attention', lambda q, k, v: ((q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ v * r_att).sum(), 'q', 'k', 'v')
grad_case('attention_mask', lambda q, k, v: ((q @ k.transpose(-1, -2) * 0.3 + att_mask).softmax(-1) @ v * r_att).sum(), 'q', 'k', 'v')
grad_case('layer_norm_gelu', lambda x, w, b: (F.gelu(F.layer_norm(x, [5], w, b)) * r_x4).sum(), 'x4', 'ln_w', 'ln_b')
grad_case('log_softmax', lambda x: (x.log_softmax(1) * r_x4).sum(), 'x4')
grad_case('interp_pool_mse', lambda x: F.mse_loss(F.avg_pool2d(F.interpolate(x, scale_factor=2, mode='bilinear'), 2), r_img), 'img')
grad_case('embedding', lambda w: (F.embedding(emb_idx, w) ** 2).sum(), 'emb_w')
grad_case('reductions', lambda x: x.amax(-1).sum() + x.var(1).mean() + x.norm() + x.mean((2, 3)).tanh().sum(), 'x4')

ref = {
    'meta': {
        'generator': 'scripts/make-op-reference.py',
        'torch': torch.__version__,
        'numpy': np.__version__,
        'python': sys.version.split()[0],
        'num_threads': torch.get_num_threads(),
    },
    'inputs': {name: enc(t) for name, t in inputs.items()},
    'cases': cases,
    'grads': grads,
}
text = json.dumps(ref, separators=(',', ':'), allow_nan=False)
os.makedirs(os.path.dirname(OUT), exist_ok=True)
with open(OUT, 'w') as f:
    f.write(text + '\n')
print(f'wrote {os.path.relpath(OUT)}: {len(inputs)} inputs, {len(cases)} cases, {len(grads)} gradient cases, '
      f'{len(text) / 1e6:.2f} MB')
