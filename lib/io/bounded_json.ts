// A JSON reader for untrusted headers whose shape is known to be small and flat (safetensors). JSON.parse has
// no limits: 100 MB of '[' exhausts the V8 heap after minutes, and an object of millions of keys takes minutes
// to build. This reader works on the bytes in one linear pass and stops at the first thing beyond its limits:
// nesting deeper than `maxDepth`, or a container with more items than allowed at its depth. It also refuses
// what JSON.parse silently accepts: a key repeated within one object (JSON.parse keeps the last). Objects are
// read into objects without a prototype (a "__proto__" key is just a key). Every error carries the byte offset.
// The top-level object's members are handed to `onMember` as each one is complete and not kept, so a caller
// that validates them fails at the first bad member, and a file of many members costs no more than one pass.

export type Json = null | boolean | number | string | Json[] | JsonObject;
/** A parsed JSON object: no prototype, so every own key is a member (and "__proto__" is an ordinary one). */
export interface JsonObject { [key: string]: Json }

/** Whether a parsed value is a JSON object (not null, not an array). */
export const isJsonObject = (v: Json | undefined): v is JsonObject => typeof v === 'object' && v !== null && !Array.isArray(v);

export interface JsonLimits {
  /** The deepest nesting allowed (1: the top-level container holds only scalars). */
  maxDepth: number;
  /** The most items (array elements or object members) of one container, by depth (index 0: the top level). */
  maxItems: readonly number[];
}

export type JsonErrorKind = 'syntax' | 'utf8' | 'depth' | 'items' | 'duplicate';

