// Checked reads of a model's config.json. Every field a model reads goes through one of these, so a wrong
// type or an out-of-domain value is an error naming the model, the file (when the config came from one), the
// field and the value, instead of a TypeError deep inside construction or an allocation that aborts the
// process. The caps refuse values no real Stable Diffusion component comes near (SD 1.5's UNet has 2 layers
// per block and 1280 channels; CLIP-L has 12 layers and 49,408 tokens) long before the memory check would.

/** Where a config came from: the model class and, when read from disk, the file. */
export interface ConfigSource {
  model: string;
  file?: string;
}

/** Upper bounds on single values (far above any real checkpoint; below what would exhaust memory in a loop). */
export const CONFIG_LIMITS = {
  /** Layers per block, transformer layers, encoder layers. */
  layers: 10_000,
  /** Channels, hidden sizes, heads, groups, cross-attention widths, positions. */
  dim: 1_000_000,
  /** Token vocabulary (and so token ids). */
  vocab: 10_000_000,
  /** Entries of a per-block list (each block halves the resolution: 64 would be 2^63 pixels wide). */
  blocks: 64,
} as const;

/** The `Model config 'file'` prefix of every message about this source. */
export function configLabel(src: ConfigSource): string {
  return src.file ? `${src.model} config '${src.file}'` : `${src.model} config`;
}

/** `field` as it should appear in the message (quoted or not: the caller's style). */
export function configError(src: ConfigSource, field: string, problem: string): Error {
  return new Error(`${configLabel(src)}: ${field} ${problem}`);
}

/** A value for an error message: JSON, cut short (a hostile list can be megabytes). */
export function show(v: unknown): string {
  let s: string;
  try {
    s = JSON.stringify(v) ?? String(v);
  } catch {
    s = Array.isArray(v) ? '[…] (too deeply nested to show)' : '{…} (too deeply nested to show)'; // JSON.stringify overflowed the stack
  }
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
}

export interface IntRange { min?: number; max?: number }
export interface NumberRange { min?: number; max?: number; above?: number }

/**
 * Typed reads of one config object. `value(field)` is the config's value, or the default when the field is
 * absent (undefined); null is a value like any other, so a nullable field must say so by reading it with
 * `nullable`. Field names in messages are given by `display` (snake_case for camelCased configs).
 */
export class ConfigFields {
  constructor(
    private readonly raw: Readonly<Record<string, unknown>>,
    readonly src: ConfigSource,
    private readonly defaults: Readonly<Record<string, unknown>> = {},
    private readonly display: (field: string) => string = (f) => `'${f}'`,
  ) {}

  fail(field: string, problem: string): never {
    throw configError(this.src, this.display(field), problem);
  }

  value(field: string): unknown {
    const v = Object.hasOwn(this.raw, field) ? this.raw[field] : undefined;
    return v === undefined ? this.defaults[field] : v;
  }

  /** An integer in [min, max] (default: a positive integer up to CONFIG_LIMITS.dim). */
  int(field: string, r: IntRange = {}): number {
    return this.checkInt(field, this.value(field), r);
  }

  /** An integer check of a value read some other way (a list element, a nullable field). */
  checkInt(field: string, v: unknown, { min = 1, max = CONFIG_LIMITS.dim }: IntRange = {}, where = ''): number {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
      const what = min === 1 ? `a positive integer (at most ${max})` : min === 0 ? `a non-negative integer (at most ${max})` : `an integer in [${min}, ${max}]`;
      this.fail(field, `${where}must be ${what}, got ${show(v)}`);
    }
    return v;
  }

  /** A finite number, optionally bounded: [min, max], or strictly above `above`. */
  number(field: string, r: NumberRange = {}): number {
    const v = this.value(field);
    const range = [r.above !== undefined ? `> ${r.above}` : '', r.min !== undefined ? `≥ ${r.min}` : '', r.max !== undefined ? `≤ ${r.max}` : ''].filter(Boolean).join(' and ');
    const what = `must be a finite number${range ? ` ${range}` : ''}, got ${show(v)}`;
    if (typeof v !== 'number' || !Number.isFinite(v)) this.fail(field, what);
    if ((r.above !== undefined && !(v > r.above)) || (r.min !== undefined && v < r.min) || (r.max !== undefined && v > r.max)) this.fail(field, what);
    return v;
  }

  bool(field: string): boolean {
    const v = this.value(field);
    if (typeof v !== 'boolean') this.fail(field, `must be true or false, got ${show(v)}`);
    return v;
  }

  /** One of a closed set of strings (an enumeration: block types, activations). */
  choice<T extends string>(field: string, allowed: readonly T[]): T {
    return this.checkChoice(field, this.value(field), allowed);
  }

  checkChoice<T extends string>(field: string, v: unknown, allowed: readonly T[], where = ''): T {
    if (typeof v !== 'string' || !(allowed as readonly string[]).includes(v)) {
      this.fail(field, `${where}${show(v)} is not supported (supported: ${allowed.join(', ')})`);
    }
    return v as T;
  }

  /** A list (1 to CONFIG_LIMITS.blocks entries, or exactly `length`). */
  list(field: string, length?: number): unknown[] {
    const v = this.value(field);
    const want = length !== undefined ? `a list of ${length}` : `a list of 1 to ${CONFIG_LIMITS.blocks} entries`;
    if (!Array.isArray(v)) this.fail(field, `must be ${want}, got ${show(v)}`);
    if (length !== undefined ? v.length !== length : v.length < 1 || v.length > CONFIG_LIMITS.blocks) this.fail(field, `must be ${want}, got ${v.length} entries`);
    return v;
  }

  intList(field: string, r: IntRange = {}, length?: number): number[] {
    return this.list(field, length).map((x, i) => this.checkInt(field, x, r, `[${i}] `));
  }

  /** An integer meaning the same for each of n blocks, or a list of n integers. */
  intPerBlock(field: string, n: number, r: IntRange = {}): number[] {
    const v = this.value(field);
    if (!Array.isArray(v)) return Array<number>(n).fill(this.checkInt(field, v, r));
    if (v.length !== n) this.fail(field, `must be an integer or a list of ${n} (one per block), got ${show(v)}`);
    return v.map((x, i) => this.checkInt(field, x, r, `[${i}] `));
  }

  /** A field this implementation supports only at one value (diffusers features not implemented here). */
  only(field: string, expected: unknown): void {
    const v = this.value(field);
    if (v !== expected) this.fail(field, `= ${show(v)} is not supported (only ${show(expected)} is implemented)`);
  }
}

/** Fields not in `known` (ignoring diffusers' `_class_name`-style metadata) are an error listing the known ones. */
export function refuseUnknownFields(raw: Readonly<Record<string, unknown>>, known: ReadonlySet<string>, src: ConfigSource, library: string): void {
  const unknown = Object.keys(raw).filter((k) => !k.startsWith('_') && !known.has(k));
  if (unknown.length) {
    throw new Error(`${configLabel(src)}: unknown field(s) ${unknown.slice(0, 5).map((k) => `'${k}'`).join(', ')}${unknown.length > 5 ? ` and ${unknown.length - 5} more` : ''} (${library} fields: ${[...known].join(', ')})`);
  }
}
