// transformers' CLIPTextModel (modeling_clip.py, 4.45): the text encoder of Stable Diffusion. Paths equal
// the checkpoint's keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`), the config is the
// component's config.json with transformers' field names and defaults, and the numbers match its eager
// attention path.
import { join } from 'node:path';
import * as torch from '../torch.js';
import { Module, buffer } from '../nn/module.js';
import { tidy } from '../scope.js';
import { Embedding, LayerNorm, Linear } from '../nn/layers.js';
import type { DType } from '../dtype.js';
import type { Tensor } from '../tensor.js';
import { CLIP_ACTIVATIONS, CLIPEncoder, type CLIPActivation, type CLIPEncoderConfig, type Init } from './clip_encoder.js';
import { CONFIG_LIMITS, ConfigFields, type ConfigSource } from './config.js';
import { loadModelWeights, pretrainedDir, readConfig, type FromPretrainedOptions } from './loading.js';
import { checkModelFits, linearParams, normParams } from './model_size.js';

/** CLIPTextConfig's fields the model reads (config.json names). */
export interface CLIPTextConfig extends CLIPEncoderConfig {
  vocab_size: number;
  max_position_embeddings: number;
  /** Selects the pooled token (see poolIndices). */
  eos_token_id: number;
  /** Read for completeness: pooling never uses it, as the pad id may equal the eos id. null: none. */
  pad_token_id: number | null;
  /** Width of CLIPTextModelWithProjection's text_projection (read only by that model). */
  projection_dim: number;
}

// CLIPTextConfig's defaults (transformers 4.45), used where config.json omits a field.
const DEFAULTS: CLIPTextConfig = {
  vocab_size: 49408, hidden_size: 512, intermediate_size: 2048, num_hidden_layers: 12, num_attention_heads: 8,
  max_position_embeddings: 77, hidden_act: 'quick_gelu', layer_norm_eps: 1e-5, attention_dropout: 0,
  pad_token_id: 1, eos_token_id: 49407, projection_dim: 512,
};

const source = (file?: string, model = 'CLIPTextModel'): ConfigSource => ({ model, file });

/** Validates config.json against what this model implements; an error names the file, the field and the value. */
export function parseCLIPTextConfig(raw: Record<string, unknown>, file?: string, model = 'CLIPTextModel'): CLIPTextConfig {
  // transformers' configs carry many fields this model does not read (architectures, bos_token_id, …): not checked
  const f = new ConfigFields(raw, source(file, model), DEFAULTS as unknown as Record<string, unknown>, (k) => k);
  const vocab = f.int('vocab_size', { max: CONFIG_LIMITS.vocab });
  const c: CLIPTextConfig = {
    vocab_size: vocab,
    hidden_size: f.int('hidden_size'),
    intermediate_size: f.int('intermediate_size'),
    num_hidden_layers: f.int('num_hidden_layers', { max: CONFIG_LIMITS.layers }),
    num_attention_heads: f.int('num_attention_heads'),
    max_position_embeddings: f.int('max_position_embeddings'),
    layer_norm_eps: f.number('layer_norm_eps', { above: 0 }),
    attention_dropout: f.number('attention_dropout', { min: 0, max: 1 }),
    // pooling looks for this id in the input: one outside the vocabulary would pool at position 0 silently
    eos_token_id: f.int('eos_token_id', { min: 0, max: vocab - 1 }),
    pad_token_id: f.value('pad_token_id') === null ? null : f.int('pad_token_id', { min: 0, max: vocab - 1 }),
    hidden_act: f.choice('hidden_act', Object.keys(CLIP_ACTIVATIONS) as CLIPActivation[]),
    projection_dim: f.int('projection_dim'),
  };
  if (c.hidden_size % c.num_attention_heads !== 0) {
    f.fail('num_attention_heads', `(${c.num_attention_heads}) must divide hidden_size (${c.hidden_size})`);
  }
  return c;
}

/** Parameters of the CLIPTextModel `c` describes, counted as the constructor builds it. */
export function clipTextParameterCount(c: CLIPTextConfig): number {
  const h = c.hidden_size;
  // q, k, v, out projections; two LayerNorms; fc1, fc2
  const layer = 4 * linearParams(h, h) + 2 * normParams(h) + linearParams(h, c.intermediate_size) + linearParams(c.intermediate_size, h);
  return (c.vocab_size + c.max_position_embeddings) * h + c.num_hidden_layers * layer + normParams(h);
}

