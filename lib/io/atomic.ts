// Whole-file writes that never leave a half-written file and never replace what is not ours. The data goes
// to a new temporary file next to the target, created exclusively (O_EXCL: an existing file or a symlink
// planted at that name is never opened) and private (0600) until it is complete, then fsynced, given its
// final mode and renamed over the target (atomic on POSIX). The target must be absent or a regular file,
// checked before writing and again just before the rename: renaming over /dev/full, a FIFO or a symlink would
// replace the device node, the pipe or the link itself. A full or read-only disk fails before the target is
// touched, and the temporary file is removed on every failure.
import { randomBytes } from 'node:crypto';
import { closeSync, constants, fchmodSync, fsyncSync, lstatSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { checkOutputTarget } from './files.js';

/**
 * The mode a replaced file should have: an existing file's own permission bits (a private file stays
 * private), else 0666 less the process umask, as a plain write would create it.
 */
export function outputMode(path: string): number {
  try {
    const st = lstatSync(path);
    if (st.isFile()) return st.mode & 0o777;
  } catch {
    // absent: a new file
  }
  return 0o666 & ~process.umask();
}

/** Opens a new temporary file next to `path` (exclusive, mode 0600); retries on the unlikely name clash. */
function createTemp(path: string): { fd: number; tmp: string } {
  const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW; // libuv adds O_CLOEXEC
  for (let attempt = 0; ; attempt++) {
    const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
    try {
      return { fd: openSync(tmp, flags, 0o600), tmp };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST' || attempt >= 15) throw e;
    }
  }
}

/**
 * Writes `data` to `path` through a temporary file and a rename: a full disk never leaves a truncated file
 * behind. Refuses, naming the path, when something other than a regular file is at `path` (`what` names the
 * output in that message, e.g. 'output image').
 */
export function writeFileAtomic(path: string, data: Uint8Array, what = 'output file'): void {
  checkOutputTarget(path, 'file', what);
  const mode = outputMode(path);
  let tmp: string | undefined;
  let fd: number | undefined;
  try {
    ({ fd, tmp } = createTemp(path));
    let off = 0;
    while (off < data.length) off += writeSync(fd, data, off, data.length - off);
    fchmodSync(fd, mode);
    fsyncSync(fd);
    closeSync(fd);
    fd = undefined;
  } catch (e) {
    cleanUp(fd, tmp);
    throw new Error(`cannot write ${what} '${path}': ${(e as Error).message}`);
  }
  try {
    checkOutputTarget(path, 'file', what); // again: the write may have taken a while
  } catch (e) {
    cleanUp(undefined, tmp);
    throw e;
  }
  try {
    renameSync(tmp, path);
  } catch (e) {
    cleanUp(undefined, tmp);
    throw new Error(`cannot write ${what} '${path}': ${(e as Error).message}`);
  }
}

function cleanUp(fd: number | undefined, tmp: string | undefined): void {
  if (fd !== undefined) closeSync(fd);
  if (tmp !== undefined) rmSync(tmp, { force: true });
}
