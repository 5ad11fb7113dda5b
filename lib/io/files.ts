// Opening untrusted paths safely. Every input difflora reads (weights, configs, tokenizer files, images,
// training state) goes through `openRegularFile`: opening a FIFO for reading blocks until a writer appears, and a
// device like /dev/zero never ends, so the file is opened non-blocking and checked with fstat on the descriptor
// (no race between the check and the read) before a byte is read. Every output difflora replaces goes through
// `checkOutputTarget` first, so an atomic rename never lands on a device node, a FIFO or a symlink.
import { closeSync, constants, fstatSync, lstatSync, mkdtempSync, openSync, readSync, realpathSync, statSync, type Stats } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative, isAbsolute, sep } from 'node:path';

/** What kind of file a stat describes, in words for an error message. */
export function fileKind(st: Stats): string {
  if (st.isFile()) return 'a regular file';
  if (st.isDirectory()) return 'a directory';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  if (st.isSymbolicLink()) return 'a symbolic link';
  return 'not a regular file';
}

function errnoOf(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException).code;
}

/**
 * Opens `path` for reading and returns its descriptor and size, or throws an error naming `what` and the path
 * when it is missing or not a regular file (FIFOs, devices, sockets, directories). Never blocks.
 */
export function openRegularFile(path: string, what = 'file'): { fd: number; size: number; stats: Stats } {
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOCTTY);
  } catch (e) {
    const code = errnoOf(e);
    if (code === 'ENOENT') throw new Error(`${what} not found: '${path}'`);
    if (code === 'EISDIR') throw new Error(`${what} '${path}' is a directory, not a regular file`);
    if (code === 'ENXIO') throw new Error(`${what} '${path}' is a socket or FIFO, not a regular file`);
    throw new Error(`cannot open ${what} '${path}': ${(e as Error).message}`);
  }
  const stats = fstatSync(fd);
  if (!stats.isFile()) {
    closeSync(fd);
    throw new Error(`${what} '${path}' is ${fileKind(stats)}, not a regular file`);
  }
  return { fd, size: stats.size, stats };
}

/** Throws unless `path` is an existing regular file (FIFOs, devices and directories are refused, without blocking). */
export function assertRegularFile(path: string, what = 'file'): Stats {
  const { fd, stats } = openRegularFile(path, what);
  closeSync(fd);
  return stats;
}

/** One positioned read a whole-file read asks its driver for; the driver answers with the bytes read. */
export interface ReadRequest { fd: number; buf: Buffer; offset: number; length: number; position: number }

/**
 * The steps of reading a whole regular file, apart from how each read is done, so the blocking reader below and
 * read_async.ts's thread-pool reader share every check: `maxBytes` refuses a larger file before a byte is read (a
 * config or a vocabulary is small; a hostile one should not exhaust memory), and the size read must match the
 * size fstat saw (a file that shrinks or grows while it is read is an error naming it). The caller closes `fd`.
 */
export function* wholeFileReads(fd: number, size: number, path: string, what: string, maxBytes: number): Generator<ReadRequest, Buffer, number> {
  if (size > maxBytes) throw new Error(`${what} '${path}' is ${size} bytes, more than the ${maxBytes} allowed`);
  const buf = Buffer.allocUnsafe(size);
  let off = 0;
  while (off < size) {
    const n = yield { fd, buf, offset: off, length: size - off, position: off };
    if (n === 0) throw new Error(`${what} '${path}' shrank while being read (${off} of ${size} bytes)`);
    off += n;
  }
  if ((yield { fd, buf: Buffer.alloc(1), offset: 0, length: 1, position: size }) !== 0) throw new Error(`${what} '${path}' grew while being read`);
  return buf;
}

/** Reads a whole regular file on this thread, with wholeFileReads' checks. */
export function readRegularFile(path: string, what = 'file', maxBytes = Number.MAX_SAFE_INTEGER): Buffer {
  const { fd, size } = openRegularFile(path, what);
  try {
    const reads = wholeFileReads(fd, size, path, what, maxBytes);
    for (let r = reads.next(); ; ) {
      if (r.done) return r.value;
      r = reads.next(readSync(r.value.fd, r.value.buf, r.value.offset, r.value.length, r.value.position));
    }
  } finally {
    closeSync(fd);
  }
}

/** The default cap for text files (configs, vocabularies, metadata): 256 MiB. */
export const MAX_TEXT_BYTES = 256 * 1024 * 1024;

/** A regular file as UTF-8 text (BOM kept; callers that accept one strip it). */
export function readTextFile(path: string, what = 'file', maxBytes = MAX_TEXT_BYTES): string {
  return readRegularFile(path, what, maxBytes).toString('utf8');
}

