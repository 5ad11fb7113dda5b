// CLIP's tokenizer as Stable Diffusion uses it: transformers' slow `CLIPTokenizer` read from a pipeline's
// tokenizer/ folder (vocab.json + merges.txt), without ftfy. Per prompt:
//   1. special tokens typed literally (`<|endoftext|>`) are split out first and kept whole;
//   2. basic cleaning, as transformers' BasicTokenizer(strip_accents=False, do_split_on_punc=False) when ftfy
//      is absent: control characters dropped, whitespace collapsed, CJK ideographs split apart, NFC,
//      lower-case;
//   3. CLIP's regex splits words, single digits and punctuation runs;
//   4. each piece's UTF-8 bytes map to printable characters (GPT-2's byte table) and byte-level BPE merges
//      them, the last symbol of a word carrying `</w>`;
//   5. BOS + ids + EOS, truncated (EOS kept) and padded with `<|endoftext|>` to 77, as the training script's
//      `tokenizer(captions, max_length=77, padding="max_length", truncation=True)`.
// With ftfy installed, transformers runs ftfy.fix_text instead of step 2 (it un-curls quotes, for example);
// the goldens and this file follow the no-ftfy path.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { tensor } from '../torch.js';
import type { Device, Tensor } from '../tensor.js';
import { readJsonObject, readTextFile } from '../io/files.js';
import { CONFIG_LIMITS, show } from './config.js';
import { pretrainedDir, type FromPretrainedOptions } from './loading.js';

const snakeOf = (k: string): string => k.replace(/[A-Z]/g, (m) => `_${m.toLowerCase()}`);

export interface TokenizerCallOptions {
  /** Defaults to `modelMaxLength` when truncating or padding to 'max_length'. */
  maxLength?: number;
  /** 'max_length' pads to maxLength; 'longest' (or true) to the batch's longest; false (default) not at all. */
  padding?: 'max_length' | 'longest' | boolean;
  /**
   * Cut the content tokens so that BOS + content + EOS fits maxLength (EOS stays last). Default as in
   * transformers: on when maxLength is given without padding, off otherwise.
   */
  truncation?: boolean;
}

export interface BatchEncoding {
  inputIds: number[][];
  /** 1 for real tokens (BOS and EOS included), 0 for padding. */
  attentionMask: number[][];
}

export interface DecodeOptions {
  /** Drop BOS/EOS/PAD/UNK (default false, as in transformers). */
  skipSpecialTokens?: boolean;
  /** transformers' clean_up_tokenization (" ," → ",", " n't" → "n't", …); default from tokenizer_config, else false. */
  cleanUpTokenizationSpaces?: boolean;
}

/** What tokenizer_config.json / special_tokens_map.json hold; every field may be overridden. */
export interface CLIPTokenizerConfig {
  modelMaxLength: number;
  bosToken: string;
  eosToken: string;
  /** `<|endoftext|>` for SD 1.x; SD 2.x tokenizers use `!` (id 0). */
  padToken: string;
  unkToken: string;
  cleanUpTokenizationSpaces: boolean;
}

const DEFAULTS: CLIPTokenizerConfig = {
  // CLIP's text model has 77 positions; transformers knows this per checkpoint name when the config omits it.
  modelMaxLength: 77,
  bosToken: '<|startoftext|>',
  eosToken: '<|endoftext|>',
  padToken: '<|endoftext|>',
  unkToken: '<|endoftext|>',
  cleanUpTokenizationSpaces: false,
};

// transformers' CLIP pattern (compiled with the `regex` module and re.IGNORECASE).
const CLIP_PATTERN = /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+/giu;
const UTF8 = new TextEncoder();
const CONTROL = /^\p{C}$/u;
const SPACE_SEPARATOR = /^\p{Zs}$/u;

/** GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to U+0100 upwards. */
export function bytesToUnicode(): string[] {
  const table = new Array<string>(256);
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  let n = 0;
  for (let b = 0; b < 256; b++) table[b] = String.fromCharCode(printable(b) ? b : 256 + n++);
  return table;
}

