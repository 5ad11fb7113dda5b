// Reading an imagefolder's metadata.jsonl / metadata.csv, which is untrusted input: the file is read once,
// without blocking (a FIFO is refused, not waited on), up to a size cap; every row carries the line it starts
// on, so that each later error names file and line; and captions are bounded, since one 300 MB caption
// line is enough to exhaust V8 while the tokenizer would keep 77 tokens of it.
import { readRegularFile } from '../io/files.js';

/**
 * Longest caption kept, in UTF-16 code units; longer ones are cut (with one warning per dataset). The
 * tokenizer keeps 75 tokens between BOS and EOS; every CLIP token covers at least one non-blank character and
 * at most a couple of dozen (its longest vocabulary entries), so 75 tokens come from under ~2 Ki characters
 * of text: 16 Ki leaves a wide margin (odd spacing, markup, control characters, which make no tokens), so the
 * cut never changes the tokens of a real caption. What it bounds: tokenizing a 16 Ki caption costs ~8 ms
 * (measured: a batch of 16 such captions, 140 ms), where a 300 MB one exhausted V8.
 */
export const MAX_CAPTION_CHARS = 16 * 1024;

/**
 * Largest metadata file read: 500 MiB. A metadata.jsonl of a million rows with 100-byte captions is ~130 MB,
 * so this is 3–5 million rows; the parsed rows of a bigger file would not fit in Node's default heap
 * anyway, and V8 cannot hold one string much above 512 MiB (a CSV is parsed as one string).
 */
export const MAX_METADATA_BYTES = 500 * 1024 * 1024;

/** Longest JSON line parsed once its over-long strings are shortened: a row is file names and captions. */
export const MAX_ROW_BYTES = 16 * 1024 * 1024;

/**
 * A string longer than this many bytes in a JSON line is shortened before parsing. One character takes at most
 * 6 bytes (\uXXXX), so what is kept still holds more than MAX_CAPTION_CHARS characters: the caption is then
 * cut, and counted as cut, exactly as if the whole line had been parsed.
 */
const KEEP_STRING_BYTES = 6 * (MAX_CAPTION_CHARS + 1);

/** A metadata row (own properties only: a column named `constructor` is not Object's) and where it starts. */
export interface MetaRow { row: Record<string, unknown>; line: number }

/** The value of a column in a row, or undefined; never an inherited property. */
export function cell(row: Record<string, unknown>, key: string): unknown {
  return Object.hasOwn(row, key) ? row[key] : undefined;
}

/** A short description of any cell value for an error message (a huge string or binary is not pasted in). */
export function describeValue(v: unknown, depth = 0): string {
  if (v === null) return 'null';
  if (v === undefined) return 'no value';
  if (typeof v === 'bigint') return `${v} (an integer)`;
  if (typeof v === 'string') return v.length > 80 ? `${JSON.stringify(v.slice(0, 80))}… (${v.length} characters)` : JSON.stringify(v);
  if (v instanceof Uint8Array) return `binary data (${v.byteLength} bytes)`;
  if (Array.isArray(v)) {
    if (depth > 0) return `a list of ${v.length}`; // one level shown: a hostile row may nest a million deep
    return `a list of ${v.length} (${v.slice(0, 3).map((x) => describeValue(x, depth + 1)).join(', ')}${v.length > 3 ? ', …' : ''})`;
  }
  if (typeof v === 'object') return `an object with keys ${Object.keys(v).slice(0, 5).join(', ') || '(none)'}`;
  return `${String(v)} (a ${typeof v})`;
}

/**
 * A copy of `s` that does not keep a bigger string alive: V8 shares a parent's memory with its substrings, so
 * a short caption sliced out of a 400 MB CSV text would otherwise pin the whole text for the whole run.
 */
function detach(s: string): string {
  return (` ${s}`).slice(1);
}

/** The captions cut so far in one dataset load, for the single warning that names them. */
export class CaptionCutter {
  readonly cuts: string[] = [];

  /** `s`, or its first MAX_CAPTION_CHARS (not splitting a surrogate pair), noting `where` it was cut. */
  cap(s: string, where: string): string {
    if (s.length <= MAX_CAPTION_CHARS) return detach(s);
    this.cuts.push(where);
    let end = MAX_CAPTION_CHARS;
    const last = s.charCodeAt(end - 1);
    if (last >= 0xd800 && last <= 0xdbff) end -= 1;
    return detach(s.slice(0, end));
  }

  /** The one warning for the whole dataset, or undefined when nothing was cut. */
  warning(): string | undefined {
    if (this.cuts.length === 0) return undefined;
    const shown = this.cuts.slice(0, 5).join('; ');
    const more = this.cuts.length > 5 ? `; and ${this.cuts.length - 5} more` : '';
    return `${this.cuts.length} caption(s) longer than ${MAX_CAPTION_CHARS} characters were cut to their first ${MAX_CAPTION_CHARS} ` +
      `(the tokenizer keeps 77 tokens of a caption): ${shown}${more}`;
  }
}