/**
 * A JSON file that must hold an object (not an array, null or a scalar). Syntax errors name the file and the
 * line and column, not a bare position.
 */
export function readJsonObject(path: string, what = 'JSON file', maxBytes = 64 * 1024 * 1024): Record<string, unknown> {
  const text = readTextFile(path, what, maxBytes);
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    throw new Error(`${what} '${path}' is not valid JSON: ${jsonErrorWhere(text, e as Error)}`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    const got = parsed === null ? 'null' : Array.isArray(parsed) ? 'an array' : `a ${typeof parsed}`;
    throw new Error(`${what} '${path}' must hold a JSON object, not ${got}`);
  }
  return parsed as Record<string, unknown>;
}

/** Where a JSON text first goes wrong, as "line L column C: problem" (V8's own message has no position for most errors). */
function jsonErrorWhere(text: string, e: Error): string {
  const pos = firstJsonError(text);
  if (pos === undefined) return e.message.split('\n')[0]!;
  const before = text.slice(0, pos);
  const line = before.split('\n').length;
  const col = pos - before.lastIndexOf('\n');
  const got = pos >= text.length ? 'end of file' : `'${text[pos]}'`;
  return `unexpected ${got} at line ${line} column ${col}`;
}

/** The offset of the first syntax error in a JSON text (iterative: a deeply nested hostile file cannot overflow). */
function firstJsonError(t: string): number | undefined {
  let i = 0;
  const stack: string[] = []; // '{' or '['
  const ws = (): void => { while (i < t.length && ' \t\n\r'.includes(t[i]!)) i++; };
  const str = (): boolean => {
    if (t[i] !== '"') return false;
    for (i++; i < t.length; i++) {
      const c = t[i]!;
      if (c === '"') { i++; return true; }
      if (c === '\\') i++;
      else if (c < ' ') return false;
    }
    return false;
  };
  const scalar = (): boolean => {
    const m = /^(?:-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null)/.exec(t.slice(i, i + 400));
    if (!m) return false;
    i += m[0].length;
    return true;
  };
  // expect: 'value' | 'key' | 'after' (a value just ended inside a container, or at the top)
  let expect: 'value' | 'key' | 'after' = 'value';
  for (;;) {
    ws();
    if (expect === 'value') {
      const c = t[i];
      if (c === '{' || c === '[') {
        stack.push(c); i++; ws();
        if (t[i] === (c === '{' ? '}' : ']')) { stack.pop(); i++; expect = 'after'; } else expect = c === '{' ? 'key' : 'value';
        continue;
      }
      if (!(c === '"' ? str() : scalar())) return i;
      expect = 'after';
    } else if (expect === 'key') {
      if (!str()) return i;
      ws();
      if (t[i] !== ':') return i;
      i++;
      expect = 'value';
    } else {
      const top = stack[stack.length - 1];
      if (top === undefined) return i < t.length ? i : undefined;
      if (t[i] === ',') { i++; expect = top === '{' ? 'key' : 'value'; continue; }
      if (t[i] === (top === '{' ? '}' : ']')) { stack.pop(); i++; continue; }
      return i;
    }
  }
}

/**
 * Checks an output path before difflora writes to it: if something exists there, it must be `kind` (a regular
 * file, or a directory) and not a symbolic link. Renaming over a device node, a FIFO or a symlink would replace
 * what is not ours.
 */
export function checkOutputTarget(path: string, kind: 'file' | 'directory' = 'file', what = 'output'): void {
  let st: Stats;
  try {
    st = lstatSync(path);
  } catch (e) {
    if (errnoOf(e) === 'ENOENT') return;
    throw new Error(`cannot use ${what} '${path}': ${(e as Error).message}`);
  }
  if (st.isSymbolicLink()) {
    let target = 'a broken link';
    try { target = fileKind(statSync(path)); } catch { /* dangling */ }
    throw new Error(`${what} '${path}' is a symbolic link (to ${target}); refusing to replace it — give the real path`);
  }
  const ok = kind === 'file' ? st.isFile() : st.isDirectory();
  if (!ok) throw new Error(`${what} '${path}' exists and is ${fileKind(st)}, not a ${kind === 'file' ? 'regular file' : 'directory'}; refusing to replace it`);
}

/** True when `path` (after resolving every symlink) lies inside `root` (also resolved). */
export function isInside(root: string, path: string): boolean {
  let r: string;
  let p: string;
  try {
    r = realpathSync(root);
    p = realpathSync(path);
  } catch {
    return false;
  }
  const rel = relative(r, p);
  return rel === '' || (!rel.startsWith(`..${sep}`) && rel !== '..' && !isAbsolute(rel));
}

/** A new private (0700) temporary directory under the OS temp folder. The caller removes it. */
export function makePrivateTempDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), prefix)); // mkdtemp creates with mode 0700
}
