// lib/io/files.ts: inputs must be regular files (checked without blocking), outputs never replace what is not ours.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkOutputTarget, isInside, readJsonObject, readRegularFile, readTextFile } from '../lib/io/files.js';

const dir = mkdtempSync(join(tmpdir(), 'difflora-files-'));

describe('io/files', () => {
  it('refuses a FIFO, a device and a directory as input without blocking', () => {
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    expect(() => readRegularFile(fifo, 'LoRA file')).toThrow(/LoRA file '.*fifo' is a FIFO, not a regular file/);
    expect(() => readTextFile('/dev/zero', 'config')).toThrow(/config '\/dev\/zero' is a character device/);
    expect(() => readTextFile(dir, 'config')).toThrow(/is a directory/);
    expect(() => readTextFile(join(dir, 'nope'), 'config')).toThrow(/config not found: '.*nope'/);
  });

  it('caps the size and reads the whole file', () => {
    const f = join(dir, 'a.txt');
    writeFileSync(f, 'x'.repeat(1000));
    expect(readTextFile(f)).toHaveLength(1000);
    expect(() => readTextFile(f, 'caption file', 10)).toThrow(/caption file '.*a.txt' is 1000 bytes, more than the 10 allowed/);
  });

  it('JSON errors name the file and the line; non-objects are refused', () => {
    const f = join(dir, 'bad.json');
    writeFileSync(f, '{\n  "a": 1,\n  "b": }\n');
    expect(() => readJsonObject(f, 'config')).toThrow(/config '.*bad.json' is not valid JSON: .* at line 3 column/);
    writeFileSync(f, '[]');
    expect(() => readJsonObject(f, 'model_index.json')).toThrow(/must hold a JSON object, not an array/);
    writeFileSync(f, 'null');
    expect(() => readJsonObject(f)).toThrow(/not null/);
  });

  it('output targets: devices and symlinks are refused, regular files and new paths pass', () => {
    expect(() => checkOutputTarget('/dev/full')).toThrow(/'\/dev\/full' exists and is a character device/);
    const link = join(dir, 'link.png');
    symlinkSync('/dev/null', link);
    expect(() => checkOutputTarget(link)).toThrow(/symbolic link \(to a character device\)/);
    const f = join(dir, 'out.png');
    writeFileSync(f, 'x');
    expect(() => checkOutputTarget(f)).not.toThrow();
    expect(() => checkOutputTarget(join(dir, 'new.png'))).not.toThrow();
    expect(() => checkOutputTarget(f, 'directory')).toThrow(/not a directory/);
  });

  it('isInside resolves symlinks', () => {
    const link = join(dir, 'etc-link');
    symlinkSync('/etc', link);
    expect(isInside(dir, join(dir, 'a.txt'))).toBe(true);
    expect(isInside(dir, join(link, 'passwd'))).toBe(false);
  });
});