/** Reports a warning the library's way: Node's process warnings (printed to stderr unless a listener is set). */
export function emitDataWarning(message: string, onWarning?: (message: string) => void): void {
  if (onWarning) onWarning(message);
  else process.emitWarning(message, 'DiffloraDataWarning');
}

function readMetadataBytes(file: string): Buffer {
  return readRegularFile(file, 'metadata file', MAX_METADATA_BYTES);
}

// ---- JSON lines

/**
 * Shortens every string literal of a JSON line longer than `keep` bytes to its first `keep` bytes or a few
 * more (cut where no escape and no UTF-8 sequence is split), so that a huge caption is never materialised as
 * a JavaScript string. Returns the line itself when nothing is long, or 'key' when an object key is the long
 * string (a column name is not a caption: refused, not cut). Quotes are found with indexOf (memchr), so a
 * 300 MB string costs one native scan.
 */
export function shortenLongStrings(line: Buffer, keep: number): Buffer | 'key' {
  const parts: Buffer[] = [];
  let from = 0;
  let i = 0;
  const n = line.length;
  while (i < n) {
    const open = line.indexOf(0x22, i); // outside a string, a quote opens one
    if (open < 0) break;
    const start = open + 1;
    // walk the first `keep` bytes escape by escape (\uXXXX is one unit of 6): j stays on unit boundaries
    let j = start;
    while (j < n && line[j] !== 0x22 && j - start < keep) j += line[j] === 0x5c ? (line[j + 1] === 0x75 ? 6 : 2) : 1;
    if (j >= n) break; // unterminated: left as is, JSON.parse names the error
    if (line[j] === 0x22) { i = j + 1; continue; } // a short string
    while (j < n && (line[j]! & 0xc0) === 0x80) j++; // not inside a UTF-8 sequence
    const cut = j;
    const close = closingQuote(line, cut);
    if (close >= n) break;
    let k = close + 1;
    while (k < n && (line[k] === 0x20 || line[k] === 0x09 || line[k] === 0x0d)) k++;
    if (line[k] === 0x3a) return 'key';
    parts.push(line.subarray(from, cut));
    from = close; // the closing quote and what follows are kept
    i = close + 1;
  }
  if (parts.length === 0) return line;
  parts.push(line.subarray(from));
  return Buffer.concat(parts);
}

/** The closing quote of a string, searching from `from` (a unit boundary inside it), or line.length. */
function closingQuote(line: Buffer, from: number): number {
  for (;;) {
    const q = line.indexOf(0x22, from);
    if (q < 0) return line.length;
    let backslashes = 0;
    for (let k = q - 1; k >= from && line[k] === 0x5c; k--) backslashes++;
    if (backslashes % 2 === 0) return q;
    from = q + 1;
  }
}