/** BERT's CJK ranges (BasicTokenizer._is_chinese_char): these get spaces around them. */
function isChineseChar(cp: number): boolean {
  return (cp >= 0x4e00 && cp <= 0x9fff) || (cp >= 0x3400 && cp <= 0x4dbf) || (cp >= 0x20000 && cp <= 0x2a6df) ||
    (cp >= 0x2a700 && cp <= 0x2b73f) || (cp >= 0x2b740 && cp <= 0x2b81f) || (cp >= 0x2b820 && cp <= 0x2ceaf) ||
    (cp >= 0xf900 && cp <= 0xfaff) || (cp >= 0x2f800 && cp <= 0x2fa1f);
}

/** BasicTokenizer.tokenize(text) joined with spaces: the cleaning transformers does when ftfy is absent. */
export function basicClean(text: string): string {
  let out = '';
  for (const ch of text) {
    const cp = ch.codePointAt(0) ?? 0;
    if (ch === ' ' || ch === '\t' || ch === '\n' || ch === '\r' || SPACE_SEPARATOR.test(ch)) out += ' ';
    else if (cp === 0 || cp === 0xfffd || CONTROL.test(ch)) continue;
    else if (isChineseChar(cp)) out += ` ${ch} `;
    else out += ch;
  }
  // Python's str.split() then lower() per word (lower-casing per word keeps final-sigma context the same).
  return out.normalize('NFC').split(/\s+/u).filter((w) => w.length > 0).map((w) => w.toLowerCase()).join(' ');
}

/** Ids are safe integers below this (transformers' vocabularies are far smaller). */
const MAX_TOKEN_ID = CONFIG_LIMITS.vocab;
const tokenShown = (t: string): string => show(t);

/**
 * A vocabulary as token → id: every id a non-negative integer below MAX_TOKEN_ID and no id given to two
 * tokens (the decoder would keep one silently). `where` names the source in errors.
 */
export function checkVocab(vocab: Readonly<Record<string, unknown>>, where: string): Record<string, number> {
  const entries = Object.entries(vocab);
  if (entries.length === 0) throw new Error(`${where} holds no tokens`);
  const owner = new Map<number, string>();
  for (const [token, id] of entries) {
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0 || id >= MAX_TOKEN_ID) {
      throw new Error(`${where}: token ${tokenShown(token)} has id ${show(id)}; ids must be integers in [0, ${MAX_TOKEN_ID})`);
    }
    const other = owner.get(id);
    if (other !== undefined) throw new Error(`${where}: tokens ${tokenShown(other)} and ${tokenShown(token)} both have id ${id}; each id must name one token`);
    owner.set(id, token);
  }
  return vocab as Record<string, number>;
}

/** As transformers reads merges.txt: the first line is the "#version" header, then one "first second" rule a line. */
function readMerges(path: string): string[] {
  const lines = readTextFile(path, 'merges.txt').trim().split('\n');
  const where = `merges.txt '${path}'`;
  // transformers drops the first line unread: without the header that would silently drop the first merge
  if (!lines[0]?.startsWith('#')) throw new Error(`${where} line 1: expected the '#version: …' header, got ${show(lines[0] ?? '')}`);
  // keep at most 49152 - 256 - 2 merges, as transformers does
  const merges = lines.slice(1, 49152 - 256 - 2 + 1);
  merges.forEach((m, i) => {
    const parts = m.trim().split(/\s+/);
    if (parts.length !== 2 || parts[0] === '') throw new Error(`${where} line ${i + 2}: ${show(m)} is not a merge rule (two tokens separated by a space)`);
  });
  return merges;
}

type SpecialField = 'bosToken' | 'eosToken' | 'padToken' | 'unkToken';
const SPECIAL_KEYS: Record<string, SpecialField> = { bos_token: 'bosToken', eos_token: 'eosToken', pad_token: 'padToken', unk_token: 'unkToken' };