/** Token embedding plus learned absolute position embedding. */
export class CLIPTextEmbeddings extends Module {
  token_embedding: Embedding;
  position_embedding: Embedding;
  /** arange(max_position_embeddings) as [1, max]; non-persistent, so not in the 4.45 checkpoint. */
  position_ids: Tensor;

  constructor(c: CLIPTextConfig, o: Init = {}) {
    super();
    this.token_embedding = new Embedding(c.vocab_size, c.hidden_size, o);
    this.position_embedding = new Embedding(c.max_position_embeddings, c.hidden_size, o);
    // tidy: the arange itself is freed; only its [1, L] view is kept as the buffer
    this.position_ids = buffer(tidy(() => torch.arange(c.max_position_embeddings, undefined, 1, { dtype: 'int64', device: o.device }).unsqueeze(0)), false);
  }

  forward(inputIds: Tensor): Tensor {
    const length = inputIds.shape[inputIds.ndim - 1] ?? 0;
    const max = this.position_ids.shape[1] ?? 0;
    if (length > max) throw new Error(`CLIPTextEmbeddings: sequence length ${length} exceeds max_position_embeddings ${max}`);
    const positions = this.position_ids.slice(1, 0, length);
    return this.token_embedding.forward(inputIds).add(this.position_embedding.forward(positions));
  }
}

export interface CLIPTextForwardOptions {
  /** [B, L], 1 = attend, 0 = padding; combined with the causal mask as transformers does. */
  attentionMask?: Tensor | null;
  /** Also return the embeddings and every layer's output (for clip skip). */
  outputHiddenStates?: boolean;
}

export interface CLIPTextModelOutput {
  /** [B, L, D] after final_layer_norm: SD's encoder_hidden_states. */
  lastHiddenState: Tensor;
  /** [B, D]: last_hidden_state at the eos token of each sequence. */
  poolerOutput: Tensor;
  /**
   * num_hidden_layers + 1 tensors: the embeddings, then each layer's output, before final_layer_norm.
   * Clip skip n uses final_layer_norm(hiddenStates[length - 1 - n]), as diffusers' encode_prompt.
   */
  hiddenStates?: Tensor[];
}

/** Embeddings, causal pre-norm encoder, final LayerNorm, eos pooling. */
export class CLIPTextTransformer extends Module {
  embeddings: CLIPTextEmbeddings;
  encoder: CLIPEncoder;
  final_layer_norm: LayerNorm;
  readonly eosTokenId: number;

  constructor(c: CLIPTextConfig, o: Init = {}) {
    super();
    this.embeddings = new CLIPTextEmbeddings(c, o);
    this.encoder = new CLIPEncoder(c, o);
    this.final_layer_norm = new LayerNorm(c.hidden_size, c.layer_norm_eps, true, o);
    this.eosTokenId = c.eos_token_id;
  }

  forward(inputIds: Tensor, o: CLIPTextForwardOptions = {}): CLIPTextModelOutput {
    // 1. ids as [B, L] (transformers flattens any leading dims)
    const ids = inputIds.view(-1, inputIds.shape[inputIds.ndim - 1] ?? 0);
    // 2. embeddings
    const embeddings = this.embeddings.forward(ids);
    // 3. causal mask, plus the padding mask when given
    const mask = attentionBias(ids, embeddings.dtype, o.attentionMask ?? null);
    // 4. encoder
    const hiddenStates: Tensor[] | undefined = o.outputHiddenStates ? [] : undefined;
    const encoded = this.encoder.forward(embeddings, mask, hiddenStates);
    // 5. final LayerNorm; pooled output at each sequence's eos token
    const lastHiddenState = this.final_layer_norm.forward(encoded);
    const poolerOutput = pool(lastHiddenState, poolIndices(ids, this.eosTokenId));
    return hiddenStates ? { lastHiddenState, poolerOutput, hiddenStates } : { lastHiddenState, poolerOutput };
  }
}