function parseJsonLine(buf: Buffer, start: number, end: number, file: string, line: number): unknown {
  let text: string;
  if (end - start > KEEP_STRING_BYTES) {
    const short = shortenLongStrings(buf.subarray(start, end), KEEP_STRING_BYTES);
    if (short === 'key') throw new Error(`${file}: line ${line} has a key (column name) longer than ${KEEP_STRING_BYTES} bytes`);
    if (short.length > MAX_ROW_BYTES) {
      throw new Error(`${file}: line ${line} is ${end - start} bytes, ${short.length} even with its long strings shortened; a metadata row must be under ${MAX_ROW_BYTES} bytes`);
    }
    text = short.toString('utf8');
  } else {
    text = buf.toString('utf8', start, end);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${file}: line ${line} is not valid JSON: ${(e as Error).message}`);
  }
}

/**
 * The rows of a metadata.jsonl: one JSON object per line; a UTF-8 BOM, CRLF line ends and blank lines are
 * accepted; anything else (null, a list, a number, invalid JSON) is an error naming the file and line.
 */
export function readJsonlRows(file: string): MetaRow[] {
  const buf = readMetadataBytes(file);
  const rows: MetaRow[] = [];
  let pos = buf[0] === 0xef && buf[1] === 0xbb && buf[2] === 0xbf ? 3 : 0;
  for (let line = 1; pos < buf.length; line++) {
    let end = buf.indexOf(0x0a, pos);
    if (end < 0) end = buf.length;
    const next = end + 1;
    if (end > pos && buf[end - 1] === 0x0d) end -= 1;
    if (!isBlank(buf, pos, end)) {
      const v = parseJsonLine(buf, pos, end, file, line);
      if (v === null || typeof v !== 'object' || Array.isArray(v)) {
        throw new Error(`${file}: line ${line} is not a JSON object (got ${describeValue(v)}); each line must be one row like {"file_name": "a.png", "text": "…"}`);
      }
      rows.push({ row: v as Record<string, unknown>, line });
    }
    pos = next;
  }
  return rows;
}

function isBlank(buf: Buffer, start: number, end: number): boolean {
  for (let i = start; i < end; i++) {
    const c = buf[i];
    if (c !== 0x20 && c !== 0x09 && c !== 0x0d) return false;
  }
  return true;
}

// ---- CSV

/** A CSV record and the line it starts on (a quoted field may hold newlines). */
export interface CsvRecord { cells: string[]; line: number }

/**
 * Parses CSV text (RFC 4180): comma separated, fields optionally in double quotes, `""` inside quotes is a
 * quote, quoted fields may hold commas and newlines; LF or CRLF line ends; a leading BOM is ignored; empty
 * lines are skipped. Fields are sliced out of the text, never built a character at a time (a 50 MB field
 * built so takes minutes). A field longer than `maxFieldChars` keeps only its first maxFieldChars + 1
 * characters (so that a caller still sees it was longer): undoing the quote doubling of a whole 50 MB field
 * would cost seconds for characters the caption cap then drops.
 */
export function parseCsvRecords(text: string, maxFieldChars = Infinity): CsvRecord[] {
  let i = text.charCodeAt(0) === 0xfeff ? 1 : 0;
  const n = text.length;
  let line = 1;
  const records: CsvRecord[] = [];
  const special = /[",\r\n]/g;
  while (i < n) {
    if (text[i] === '\n' || text[i] === '\r') { // an empty line
      i += text[i] === '\r' && text[i + 1] === '\n' ? 2 : 1;
      line++;
      continue;
    }
    const record: CsvRecord = { cells: [], line };
    for (;;) {
      let field = '';
      if (text[i] === '"') {
        // the closing quote is the first one not doubled; then one native replace undoes the doubling
        let q = text.indexOf('"', i + 1);
        while (q >= 0 && text[q + 1] === '"') q = text.indexOf('"', q + 2);
        if (q < 0) throw new Error(`CSV: unterminated quoted field (the row starting at line ${record.line})`);
        const raw = text.slice(i + 1, q);
        line += countNewlines(raw);
        field = undoubleQuotes(raw, maxFieldChars + 1);
        i = q + 1;
      }
      // unquoted text, or text after a closing quote (kept, as Python's csv does), up to the field's end
      special.lastIndex = i;
      const m = special.exec(text);
      const j = m ? m.index : n;
      if (m && m[0] === '"') throw new Error(`CSV: unexpected quote inside an unquoted field (line ${line})`);
      if (j > i) field = field === '' ? text.slice(i, j) : field + text.slice(i, j);
      i = j;
      record.cells.push(field.length > maxFieldChars ? field.slice(0, maxFieldChars + 1) : field);
      if (i < n && text[i] === ',') { i++; continue; }
      if (i < n) { i += text[i] === '\r' && text[i + 1] === '\n' ? 2 : 1; line++; }
      break;
    }
    records.push(record);
  }
  return records;
}

/** The first `limit` characters of a quoted field's content with each `""` turned back into `"`. */
function undoubleQuotes(raw: string, limit: number): string {
  if (!raw.includes('"')) return raw.length > limit ? raw.slice(0, limit) : raw;
  if (raw.length <= limit) return raw.replaceAll('""', '"');
  let out = '';
  for (let pos = 0; out.length < limit;) {
    const k = raw.indexOf('""', pos);
    const end = k < 0 ? raw.length : k;
    out += raw.slice(pos, Math.min(end, pos + limit - out.length));
    if (k < 0 || out.length >= limit) break;
    out += '"';
    pos = k + 2;
  }
  return out.slice(0, limit);
}

function countNewlines(s: string): number {
  let k = 0;
  for (let p = s.indexOf('\n'); p >= 0; p = s.indexOf('\n', p + 1)) k++;
  // a lone CR also ends a line
  for (let p = s.indexOf('\r'); p >= 0; p = s.indexOf('\r', p + 1)) if (s[p + 1] !== '\n') k++;
  return k;
}

/** The rows of a metadata.csv: a header row, then one row per example, each with as many fields. */
export function readCsvRows(file: string): MetaRow[] {
  let records: CsvRecord[];
  try {
    // decoded once: the bytes are dropped as soon as the text exists
    records = parseCsvRecords(readMetadataBytes(file).toString('utf8'), MAX_CAPTION_CHARS);
  } catch (e) {
    const msg = (e as Error).message;
    throw new Error(msg.includes(file) ? msg : `${file}: ${msg}`);
  }
  const header = records[0];
  if (header === undefined) return [];
  return records.slice(1).map(({ cells, line }) => {
    if (cells.length !== header.cells.length) {
      throw new Error(`${file}: line ${line} has ${cells.length} fields, the header (line ${header.line}) has ${header.cells.length}`);
    }
    const row: Record<string, unknown> = Object.create(null) as Record<string, unknown>;
    header.cells.forEach((h, j) => { row[h] = cells[j]; });
    return { row, line };
  });
}