/** A special token's text (a string or an AddedToken object {content}); anything else is an error naming the file and field. */
function tokenText(v: unknown, where: string): string {
  const text = typeof v === 'string' ? v : v && typeof v === 'object' && !Array.isArray(v) ? (v as { content?: unknown }).content : undefined;
  if (typeof text !== 'string' || text === '') {
    throw new Error(`${where} must be a non-empty token string or an AddedToken object {"content": "…"}, got ${show(v)}`);
  }
  return text;
}

/**
 * tokenizer_config.json / special_tokens_map.json: the special tokens, model_max_length,
 * clean_up_tokenization_spaces and added_tokens_decoder, each checked. Returns what the file sets and, per
 * special token, that it came from this file (for errors about it later).
 */
function readTokenizerConfig(path: string, name: string, config: Partial<CLIPTokenizerConfig>, origin: Partial<Record<SpecialField, string>>, added: Record<string, number>): void {
  const j = readJsonObject(path, name);
  const where = (key: string): string => `${name} '${path}': '${key}'`;
  for (const [key, field] of Object.entries(SPECIAL_KEYS)) {
    if (j[key] === undefined) continue;
    config[field] = tokenText(j[key], where(key));
    origin[field] = `${name} '${path}'`;
  }
  const max = j.model_max_length;
  if (max !== undefined) {
    if (typeof max !== 'number' || !Number.isInteger(max) || max < 2) throw new Error(`${where('model_max_length')} must be an integer ≥ 2 (room for BOS and EOS), got ${show(max)}`);
    // transformers stores "no limit" as a huge number (int(1e30)); CLIP has 77 positions whatever it says.
    if (max < 1e9) config.modelMaxLength = max;
  }
  const clean = j.clean_up_tokenization_spaces;
  if (clean !== undefined) {
    if (typeof clean !== 'boolean') throw new Error(`${where('clean_up_tokenization_spaces')} must be true or false, got ${show(clean)}`);
    config.cleanUpTokenizationSpaces = clean;
  }
  // do_lower_case is not read: the slow tokenizer's BasicTokenizer lower-cases whatever the config says.
  const decoder = j.added_tokens_decoder;
  if (decoder !== undefined) {
    if (decoder === null || typeof decoder !== 'object' || Array.isArray(decoder)) throw new Error(`${where('added_tokens_decoder')} must be an object of id → token, got ${show(decoder)}`);
    for (const [id, v] of Object.entries(decoder as Record<string, unknown>)) {
      const n = /^\d{1,15}$/.test(id) ? Number(id) : NaN;
      if (!(n < MAX_TOKEN_ID)) throw new Error(`${where('added_tokens_decoder')}: key ${show(id)} is not a token id (an integer in [0, ${MAX_TOKEN_ID}))`);
      added[tokenText(v, `${where('added_tokens_decoder')}[${id}]`)] = n;
    }
  }
}

export class CLIPTokenizer {
  readonly config: CLIPTokenizerConfig;
  private readonly encoder: Map<string, number>;
  private readonly decoder: Map<number, string>;
  /** "first second" → rank. */
  private readonly ranks: Map<string, number>;
  private readonly byteEncoder = bytesToUnicode();
  private readonly byteDecoder: Map<string, number>;
  /** Tokens kept whole when typed in a prompt, longest first. */
  private readonly addedTokens: string[];
  private readonly cache = new Map<string, string[]>();