/** torch.finfo(dtype).min: transformers masks with it rather than -inf. */
function finfoMin(dtype: DType): number {
  switch (dtype) {
    case 'float16': return -65504;
    case 'bfloat16': return -3.3895313892515355e38;
    case 'float64': return -Number.MAX_VALUE;
    default: return -3.4028234663852886e38;
  }
}

/**
 * The additive attention bias: finfo.min above the diagonal ([L, L]), plus finfo.min at padded keys
 * ([B, 1, 1, L] → [B, 1, L, L]) when a padding mask is given (_create_4d_causal_attention_mask and
 * _prepare_4d_attention_mask). Adding the two is what transformers' SDPA path does; its eager path adds
 * them to the scores one after the other, which masks the same positions.
 */
function attentionBias(ids: Tensor, dtype: DType, attentionMask: Tensor | null): Tensor {
  const [b, l] = ids.shape as [number, number];
  const min = finfoMin(dtype);
  const pos = torch.arange(l, undefined, 1, { device: ids.device });
  const causal = torch.zeros([l, l], { dtype, device: ids.device }).maskedFill(pos.unsqueeze(0).gt(pos.unsqueeze(1)), min);
  if (!attentionMask) return causal;
  if (attentionMask.shape.join() !== `${b},${l}`) {
    throw new Error(`CLIPTextModel: attentionMask must be [${b}, ${l}] like the input ids, got [${attentionMask.shape.join(', ')}]`);
  }
  // 1 - mask, with every non-zero entry set to finfo.min
  const inverted = attentionMask.to({ dtype, device: ids.device }).neg().add(1).view(b, 1, 1, l);
  return causal.add(inverted.maskedFill(inverted.ne(0), min));
}

/**
 * The pooled position per sequence. eos_token_id == 2 is the legacy config (before the tokenizer's
 * real eos id was written to it): the largest id, which is eos in CLIP's vocabulary. Otherwise the first
 * eos, since the pad id may equal the eos id.
 */
function poolIndices(ids: Tensor, eosTokenId: number): Tensor {
  const asInt = ids.to('int32');
  return eosTokenId === 2 ? asInt.argmax(-1) : asInt.eq(eosTokenId).to('int32').argmax(-1);
}

/** hidden[b, index[b], :] for every b. */
function pool(hidden: Tensor, index: Tensor): Tensor {
  const [b, , d] = hidden.shape as [number, number, number];
  return hidden.gather(1, index.to({ dtype: 'int64', device: hidden.device }).view(b, 1, 1).expand(b, 1, d)).squeeze(1);
}

/** Builds the config and checks the size before any weight exists (a config asking for more than the machine holds must not abort the process). */
function checkedConfig(config: Record<string, unknown>, model: string, configFile: string | undefined, init: Init, extraParams: (c: CLIPTextConfig) => number): CLIPTextConfig {
  const c = parseCLIPTextConfig(config, configFile, model);
  checkModelFits(source(configFile, model), clipTextParameterCount(c) + extraParams(c), init.dtype ?? 'float32', init.device ?? torch.getDefaultDevice(), {
    vocab_size: c.vocab_size, hidden_size: c.hidden_size, intermediate_size: c.intermediate_size,
    num_hidden_layers: c.num_hidden_layers, max_position_embeddings: c.max_position_embeddings,
  });
  return c;
}

/**
 * A text encoder folder (or a pipeline folder with `subfolder`): config.json and model.safetensors, built directly
 * in the target dtype/device (no float32 CPU copy first), loaded strictly, in eval mode and frozen, as
 * transformers' from_pretrained returns it and the training scripts freeze it.
 */
function loadPretrained<M extends Module>(pathOrId: string, o: FromPretrainedOptions, where: string, build: (config: Record<string, unknown>, init: Init & { configFile: string }) => M): M {
  const dir = pretrainedDir(pathOrId, o, where);
  const configFile = join(dir, 'config.json');
  const model = build(readConfig(dir), { dtype: o.dtype, device: o.device, configFile });
  try {
    loadModelWeights(model, dir, 'model', o, undefined, configFile);
  } catch (e) {
    model.dispose();
    throw e;
  }
  return model.eval().requiresGrad_(false);
}

export class CLIPTextModel extends Module {
  text_model: CLIPTextTransformer;
  readonly config: CLIPTextConfig;

