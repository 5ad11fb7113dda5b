// The asynchronous twin of files.ts's readRegularFile, for reads that run while other work goes on (the data
// loader decodes training images ahead of the training step): the open is files.ts's non-blocking open + fstat
// (a FIFO, a device or a directory is refused at once, never waited on), then the bytes are read in libuv's
// thread pool instead of on the main thread.
import { closeSync, read } from 'node:fs';
import { openRegularFile } from './files.js';

function readAt(fd: number, buf: Buffer, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    read(fd, buf, offset, length, position, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

/**
 * Reads a whole regular file without blocking the event loop. `maxBytes` refuses a larger file before a byte
 * is read; a file that shrinks or grows while it is read is an error naming it (as readRegularFile).
 */
export async function readRegularFileAsync(path: string, what = 'file', maxBytes = Number.MAX_SAFE_INTEGER): Promise<Buffer> {
  const { fd, size } = openRegularFile(path, what);
  try {
    if (size > maxBytes) throw new Error(`${what} '${path}' is ${size} bytes, more than the ${maxBytes} allowed`);
    const buf = Buffer.allocUnsafe(size);
    let off = 0;
    while (off < size) {
      const n = await readAt(fd, buf, off, size - off, off);
      if (n === 0) throw new Error(`${what} '${path}' shrank while being read (${off} of ${size} bytes)`);
      off += n;
    }
    if ((await readAt(fd, Buffer.alloc(1), 0, 1, size)) !== 0) throw new Error(`${what} '${path}' grew while being read`);
    return buf;
  } finally {
    closeSync(fd);
  }
}
