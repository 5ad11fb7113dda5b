// The asynchronous driver of files.ts's wholeFileReads, for reads that run while other work goes on (the data
// loader decodes training images ahead of the training step): the open is files.ts's non-blocking open + fstat
// (a FIFO, a device or a directory is refused at once, never waited on), then the bytes are read in libuv's
// thread pool instead of on the main thread.
import { closeSync, read } from 'node:fs';
import { openRegularFile, wholeFileReads, type ReadRequest } from './files.js';

function readAt({ fd, buf, offset, length, position }: ReadRequest): Promise<number> {
  return new Promise((resolve, reject) => {
    read(fd, buf, offset, length, position, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

/** Reads a whole regular file without blocking the event loop, with the checks of files.ts's wholeFileReads. */
export async function readRegularFileAsync(path: string, what = 'file', maxBytes = Number.MAX_SAFE_INTEGER): Promise<Buffer> {
  const { fd, size } = openRegularFile(path, what);
  try {
    const reads = wholeFileReads(fd, size, path, what, maxBytes);
    for (let r = reads.next(); ; ) {
      if (r.done) return r.value;
      r = reads.next(await readAt(r.value));
    }
  } finally {
    closeSync(fd);
  }
}