/** What went wrong, where (a byte offset, counted from `base`), and inside which object keys. */
export class BoundedJsonError extends Error {
  constructor(
    readonly kind: JsonErrorKind, message: string, readonly offset: number,
    /** Keys of the objects around the problem, outermost first (the top-level key first). */
    readonly keys: readonly string[],
    /** depth: the depth reached; items: the limit exceeded. */
    readonly limit = 0,
    /** duplicate: the repeated key. */
    readonly key = '',
  ) {
    super(message);
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const NUMBER = /^-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?$/;

class Reader {
  pos = 0;
  /** The keys of the objects being read, outermost first (copied into an error only). */
  readonly keys: string[] = [];
  readonly b: Buffer;
  constructor(bytes: Uint8Array, readonly limits: JsonLimits, readonly base: number,
    readonly onMember?: (key: string, value: Json, offset: number) => void) {
    this.b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength); // a view, for latin1 slices
  }

  error(kind: JsonErrorKind, message: string, at: number, limit = 0, key = ''): BoundedJsonError {
    return new BoundedJsonError(kind, message, this.base + at, [...this.keys], limit, key);
  }

  unexpected(): BoundedJsonError {
    const c = this.b[this.pos];
    const what = c === undefined ? 'end of the header'
      : c >= 0x20 && c < 0x7f ? `'${String.fromCharCode(c)}'` : `byte 0x${c.toString(16).padStart(2, '0')}`;
    return this.error('syntax', `unexpected ${what} at byte ${this.base + this.pos}`, this.pos);
  }

  ws(): void {
    const b = this.b;
    let i = this.pos;
    for (let c = b[i]; c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09; c = b[++i]);
    this.pos = i;
  }

  value(depth: number): Json {
    this.ws();
    const c = this.b[this.pos];
    if (c === 0x7b || c === 0x5b) { // { [
      if (depth > this.limits.maxDepth) {
        throw this.error('depth', `'${String.fromCharCode(c)}' at byte ${this.base + this.pos} is at depth ${depth}`, this.pos, depth);
      }
      return c === 0x7b ? this.object(depth) : this.array(depth);
    }
    if (c === 0x22) return this.string();
    if (c === 0x74) return this.literal('true', true);
    if (c === 0x66) return this.literal('false', false);
    if (c === 0x6e) return this.literal('null', null);
    if (c === 0x2d || (c !== undefined && c >= 0x30 && c <= 0x39)) return this.number();
    throw this.unexpected();
  }

  maxItems(depth: number): number {
    const m = this.limits.maxItems;
    return m[Math.min(depth, m.length) - 1] ?? Infinity;
  }

  tooMany(depth: number, start: number, what: string): BoundedJsonError {
    const limit = this.maxItems(depth);
    return this.error('items', `the ${what} at byte ${this.base + start} has more than ${limit} items`, start, limit);
  }

  /** An object; at the top level with `onMember`, an empty one (its members went to onMember). */
  object(depth: number): JsonObject {
    const start = this.pos++;
    const out = Object.create(null) as JsonObject;
    const streamed = depth === 1 && this.onMember !== undefined;
    const seen = streamed ? new Set<string>() : undefined;
    let size = 0;
    this.ws();
    if (this.b[this.pos] === 0x7d) { this.pos++; return out; }
    for (;;) {
      this.ws();
      if (this.b[this.pos] !== 0x22) throw this.unexpected();
      const keyAt = this.pos;
      const key = this.string();
      if (seen ? seen.has(key) : Object.hasOwn(out, key)) {
        throw this.error('duplicate', `duplicate key ${JSON.stringify(key)} at byte ${this.base + keyAt}`, keyAt, 0, key);
      }
      if (size++ >= this.maxItems(depth)) throw this.tooMany(depth, start, 'object');
      this.ws();
      if (this.b[this.pos] !== 0x3a) throw this.unexpected(); // :
      this.pos++;
      this.keys.push(key);
      const v = this.value(depth + 1);
      this.keys.pop();
      if (seen) {
        seen.add(key);
        this.onMember!(key, v, this.base + keyAt);
      } else {
        out[key] = v;
      }
      this.ws();
      const c = this.b[this.pos];
      if (c === 0x2c) { this.pos++; continue; } // ,
      if (c === 0x7d) { this.pos++; return out; } // }
      throw this.unexpected();
    }
  }

  array(depth: number): Json[] {
    const start = this.pos++;
    const out: Json[] = [];
    this.ws();
    if (this.b[this.pos] === 0x5d) { this.pos++; return out; }
    for (;;) {
      if (out.length >= this.maxItems(depth)) throw this.tooMany(depth, start, 'array');
      out.push(this.value(depth + 1));
      this.ws();
      const c = this.b[this.pos];
      if (c === 0x2c) { this.pos++; continue; } // ,
      if (c === 0x5d) { this.pos++; return out; } // ]
      throw this.unexpected();
    }
  }

  string(): string {
    const b = this.b;
    const start = this.pos;
    let plain = true; // ASCII without escapes: the bytes are the string
    let i = start + 1;
    for (;;) {
      const c = b[i];
      if (c === undefined) { this.pos = i; throw this.unexpected(); }
      if (c === 0x22) break;
      if (c === 0x5c) { plain = false; i += 2; continue; }
      if (c < 0x20) { this.pos = i; throw this.error('syntax', `control character 0x${c.toString(16).padStart(2, '0')} in a string at byte ${this.base + i}`, i); }
      if (c >= 0x80) plain = false;
      i++;
    }
    this.pos = i + 1;
    if (plain) return b.toString('latin1', start + 1, i);
    let text: string;
    try {
      text = utf8.decode(b.subarray(start, i + 1));
    } catch {
      throw this.error('utf8', `invalid UTF-8 in the string at byte ${this.base + start}`, start);
    }
    try {
      return JSON.parse(text) as string;
    } catch {
      throw this.error('syntax', `bad escape in the string at byte ${this.base + start}`, start);
    }
  }

  number(): number {
    const b = this.b;
    const start = this.pos;
    // Fast path: a plain non-negative integer of at most 15 digits (every shape and offset), read directly.
    let i = start;
    let n = 0;
    for (let c = b[i]; c !== undefined && c >= 0x30 && c <= 0x39 && i - start < 15; c = b[++i]) n = n * 10 + (c - 0x30);
    const next = b[i];
    const more = next !== undefined && ((next >= 0x30 && next <= 0x39) || next === 0x2e || next === 0x45 || next === 0x65);
    if (i > start && !more && (b[start] !== 0x30 || i === start + 1)) {
      this.pos = i;
      return n;
    }
    i = start;
    for (let c = b[i]; c !== undefined && ((c >= 0x30 && c <= 0x39) || c === 0x2d || c === 0x2b || c === 0x2e || c === 0x45 || c === 0x65); c = b[++i]);
    const text = b.toString('latin1', start, i);
    if (!NUMBER.test(text)) throw this.error('syntax', `bad number at byte ${this.base + start}`, start);
    this.pos = i;
    return Number(text);
  }

  literal<T extends Json>(word: string, value: T): T {
    for (let k = 0; k < word.length; k++) {
      if (this.b[this.pos] !== word.charCodeAt(k)) throw this.unexpected();
      this.pos++;
    }
    return value;
  }
}

/**
 * Parses `bytes` (UTF-8 JSON) within `limits`; throws BoundedJsonError. `base` is added to every byte offset
 * (the position of `bytes` in its file). When the top level is an object, `onMember` sees each member as soon
 * as it is read; throwing from it stops the parse.
 */
export function parseBoundedJson(
  bytes: Uint8Array, limits: JsonLimits, base = 0, onMember?: (key: string, value: Json, offset: number) => void,
): Json {
  const r = new Reader(bytes, limits, base, onMember);
  const v = r.value(1);
  r.ws();
  if (r.pos < bytes.length) throw r.unexpected();
  return v;
}
