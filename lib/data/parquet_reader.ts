// Reading the rows of one parquet file from an untrusted dataset. hyparquet is a synchronous JavaScript
// decoder that trusts the file: a flipped bit in a page header can make it loop for ever (a run-length count
// that never advances) or allocate without bound, which no try/catch can stop. So the file is decoded in a
// worker thread, with a watchdog and a heap limit: a file that does not finish, or needs too much memory, is
// an error naming it, and the process goes on.
//
// The worker's code is plain JavaScript in a string (eval), so that it runs the same from the TypeScript
// sources (tsx, vitest) and from dist/; it reads through a descriptor that files.ts's non-blocking open made
// here (a FIFO named train.parquet is refused before any worker starts), and moves each image's bytes back
// without copying them again.
import { closeSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import { openRegularFile } from '../io/files.js';

export interface ParquetRows {
  /** The file's top-level column names. */
  columns: string[];
  /** The image and caption columns of every row; undefined when the file lacks one of them. */
  rows: Record<string, unknown>[] | undefined;
}

export interface ReadParquetOptions {
  imageColumn: string;
  captionColumn: string;
  /** Strings of the caption column are cut to this many characters in the worker (not sent whole). */
  maxCaptionChars: number;
  /** The watchdog; default 30 s plus 1 s per 2 MiB of file (hyparquet decodes ~100 MB/s on one core). */
  timeoutMs?: number;
}

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { readSync } = require('node:fs');
const { pathToFileURL } = require('node:url');
const { fd, size, hyparquet, imageColumn, captionColumn, maxCaptionChars } = workerData;
// hyparquet's AsyncBuffer over the descriptor: only the footer and the columns asked for are read
const file = {
  byteLength: size,
  slice(start, end = size) {
    const from = Math.max(0, Math.min(size, start < 0 ? size + start : start));
    const to = Math.max(from, Math.min(size, end < 0 ? size + end : end));
    const out = new Uint8Array(to - from);
    for (let off = 0; off < out.length;) {
      const n = readSync(fd, out, off, out.length - off, from + off);
      if (n === 0) throw new Error('it shrank while being read');
      off += n;
    }
    return out.buffer;
  },
};
(async () => {
  try {
    const { parquetMetadataAsync, parquetReadObjects, parquetSchema } = await import(pathToFileURL(hyparquet).href);
    const metadata = await parquetMetadataAsync(file);
    const columns = parquetSchema(metadata).children.map((c) => c.element.name);
    if (!columns.includes(imageColumn) || !columns.includes(captionColumn)) return parentPort.postMessage({ columns });
    // utf8: false keeps unannotated binary (image bytes) as Uint8Array; UTF8-annotated strings stay strings
    const rows = await parquetReadObjects({ file, metadata, columns: [imageColumn, captionColumn], utf8: false });
    const transfer = [];
    const own = (b) => { const c = new Uint8Array(b); transfer.push(c.buffer); return c; };
    const cut = (s) => (typeof s === 'string' && s.length > maxCaptionChars ? s.slice(0, maxCaptionChars) : s);
    const image = (v) => v instanceof Uint8Array ? own(v)
      : v && typeof v === 'object' && !Array.isArray(v) && v.bytes instanceof Uint8Array ? { ...v, bytes: own(v.bytes) } : v;
    const out = rows.map((r) => ({ [imageColumn]: image(r[imageColumn]), [captionColumn]: Array.isArray(r[captionColumn]) ? r[captionColumn].map(cut) : cut(r[captionColumn]) }));
    parentPort.postMessage({ columns, rows: out }, transfer);
  } catch (e) {
    parentPort.postMessage({ error: { name: (e && e.name) || 'Error', message: String((e && e.message) || e) } });
  }
})();
`;

const hyparquetPath = (): string => createRequire(import.meta.url).resolve('hyparquet');

interface WorkerReply { columns?: string[]; rows?: Record<string, unknown>[]; error?: { name: string; message: string } }

/** Why a reply or a failure of the worker makes the file unreadable, in words for the user. */
function unreadable(e: { name: string; message: string }): string {
  // hyparquet's own errors say what is wrong; a TypeError or RangeError is the decoder tripping over bytes
  // that are not what the metadata promised, which the user can only know as corruption
  return e.name === 'TypeError' || e.name === 'RangeError' ? `it is corrupt (the decoder failed: ${e.name})` : e.message;
}

/**
 * The image and caption columns of a parquet file, decoded in a worker thread (see the header). Errors name
 * the file: not a regular file, corrupt, or not done within the watchdog's time or the heap limit.
 */
export async function readParquetRows(file: string, o: ReadParquetOptions): Promise<ParquetRows> {
  const { fd, size } = openRegularFile(file, 'parquet file');
  const mib = size / 2 ** 20;
  const timeoutMs = o.timeoutMs ?? 30_000 + 500 * mib;
  const worker = new Worker(WORKER_SOURCE, {
    eval: true,
    execArgv: [], // plain JavaScript: no need for the parent's loaders (tsx)
    workerData: { fd, size, hyparquet: hyparquetPath(), imageColumn: o.imageColumn, captionColumn: o.captionColumn, maxCaptionChars: o.maxCaptionChars },
    // the decoded rows are about the file's size; beyond a few times that, the file is lying about its contents
    resourceLimits: { maxOldGenerationSizeMb: Math.ceil(512 + 4 * mib) },
  });
  try {
    const reply = await new Promise<WorkerReply>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`it is corrupt or hostile: decoding did not finish in ${Math.round(timeoutMs / 1000)} s`)), timeoutMs);
      worker.once('message', (m: WorkerReply) => { clearTimeout(timer); resolve(m); });
      worker.once('error', (e: Error & { code?: string }) => {
        clearTimeout(timer);
        reject(new Error(e.code === 'ERR_WORKER_OUT_OF_MEMORY' ? 'it is corrupt or hostile: decoding it needed far more memory than its size' : unreadable(e)));
      });
      worker.once('exit', (code) => { clearTimeout(timer); reject(new Error(`the decoder stopped (exit code ${code})`)); });
    });
    if (reply.error) throw new Error(unreadable(reply.error));
    return { columns: reply.columns ?? [], rows: reply.rows };
  } catch (e) {
    throw new Error(`${file}: not a readable parquet file: ${(e as Error).message}`);
  } finally {
    await worker.terminate(); // before the descriptor is closed: the worker must not read a reused one
    closeSync(fd);
  }
}