  /**
   * @param vocab token → id (vocab.json)
   * @param merges merge rules in rank order, each "first second" (merges.txt without its header)
   * @param addedTokens extra token → id pairs (tokenizer_config's added_tokens_decoder, added_tokens.json)
   */
  constructor(vocab: Record<string, number>, merges: readonly string[], config: Partial<CLIPTokenizerConfig> = {}, addedTokens: Record<string, number> = {}) {
    this.config = { ...DEFAULTS, ...config };
    checkVocab(vocab, 'CLIPTokenizer: vocab');
    this.encoder = new Map(Object.entries(vocab));
    for (const [t, id] of Object.entries(addedTokens)) {
      // an empty added token would match everywhere and never advance the prompt splitter
      if (t === '' || typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0 || id >= MAX_TOKEN_ID) {
        throw new Error(`CLIPTokenizer: added token ${show(t)} → ${show(id)} must be a non-empty token with an integer id in [0, ${MAX_TOKEN_ID})`);
      }
      this.encoder.set(t, id);
    }
    this.decoder = new Map([...this.encoder].map(([t, id]) => [id, t]));
    this.ranks = new Map();
    merges.forEach((m, i) => {
      const parts = m.trim().split(/\s+/);
      if (parts.length === 2) this.ranks.set(`${parts[0]} ${parts[1]}`, i);
    });
    this.byteDecoder = new Map(this.byteEncoder.map((c, b) => [c, b]));
    const { bosToken, eosToken, padToken, unkToken } = this.config;
    for (const [name, t] of Object.entries({ bosToken, eosToken, padToken, unkToken })) {
      if (typeof t !== 'string' || t === '') throw new Error(`CLIPTokenizer: ${name} must be a non-empty string, got ${show(t)}`);
      if (!this.encoder.has(t)) throw new Error(`CLIPTokenizer: ${name} '${t}' is not in the vocabulary`);
    }
    const max = this.config.modelMaxLength;
    if (!Number.isInteger(max) || max < 2) throw new Error(`CLIPTokenizer: modelMaxLength must be an integer ≥ 2 (room for BOS and EOS), got ${show(max)}`);
    this.addedTokens = [...new Set([bosToken, eosToken, padToken, unkToken, ...Object.keys(addedTokens)])].sort((a, b) => b.length - a.length);
    // Special tokens matched by the regex bypass BPE (transformers seeds its BPE cache with them).
    for (const t of ['<|startoftext|>', '<|endoftext|>']) this.cache.set(t, [t]);
  }

  /**
   * Reads a tokenizer folder: `fromPretrained('runwayml/stable-diffusion-v1-5', { subfolder: 'tokenizer' })`
   * or a local path. Needs vocab.json and merges.txt; tokenizer_config.json and special_tokens_map.json
   * are optional (special_tokens_map wins over tokenizer_config, as in transformers). `overrides` wins over both.
   */
  static fromPretrained(pathOrId: string, o: FromPretrainedOptions = {}, overrides: Partial<CLIPTokenizerConfig> = {}): CLIPTokenizer {
    const dir = pretrainedDir(pathOrId, o, 'CLIPTokenizer.fromPretrained');
    for (const f of ['vocab.json', 'merges.txt']) {
      if (!existsSync(join(dir, f))) {
        const hint = !o.subfolder && existsSync(join(dir, 'tokenizer', f)) ? ` It is in '${join(dir, 'tokenizer')}': pass { subfolder: 'tokenizer' }.` : '';
        throw new Error(`CLIPTokenizer: missing ${f} in '${dir}'. A CLIP tokenizer folder holds vocab.json and merges.txt (a diffusers pipeline has them in tokenizer/).${hint}`);
      }
    }
    // every file read without blocking (a FIFO is refused) and checked, each error naming the file and entry
    const vocabPath = join(dir, 'vocab.json');
    const vocab = checkVocab(readJsonObject(vocabPath, 'vocab.json'), `vocab.json '${vocabPath}'`);
    const merges = readMerges(join(dir, 'merges.txt'));
    const config: Partial<CLIPTokenizerConfig> = {};
    const origin: Partial<Record<SpecialField, string>> = {};
    const added: Record<string, number> = {};
    // special_tokens_map wins over tokenizer_config, as in transformers
    for (const name of ['tokenizer_config.json', 'special_tokens_map.json']) {
      const path = join(dir, name);
      if (existsSync(path)) readTokenizerConfig(path, name, config, origin, added);
    }
    const addedPath = join(dir, 'added_tokens.json');
    if (existsSync(addedPath)) {
      const where = `added_tokens.json '${addedPath}'`;
      for (const [t, id] of Object.entries(checkVocab(readJsonObject(addedPath, 'added_tokens.json'), where))) {
        if (t === '') throw new Error(`${where}: an added token must not be empty`);
        added[t] = id;
      }
    }
    for (const [field, file] of Object.entries(origin) as [SpecialField, string][]) {
      const t = config[field];
      if (t !== undefined && !Object.hasOwn(vocab, t) && !Object.hasOwn(added, t) && overrides[field] === undefined) {
        throw new Error(`${file}: '${snakeOf(field)}' ${show(t)} is not in vocab.json '${vocabPath}'`);
      }
    }
    return new CLIPTokenizer(vocab, merges, { ...config, ...overrides }, added);
  }