  /**
   * From config.json's fields (validated; transformers' defaults fill the gaps); o places the parameters.
   * `configFile` (where the config came from) is named in errors.
   */
  constructor(config: Partial<CLIPTextConfig> | Record<string, unknown>, o: Init & { configFile?: string } = {}) {
    super();
    const { configFile, ...init } = o;
    this.config = checkedConfig(config as Record<string, unknown>, 'CLIPTextModel', configFile, init, () => 0);
    this.text_model = new CLIPTextTransformer(this.config, init);
  }

  /**
   * Recompute each encoder layer in backward instead of storing its activations (transformers'
   * gradient_checkpointing_enable): less memory when the encoder trains (LoRA), one more forward; same gradients.
   */
  enableGradientCheckpointing(on = true): this {
    this.text_model.encoder.gradientCheckpointing = on;
    return this;
  }

  /**
   * Encodes int64 token ids [B, L]. SD conditions on `lastHiddenState` (text_encoder(ids)[0]).
   */
  forward(inputIds: Tensor, o: CLIPTextForwardOptions = {}): CLIPTextModelOutput {
    return this.text_model.forward(inputIds, o);
  }

  /** A text encoder folder (or a pipeline folder with `subfolder: 'text_encoder'`), loaded strictly, frozen, in eval mode. */
  static fromPretrained(pathOrId: string, o: FromPretrainedOptions = {}): CLIPTextModel {
    return loadPretrained(pathOrId, o, 'CLIPTextModel.fromPretrained', (config, init) => new CLIPTextModel(config, init));
  }
}

export interface CLIPTextModelWithProjectionOutput {
  /** [B, projection_dim]: text_projection(pooled last_hidden_state): SDXL's pooled prompt embedding. */
  textEmbeds: Tensor;
  /** [B, L, D] after final_layer_norm. */
  lastHiddenState: Tensor;
  /** The embeddings and every layer's output, before final_layer_norm (SDXL conditions on the penultimate one). */
  hiddenStates?: Tensor[];
}

/**
 * transformers' CLIPTextModelWithProjection: the CLIP text transformer and a bias-free `text_projection` of the
 * pooled (eos) output. SDXL's second text encoder (OpenCLIP bigG): keys `text_model.…` and `text_projection.weight`.
 */
export class CLIPTextModelWithProjection extends Module {
  text_model: CLIPTextTransformer;
  text_projection: Linear;
  readonly config: CLIPTextConfig;

  constructor(config: Partial<CLIPTextConfig> | Record<string, unknown>, o: Init & { configFile?: string } = {}) {
    super();
    const { configFile, ...init } = o;
    this.config = checkedConfig(config as Record<string, unknown>, 'CLIPTextModelWithProjection', configFile, init, (c) => linearParams(c.hidden_size, c.projection_dim, false));
    this.text_model = new CLIPTextTransformer(this.config, init);
    this.text_projection = new Linear(this.config.hidden_size, this.config.projection_dim, false, init);
  }

  /**
   * Recompute each encoder layer in backward instead of storing its activations (transformers'
   * gradient_checkpointing_enable): less memory when the encoder trains (LoRA), one more forward; same gradients.
   */
  enableGradientCheckpointing(on = true): this {
    this.text_model.encoder.gradientCheckpointing = on;
    return this;
  }

  /** Encodes int64 token ids [B, L]; `outputHiddenStates` also returns every layer's output. */
  forward(inputIds: Tensor, o: CLIPTextForwardOptions = {}): CLIPTextModelWithProjectionOutput {
    const out = this.text_model.forward(inputIds, o);
    const textEmbeds = this.text_projection.forward(out.poolerOutput);
    return out.hiddenStates ? { textEmbeds, lastHiddenState: out.lastHiddenState, hiddenStates: out.hiddenStates } : { textEmbeds, lastHiddenState: out.lastHiddenState };
  }

  /** A text encoder folder (or a pipeline folder with `subfolder: 'text_encoder_2'`), loaded strictly, frozen, in eval mode. */
  static fromPretrained(pathOrId: string, o: FromPretrainedOptions = {}): CLIPTextModelWithProjection {
    return loadPretrained(pathOrId, o, 'CLIPTextModelWithProjection.fromPretrained', (config, init) => new CLIPTextModelWithProjection(config, init));
  }
}