  get vocabSize(): number { return this.encoder.size; }
  get modelMaxLength(): number { return this.config.modelMaxLength; }
  get bosTokenId(): number { return this.id(this.config.bosToken); }
  get eosTokenId(): number { return this.id(this.config.eosToken); }
  get padTokenId(): number { return this.id(this.config.padToken); }
  get unkTokenId(): number { return this.id(this.config.unkToken); }
  /** BOS, EOS, PAD, UNK ids (deduplicated). */
  get allSpecialIds(): number[] { return [...new Set([this.bosTokenId, this.eosTokenId, this.padTokenId, this.unkTokenId])]; }

  /** A token's id; unknown tokens get the UNK id. */
  id(token: string): number {
    const id = this.encoder.get(token) ?? this.encoder.get(this.config.unkToken);
    if (id === undefined) throw new Error(`CLIPTokenizer: '${token}' and the unk token are not in the vocabulary`);
    return id;
  }

  /** The BPE tokens of a text ('a</w>', 'photo</w>', …), no BOS/EOS. */
  tokenize(text: string): string[] {
    const out: string[] = [];
    for (const piece of this.splitAddedTokens(text)) {
      if (piece.added) { out.push(piece.text); continue; }
      for (const m of basicClean(piece.text).matchAll(CLIP_PATTERN)) {
        const bytes = UTF8.encode(m[0]);
        let word = '';
        for (const b of bytes) word += this.byteEncoder[b];
        out.push(...this.bpe(word));
      }
    }
    return out;
  }

  /** Token ids of a text without BOS/EOS. */
  encode(text: string): number[] {
    return this.tokenize(text).map((t) => this.id(t));
  }

  /**
   * `tokenizer(texts, max_length=…, padding=…, truncation=…)`: BOS + ids + EOS per text; truncation keeps
   * the first maxLength − 2 content tokens and EOS; padding appends the pad id on the right.
   */
  call(texts: string | readonly string[], o: TokenizerCallOptions = {}): BatchEncoding {
    const list = typeof texts === 'string' ? [texts] : texts;
    const padding = o.padding === true ? 'longest' : o.padding ?? false;
    const truncation = o.truncation ?? (o.maxLength !== undefined && padding === false);
    const maxLength = o.maxLength ?? this.config.modelMaxLength;
    if (!Number.isInteger(maxLength) || maxLength < 2) throw new RangeError(`CLIPTokenizer: maxLength must be an integer ≥ 2 (room for BOS and EOS), got ${maxLength}`);
    const inputIds = list.map((text) => {
      let ids = this.encode(text);
      if (truncation && ids.length > maxLength - 2) ids = ids.slice(0, maxLength - 2);
      return [this.bosTokenId, ...ids, this.eosTokenId];
    });
    const attentionMask = inputIds.map((ids) => ids.map(() => 1));
    const target = padding === 'max_length' ? maxLength : padding === 'longest' ? Math.max(0, ...inputIds.map((x) => x.length)) : 0;
    for (let i = 0; i < inputIds.length; i++) {
      const ids = inputIds[i]!;
      const mask = attentionMask[i]!;
      while (ids.length < target) { ids.push(this.padTokenId); mask.push(0); }
    }
    return { inputIds, attentionMask };
  }

  /** Rectangular id rows as an int64 tensor [B, L]. */
  toTensor(rows: readonly (readonly number[])[], device?: Device): Tensor {
    const length = rows[0]?.length ?? 0;
    const flat = new BigInt64Array(rows.length * length);
    rows.forEach((row, i) => {
      if (row.length !== length) throw new Error(`CLIPTokenizer.toTensor: rows differ in length (${length} and ${row.length}); pad them (padding: 'max_length')`);
      row.forEach((id, j) => {
        if (!Number.isSafeInteger(id)) throw new RangeError(`CLIPTokenizer.toTensor: row ${i}, position ${j}: ${show(id)} is not an integer token id`);
        flat[i * length + j] = BigInt(id);
      });
    });
    return tensor(flat, { shape: [rows.length, length], device });
  }

  /**
   * The training step's input: what the script's tokenize_captions returns, an int64 tensor [B, 77]
   * (padded to max_length with truncation).
   */
  inputIdsTensor(texts: string | readonly string[], o: { maxLength?: number; device?: Device } = {}): Tensor {
    const { inputIds } = this.call(texts, { maxLength: o.maxLength, padding: 'max_length', truncation: true });
    return this.toTensor(inputIds, o.device);
  }

  /** Ids back to text: bytes decoded as UTF-8 (invalid sequences → U+FFFD), `</w>` → space, trimmed. */
  decode(ids: readonly number[], o: DecodeOptions = {}): string {
    const skip = o.skipSpecialTokens ? new Set(this.allSpecialIds) : new Set<number>();
    let symbols = '';
    for (const id of ids) {
      if (skip.has(id)) continue;
      const t = this.decoder.get(id);
      if (t === undefined) throw new RangeError(`CLIPTokenizer.decode: id ${id} is not in the vocabulary (size ${this.vocabSize})`);
      symbols += t;
    }
    const bytes: number[] = [];
    for (const ch of symbols) {
      const b = this.byteDecoder.get(ch);
      if (b !== undefined) bytes.push(b);
      else bytes.push(...UTF8.encode(ch));
    }
    const text = new TextDecoder('utf-8').decode(new Uint8Array(bytes)).replaceAll('</w>', ' ').trim();
    return (o.cleanUpTokenizationSpaces ?? this.config.cleanUpTokenizationSpaces) ? cleanUpTokenization(text) : text;
  }

  /** The text in pieces: added tokens typed verbatim (kept whole) and the text between them. */
  private splitAddedTokens(text: string): { text: string; added: boolean }[] {
    const pieces: { text: string; added: boolean }[] = [];
    let start = 0;
    let i = 0;
    while (i < text.length) {
      const hit = this.addedTokens.find((t) => text.startsWith(t, i));
      if (hit === undefined) { i++; continue; }
      if (i > start) pieces.push({ text: text.slice(start, i), added: false });
      pieces.push({ text: hit, added: true });
      i += hit.length;
      start = i;
    }
    if (start < text.length) pieces.push({ text: text.slice(start), added: false });
    return pieces;
  }

  /** Byte-level BPE of one regex piece (already byte-mapped): merge the lowest-ranked pair until none is left. */
  private bpe(token: string): string[] {
    const cached = this.cache.get(token);
    if (cached) return cached;
    // Byte-mapped characters are all in the BMP, so string indices are characters.
    let word = [...token.slice(0, -1)];
    word.push(`${token.slice(-1)}</w>`);
    while (word.length > 1) {
      let best = Infinity;
      let first = '';
      let second = '';
      for (let k = 0; k + 1 < word.length; k++) {
        const r = this.ranks.get(`${word[k]} ${word[k + 1]}`);
        if (r !== undefined && r < best) { best = r; first = word[k]!; second = word[k + 1]!; }
      }
      if (best === Infinity) break;
      const merged: string[] = [];
      for (let k = 0; k < word.length; k++) {
        if (word[k] === first && word[k + 1] === second) { merged.push(first + second); k++; }
        else merged.push(word[k]!);
      }
      word = merged;
    }
    this.cache.set(token, word);
    return word;
  }
}

/** transformers' PreTrainedTokenizerBase.clean_up_tokenization. */
function cleanUpTokenization(s: string): string {
  return s.replaceAll(' .', '.').replaceAll(' ?', '?').replaceAll(' !', '!').replaceAll(' ,', ',')
    .replaceAll(" ' ", "'").replaceAll(" n't", "n't").replaceAll(" 'm", "'m").replaceAll(" 's", "'s")
    .replaceAll(" 've", "'ve").replaceAll(" 're", "'re");
}
